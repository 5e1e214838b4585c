"""The dedupe ledger: which inputs a stage has finished, so a redelivered one is skipped.

Kafka redelivers after a crash or rebalance (at-least-once), and a job can be submitted twice. A stage marks an
input done after its outputs are flushed and before its offset is committed; a marked input is acknowledged
without running the handler again. Markers live in the blob store (shared by every process of the stage), one
empty file per input: cheap to write, and checking one is a single stat.
"""
from __future__ import annotations

import hashlib

from .blobs import LocalBlobStore


class ProcessedLedger:
    def __init__(self, blobs: LocalBlobStore, stage: str):
        self.blobs = blobs
        self.stage = stage

    def _path(self, key: str):
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.blobs.path_for("_ledger", self.stage, digest[:2], digest)

    def seen(self, key: str) -> bool:
        return self._path(key).exists()

    def mark(self, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

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
    """``distrusted_ms``: [from, to) in epoch ms. A mark made then is ignored: the embedded broker was restored from
    its archive, which holds every output acknowledged before ``from`` but maybe not those of later inputs (see
    consumers/restore.py). Such an input runs again, emitting the same event ids."""

    def __init__(self, blobs: LocalBlobStore, stage: str, distrusted_ms: tuple[int, int] | None = None):
        self.blobs = blobs
        self.stage = stage
        self.distrusted_ms = distrusted_ms

    def _path(self, key: str):
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.blobs.path_for("_ledger", self.stage, digest[:2], digest)

    def seen(self, key: str) -> bool:
        try:
            marked_ms = self._path(key).stat().st_mtime * 1000
        except FileNotFoundError:
            return False
        return self.distrusted_ms is None or not self.distrusted_ms[0] <= marked_ms < self.distrusted_ms[1]

    def mark(self, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # also renews the time of a mark made again (after a distrusted one)

"""The dedupe ledger: which inputs a stage has finished, so a redelivered one is skipped.

Kafka redelivers after a crash or rebalance (at-least-once), and a job can be submitted twice. A stage marks an
input done after its outputs are flushed and before its offset is committed; a marked input is acknowledged
without running the handler again. Markers live in the blob store (shared by every process of the stage), one
empty blob per input: cheap to write, and checking one is a single stat (a HEAD request on S3). The lifecycle stage
(consumers/lifecycle.py) removes marks older than the input topics' retention.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

from .blobs import BlobStore, BlobStoreUnavailable

log = logging.getLogger(__name__)
STORE_BACKOFF_S = (0.2, 1.0, 5.0)


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


LEDGER_DIR = "_ledger"


class ProcessedLedger:
    """``distrusted_ms``: [from, to) in epoch ms. A mark made then is ignored: the embedded broker was restored from
    its archive, which holds every output acknowledged before ``from`` but maybe not those of later inputs (see
    consumers/restore.py). Such an input runs again, emitting the same event ids.

    While the store is unreachable, ``seen`` and ``mark`` wait for it (``wait(seconds)`` returns True when the
    process is stopping: then SystemExit, leaving the input uncommitted): neither answer may be guessed."""

    def __init__(self, blobs: BlobStore, stage: str, distrusted_ms: tuple[int, int] | None = None,
                 wait: Callable[[float], bool] = _sleep):
        self.blobs = blobs
        self.stage = stage
        self.distrusted_ms = distrusted_ms
        self.wait = wait

    def _patiently(self, call):
        retry = 0
        while True:
            try:
                return call()
            except BlobStoreUnavailable as exc:
                retry += 1
                log.warning("%s: dedupe ledger waits for the blob store: %s (retry %d)", self.stage, exc, retry)
                if self.wait(STORE_BACKOFF_S[min(retry, len(STORE_BACKOFF_S)) - 1]):
                    raise SystemExit(f"{self.stage}: stopping while the blob store is unreachable") from None

    def _segments(self, key: str) -> tuple[str, ...]:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return (LEDGER_DIR, self.stage, digest[:2], digest)

    def seen(self, key: str) -> bool:
        mark = self._patiently(lambda: self.blobs.stat(self.blobs.key(*self._segments(key))))
        if mark is None:
            return False
        # S3 keeps whole seconds: a mark from the second the window opened counts as inside it (a rerun is safe,
        # a skipped input is not).
        marked_ms = mark.modified * 1000
        return self.distrusted_ms is None or not self.distrusted_ms[0] - 1000 < marked_ms < self.distrusted_ms[1]

    def mark(self, key: str) -> None:
        self._patiently(lambda: self.blobs.touch(*self._segments(key)))  # also renews the time of a mark made again (after a distrusted one)

"""Where a job's checkpoints live, how the next attempt finds the newest one, and the writer that keeps
checkpointing off the denoising path.

Checkpoints are blobs (`<job>/checkpoint-<step>.safetensors`); a small pointer, `<job>/checkpoint.json`, names
the newest one and is replaced atomically after the blob is complete, so a reader never sees a half-written
checkpoint. Attempts are numbered by claiming `<job>/attempt-<n>` markers: a redelivered job knows it is attempt 2
even if attempt 1 died before its first checkpoint.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Callable

from streams.blobs import BlobError, BlobStore
from streams.metrics import CHECKPOINT_WRITE_SECONDS

from .checkpoint import CheckpointError, DenoiseCheckpoint, from_bytes, to_bytes

log = logging.getLogger(__name__)

POINTER = "checkpoint.json"


class CheckpointStore:
    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    def next_attempt(self, job_id: str) -> int:
        attempt = 1
        while not self.blobs.claim(job_id, f"attempt-{attempt:04d}"):
            attempt += 1
        return attempt

    def save(self, ckpt: DenoiseCheckpoint) -> dict:
        """Write the checkpoint, then point to it; returns its BlobRef."""
        ref = self.blobs.put(to_bytes(ckpt), ckpt.job_id, f"checkpoint-{ckpt.step:05d}.safetensors",
                             dtype="application/vnd.vidgen.checkpoint")
        pointer = {"checkpoint": ref, "step": ckpt.step, "attempt": ckpt.attempt}
        self.blobs.put(json.dumps(pointer).encode(), ckpt.job_id, POINTER, dtype="application/json")
        return ref

    def newest(self, job_id: str) -> DenoiseCheckpoint | None:
        """The newest complete checkpoint of the job, or None (none yet, or unreadable: then start over)."""
        found = self.newest_with_ref(job_id)
        return found[0] if found is not None else None

    def newest_with_ref(self, job_id: str) -> tuple[DenoiseCheckpoint, dict] | None:
        """newest(), with the BlobRef the pointer names (to announce the checkpoint again)."""
        raw = self.blobs.read(job_id, POINTER)
        if raw is None:
            return None
        try:
            pointer = json.loads(raw)
            return from_bytes(self.blobs.get(pointer["checkpoint"])), pointer["checkpoint"]
        except (ValueError, KeyError, BlobError, CheckpointError) as exc:
            log.warning("job %s: newest checkpoint unusable (%s); starting from step 0", job_id, exc)
            return None


class CheckpointWriter:
    """Serialises and stores checkpoints on its own thread; the denoising loop only pays for a tensor copy.

    ``on_saved(ckpt, ref)`` runs on the writer thread after each save (the agent emits LatentCheckpointed there).
    A failed save is logged and skipped: the job goes on, it only resumes from an older step if it dies.
    """

    def __init__(self, store: CheckpointStore):
        self.store = store
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, ckpt: DenoiseCheckpoint, on_saved: Callable[[DenoiseCheckpoint, dict], None]) -> None:
        self._queue.put((ckpt, on_saved))

    def drain(self) -> None:
        """Wait until every submitted checkpoint is stored and announced."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            ckpt, on_saved = self._queue.get()
            try:
                with CHECKPOINT_WRITE_SECONDS.time():
                    ref = self.store.save(ckpt)
                on_saved(ckpt, ref)
            except Exception:  # noqa: BLE001 - see the class docstring
                log.exception("checkpoint of job %s at step %d not saved", ckpt.job_id, ckpt.step)
            finally:
                self._queue.task_done()

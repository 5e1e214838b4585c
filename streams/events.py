"""Building events: the fields every event carries, and event ids that survive redelivery.

A stage derives the id of what it emits from (job, stage, step/chunk/segment), so when a redelivered input makes
it emit the same logical event again, the copy has the same event_id and every reader can drop it.
"""
from __future__ import annotations

import time
import uuid

_EVENT_ID_NAMESPACE = uuid.UUID("6f1c1a52-8a3e-4f59-9a8e-2f3d6c1b7e10")


def now_ms() -> int:
    return int(time.time() * 1000)


def derive_event_id(job_id: str, stage: str, *parts: object) -> str:
    """Deterministic id of the event a stage emits for one job (and step, chunk, segment ... in ``parts``)."""
    name = "/".join([job_id, stage, *(str(p) for p in parts)])
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, name))


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_event(job_id: str, event_id: str | None = None, **fields) -> dict:
    """An event record: event_id (random unless given), job_id, timestamp (now), then the event's own fields."""
    return {"event_id": event_id or str(uuid.uuid4()), "job_id": job_id, "timestamp": now_ms(), **fields}


def dead_letter_event(stage: str, job_id: str, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes | None, headers: list[tuple[str, bytes]] | None, error_type: str,
                      error: str) -> dict:
    """A DeadLetter: the raw message, where it came from and why it could not be taken. Its id is derived from the
    stage and the source position, so a redelivered bad message yields the same letter."""
    where = f"{topic}/{partition}@{offset}"
    return new_event(
        job_id, derive_event_id(job_id, stage, "dead-letter", where),
        stage=stage, source_topic=topic, source_partition=partition, source_offset=offset,
        error_type=error_type, error=error, raw_key=key, raw_value=value,
        headers=[{"key": k, "value": v} for k, v in (headers or [])],
    )

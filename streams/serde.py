"""Where the codec meets the settings: the registry client and the event codec for a process, and message keys."""
from __future__ import annotations

from confluent_kafka.schema_registry import SchemaRegistryClient

from schemas.codec import EventCodec

from .settings import Settings
from .topics import value_schemas


def registry_client(settings: Settings) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": settings.require_registry(), **settings.schema_registry_client})


def event_codec(settings: Settings) -> EventCodec:
    # Schemas are registered up front by `vidgen broker` / `vidgen topics`; auto-registration stays on so a
    # stage rolled out with a new compatible schema version registers it (the registry rejects incompatible ones).
    return EventCodec(registry_client(settings), value_schemas())


def encode_key(job_id: str | None) -> bytes | None:
    return job_id.encode("utf-8") if job_id is not None else None


def decode_key(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace")

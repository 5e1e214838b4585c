"""Avro schemas of vidgen's events and their Confluent wire-format codec.

Each event has one ``<Name>.avsc`` beside this module. Shared named types (BlobRef, GenerationParams, Tier) live
in their own files and are referenced by full name; ``load_schema`` inlines them at first use so every schema
handed to a registry is self-contained (registries and other languages' clients need that).

Values on Kafka use the Confluent wire format (magic byte 0, 4-byte schema id, Avro body) through
confluent-kafka's ``SchemaRegistryClient``, ``AvroSerializer`` and ``AvroDeserializer``; the subject of a topic's
values is ``<topic>-value`` (TopicNameStrategy). Readers always decode with the schema this code was built with,
so data written with an older compatible version gets the new defaults.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.common._httpx_compat import httpx
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from fastavro.read import SchemaResolutionError

SCHEMA_DIR = Path(__file__).resolve().parent
NAMESPACE = "io.vidgen"

#: The events, in pipeline order. Each is a record schema in SCHEMA_DIR/<name>.avsc.
EVENT_NAMES = (
    "VideoRequested",
    "PromptEncoded",
    "StepProgress",
    "LatentCheckpointed",
    "LatentChunk",
    "VideoDecoded",
    "VideoFlagged",
    "VideoPublished",
    "JobCancelled",
    "JobFailed",
    "VideoDeleted",
    "DeadLetter",
    "StageStats",
    "AgentStatus",
    "Assignment",
    "SchedulerDecision",
    "QueuePosition",
    "QuotaClaim",
    "BlobsDeleted",
)

#: Named types shared by several events, each in its own file.
SHARED_TYPE_NAMES = ("BlobRef", "GenerationParams", "Tier")

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class DecodeError(ValueError):
    """The bytes are not a value this codec can read (bad framing, unknown schema id, incompatible writer schema)."""


class RegistryUnavailableError(RuntimeError):
    """The schema registry could not be asked; the message may be fine, so it must be retried, not dead-lettered."""


def _read_avsc(name: str, schema_dir: Path) -> dict:
    path = schema_dir / f"{name.rsplit('.', 1)[-1]}.avsc"
    if not path.exists():
        raise KeyError(f"no schema file {path.name} in {schema_dir}")
    return json.loads(path.read_text())


def _full_name(schema: dict, enclosing_namespace: str) -> str:
    name = schema["name"]
    if "." in name:
        return name
    return f"{schema.get('namespace', enclosing_namespace)}.{name}"


def _inline(schema: Any, namespace: str, defined: set[str], schema_dir: Path) -> Any:
    """Inline referenced named types at their first use; later uses stay references, as Avro requires."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        full = schema if "." in schema else f"{namespace}.{schema}"
        if full in defined:
            return full
        return _inline(_read_avsc(full, schema_dir), namespace, defined, schema_dir)
    if isinstance(schema, list):
        return [_inline(branch, namespace, defined, schema_dir) for branch in schema]
    if not isinstance(schema, dict):
        raise ValueError(f"not an Avro schema: {schema!r}")
    kind = schema["type"]
    if kind in ("record", "enum", "fixed"):
        full = _full_name(schema, namespace)
        if full in defined:
            return full
        defined.add(full)
        out = dict(schema)
        inner_ns = full.rsplit(".", 1)[0]
        if kind == "record":
            out["fields"] = [dict(f, type=_inline(f["type"], inner_ns, defined, schema_dir)) for f in schema["fields"]]
        return out
    if kind == "array":
        return dict(schema, items=_inline(schema["items"], namespace, defined, schema_dir))
    if kind == "map":
        return dict(schema, values=_inline(schema["values"], namespace, defined, schema_dir))
    return schema  # a primitive written as {"type": ..., "logicalType": ...}


def expand_schema_file(name: str, schema_dir: Path) -> dict:
    """The schema in ``schema_dir/<name>.avsc`` with the named types it references inlined from the same dir."""
    return _inline(_read_avsc(name, schema_dir), NAMESPACE, set(), schema_dir)


@functools.cache
def load_schema(name: str) -> dict:
    """The self-contained schema of an event or shared type, with shared named types inlined."""
    return expand_schema_file(name, SCHEMA_DIR)


def schema_str(name: str) -> str:
    return json.dumps(load_schema(name), separators=(",", ":"), sort_keys=True)


def value_subject(topic: str) -> str:
    return f"{topic}-value"


class EventCodec:
    """Encodes and decodes event values for topics, one (de)serializer per topic, created on first use.

    ``topic_schemas`` maps topic name → event name (the topic catalogue supplies it).
    """

    def __init__(self, registry: SchemaRegistryClient, topic_schemas: dict[str, str], auto_register: bool = True):
        self.registry = registry
        self.topic_schemas = topic_schemas
        self.auto_register = auto_register
        self._serializers: dict[str, AvroSerializer] = {}
        self._deserializers: dict[str, AvroDeserializer] = {}

    def schema_of(self, topic: str) -> str:
        try:
            return self.topic_schemas[topic]
        except KeyError:
            raise KeyError(f"topic {topic!r} is not in the topic catalogue") from None

    def encode(self, topic: str, value: dict) -> bytes:
        serializer = self._serializers.get(topic)
        if serializer is None:
            serializer = AvroSerializer(
                self.registry,
                schema_str(self.schema_of(topic)),
                conf={"auto.register.schemas": self.auto_register, "use.latest.version": not self.auto_register},
            )
            self._serializers[topic] = serializer
        try:
            return serializer(value, SerializationContext(topic, MessageField.VALUE))
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(f"schema registry unreachable: {exc}") from exc

    def decode(self, topic: str, data: bytes | None) -> dict:
        """The value as a dict, read with this code's schema for the topic.

        Raises DecodeError for bytes no registry could make sense of, RegistryUnavailableError when the registry
        could not be reached (retry later: the message may be valid).
        """
        if not data:
            raise DecodeError("empty value")
        if data[0] != 0 or len(data) < 5:
            raise DecodeError(f"not Confluent wire format (magic byte {data[0]:#04x}, {len(data)} bytes)")
        deserializer = self._deserializers.get(topic)
        if deserializer is None:
            deserializer = AvroDeserializer(self.registry, schema_str(self.schema_of(topic)))
            self._deserializers[topic] = deserializer
        try:
            value = deserializer(data, SerializationContext(topic, MessageField.VALUE))
        except SchemaRegistryError as exc:
            if exc.http_status_code is not None and 400 <= exc.http_status_code < 500:
                schema_id = int.from_bytes(data[1:5], "big")
                raise DecodeError(f"schema id {schema_id} unknown to the registry: {exc}") from exc
            raise RegistryUnavailableError(f"schema registry failed while decoding {topic}: {exc}") from exc
        except (SerializationError, SchemaResolutionError, ValueError, TypeError, EOFError, IndexError, KeyError,
                UnicodeDecodeError, OverflowError) as exc:
            # OverflowError: a timestamp-millis outside years 1..9999 (datetime cannot hold it).
            # fastavro raises many kinds on corrupt bodies or writer/reader schemas that do not resolve.
            raise DecodeError(f"cannot read value as {self.schema_of(topic)}: {type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(f"schema registry unreachable: {exc}") from exc
        if not isinstance(value, dict):
            raise DecodeError(f"value is not a record: {type(value).__name__}")
        return value

    def register_all(self) -> dict[str, int]:
        """Register every topic's value schema up front (vidgen broker / vidgen topics do this); subject → id."""
        ids = {}
        for topic, event_name in self.topic_schemas.items():
            ids[value_subject(topic)] = self.registry.register_schema(
                value_subject(topic), Schema(schema_str(event_name), "AVRO")
            )
        return ids

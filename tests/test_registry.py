"""schemas.registry_server against the real confluent-kafka SchemaRegistryClient and Avro (de)serializers."""
from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas.registry_server import (
    IncompatibleSchemaError,
    RegistryStateError,
    SchemaRegistryServer,
    SchemaStore,
)

TOPIC = "vidgen.requested"
SUBJECT = f"{TOPIC}-value"
VALUE = SerializationContext(TOPIC, MessageField.VALUE)


def job_schema(*extra_fields: dict[str, Any]) -> str:
    return json.dumps(
        {
            "type": "record",
            "name": "VideoRequested",
            "namespace": "io.vidgen",
            "fields": [{"name": "job_id", "type": "string"}, {"name": "frames", "type": "int"}, *extra_fields],
        }
    )


V1 = job_schema()
V2_WITH_DEFAULT = job_schema({"name": "fps", "type": "int", "default": 24})
V2_WITHOUT_DEFAULT = job_schema({"name": "fps", "type": "int"})
RECORD = {"job_id": "job-1", "frames": 48}


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "registry" / "schemas.json"


@pytest.fixture
def registry(state_path: Path) -> Iterator[SchemaRegistryServer]:
    server = SchemaRegistryServer(state_path)
    server.start()
    yield server
    server.stop()


def client(server: SchemaRegistryServer) -> SchemaRegistryClient:
    """A fresh client each time: the client caches ids, and these tests are about what the server answers."""
    return SchemaRegistryClient({"url": server.url})


def serialize(server: SchemaRegistryServer, schema: str, value: dict[str, Any], **conf: Any) -> bytes:
    return AvroSerializer(client(server), schema, conf=conf or None)(value, VALUE)


def schema_id_of(wire: bytes) -> int:
    magic, schema_id = struct.unpack(">bI", wire[:5])
    assert magic == 0
    return schema_id


def assert_registry_error(exc_info: pytest.ExceptionInfo[SchemaRegistryError], status: int, code: int) -> None:
    assert (exc_info.value.http_status_code, exc_info.value.error_code) == (status, code), exc_info.value


def test_values_round_trip_in_confluent_wire_format(registry: SchemaRegistryServer) -> None:
    wire = serialize(registry, V1, RECORD)

    assert schema_id_of(wire) == client(registry).lookup_schema(SUBJECT, Schema(V1)).schema_id
    assert AvroDeserializer(client(registry))(wire, VALUE) == RECORD
    assert AvroDeserializer(client(registry), V1)(wire, VALUE) == RECORD


def test_the_same_schema_keeps_its_id_across_registrations_formatting_and_subjects(
    registry: SchemaRegistryServer,
) -> None:
    first = client(registry).register_schema_full_response(SUBJECT, Schema(V1))
    again = client(registry).register_schema_full_response(SUBJECT, Schema(json.dumps(json.loads(V1), indent=4)))
    other_subject = client(registry).register_schema_full_response("vidgen.archive-value", Schema(V1))

    assert (again.schema_id, again.version) == (first.schema_id, first.version) == (1, 1)
    assert (other_subject.schema_id, other_subject.version) == (first.schema_id, 1)
    assert client(registry).get_subjects_by_schema_id(first.schema_id) == ["vidgen.archive-value", SUBJECT]
    assert client(registry).get_versions(SUBJECT) == [1]


def test_serializers_that_only_look_up_find_registered_schemas_and_fail_clearly_otherwise(
    registry: SchemaRegistryServer,
) -> None:
    registered_id = client(registry).register_schema(SUBJECT, Schema(V1))

    for normalize in (False, True):
        wire = serialize(registry, V1, RECORD, **{"auto.register.schemas": False, "normalize.schemas": normalize})
        assert schema_id_of(wire) == registered_id
    with pytest.raises(SchemaRegistryError) as not_registered:
        serialize(registry, V2_WITH_DEFAULT, RECORD, **{"auto.register.schemas": False})
    assert_registry_error(not_registered, 404, 40403)


def test_an_incompatible_version_is_refused_with_409_and_nothing_is_stored(
    registry: SchemaRegistryServer, state_path: Path
) -> None:
    serialize(registry, V1, RECORD)
    state_before = state_path.read_text()

    with pytest.raises(SchemaRegistryError) as refused:
        client(registry).register_schema(SUBJECT, Schema(V2_WITHOUT_DEFAULT))

    assert_registry_error(refused, 409, 409)
    assert "'fps'" in refused.value.error_message
    assert client(registry).get_versions(SUBJECT) == [1]
    assert state_path.read_text() == state_before
    with pytest.raises(SchemaRegistryError) as lookup:
        client(registry).lookup_schema(SUBJECT, Schema(V2_WITHOUT_DEFAULT))
    assert_registry_error(lookup, 404, 40403)


def test_a_compatible_version_is_added_and_old_data_reads_with_the_new_defaults(
    registry: SchemaRegistryServer,
) -> None:
    old_wire = serialize(registry, V1, RECORD)

    v2 = client(registry).register_schema_full_response(SUBJECT, Schema(V2_WITH_DEFAULT))

    assert v2.version == 2 and v2.schema_id != schema_id_of(old_wire)
    latest = client(registry).get_latest_version(SUBJECT)
    assert (latest.version, latest.schema_id) == (2, v2.schema_id)
    assert AvroDeserializer(client(registry), V2_WITH_DEFAULT)(old_wire, VALUE) == {**RECORD, "fps": 24}
    reading_latest = AvroDeserializer(client(registry), conf={"use.latest.version": True})
    assert reading_latest(old_wire, VALUE) == {**RECORD, "fps": 24}


def test_a_restart_on_the_same_state_file_serves_the_same_ids(registry: SchemaRegistryServer, state_path: Path) -> None:
    old_wire = serialize(registry, V1, RECORD)
    v2_id = client(registry).register_schema(SUBJECT, Schema(V2_WITH_DEFAULT))
    registry.stop()

    with SchemaRegistryServer(state_path) as restarted:
        assert AvroDeserializer(client(restarted))(old_wire, VALUE) == RECORD
        assert client(restarted).register_schema(SUBJECT, Schema(V2_WITH_DEFAULT)) == v2_id
        assert client(restarted).get_versions(SUBJECT) == [1, 2]
        v3 = Schema(job_schema({"name": "x", "type": "long"}))
        third = client(restarted).register_schema("vidgen.other-value", v3)
        assert third == v2_id + 1  # ids are never handed out twice


def test_unknown_ids_subjects_and_versions_answer_with_confluent_error_codes(registry: SchemaRegistryServer) -> None:
    client(registry).register_schema(SUBJECT, Schema(V1))

    with pytest.raises(SchemaRegistryError) as unknown_id:
        AvroDeserializer(client(registry))(b"\x00" + struct.pack(">I", 4242) + b"\x02", VALUE)
    assert_registry_error(unknown_id, 404, 40403)
    with pytest.raises(SchemaRegistryError) as unknown_subject:
        client(registry).get_versions("nope-value")
    assert_registry_error(unknown_subject, 404, 40401)
    with pytest.raises(SchemaRegistryError) as unknown_version:
        client(registry).get_version(SUBJECT, 7)
    assert_registry_error(unknown_version, 404, 40402)
    with pytest.raises(SchemaRegistryError) as deleting:
        client(registry).delete_subject(SUBJECT)
    assert_registry_error(deleting, 405, 405)


def test_invalid_and_non_avro_schemas_are_refused_with_42201(registry: SchemaRegistryServer) -> None:
    with pytest.raises(SchemaRegistryError) as invalid:
        client(registry).register_schema(SUBJECT, Schema('{"type": "record", "name": "Broken"'))
    assert_registry_error(invalid, 422, 42201)
    with pytest.raises(SchemaRegistryError) as protobuf:
        client(registry).register_schema(SUBJECT, Schema('syntax = "proto3";', schema_type="PROTOBUF"))
    assert_registry_error(protobuf, 422, 42201)
    assert "AVRO" in protobuf.value.error_message


def test_compatibility_endpoint_and_levels(registry: SchemaRegistryServer) -> None:
    registry_client = client(registry)
    registry_client.register_schema(SUBJECT, Schema(V1))

    assert registry_client.test_compatibility(SUBJECT, Schema(V2_WITH_DEFAULT))
    assert not registry_client.test_compatibility(SUBJECT, Schema(V2_WITHOUT_DEFAULT), version=1, verbose=True)
    assert not registry_client.test_compatibility_all_versions(SUBJECT, Schema(V2_WITHOUT_DEFAULT))
    assert registry_client.get_compatibility() == "BACKWARD"

    registry_client.set_compatibility(SUBJECT, "NONE")
    assert registry_client.get_compatibility(SUBJECT) == "NONE"
    assert registry_client.register_schema_full_response(SUBJECT, Schema(V2_WITHOUT_DEFAULT)).version == 2

    registry_client.set_compatibility(SUBJECT, "FORWARD")
    dropped_frames = json.dumps({**json.loads(V1), "fields": json.loads(V1)["fields"][:1]})
    assert not registry_client.test_compatibility(SUBJECT, Schema(dropped_frames))
    registry_client.delete_config(SUBJECT)
    assert registry_client.get_compatibility() == "BACKWARD"
    with pytest.raises(SchemaRegistryError) as bad_level:
        registry_client.set_compatibility(level="SIDEWAYS")
    assert_registry_error(bad_level, 422, 42203)


def test_subject_names_are_url_decoded(registry: SchemaRegistryServer) -> None:
    odd_subject = "team/a b%c-value"

    registered = client(registry).register_schema_full_response(odd_subject, Schema(V1))

    assert client(registry).get_latest_version(odd_subject).schema_id == registered.schema_id
    assert odd_subject in client(registry).get_subjects()


def test_the_store_works_without_http_and_writes_atomically(state_path: Path) -> None:
    store = SchemaStore(state_path)
    first = store.register(SUBJECT, json.loads(V1))

    with pytest.raises(IncompatibleSchemaError) as refused:
        store.register(SUBJECT, V2_WITHOUT_DEFAULT)
    assert refused.value.report.messages and "'fps'" in refused.value.report.messages[0]
    assert store.lookup(SUBJECT, V1) == first
    assert SchemaStore(state_path).get_by_id(first.schema.id) == first.schema
    assert [path.name for path in state_path.parent.iterdir()] == [state_path.name]  # no temp files left behind

    state_path.write_text("{ torn")
    with pytest.raises(RegistryStateError, match="schemas.json"):
        SchemaStore(state_path)


def test_concurrent_registrations_of_one_schema_share_one_id(registry: SchemaRegistryServer) -> None:
    subjects = [f"topic-{index}-value" for index in range(8)]

    with ThreadPoolExecutor(max_workers=len(subjects)) as pool:
        ids = list(pool.map(lambda subject: client(registry).register_schema(subject, Schema(V1)), subjects))

    assert set(ids) == {1}
    assert client(registry).get_subjects() == sorted(subjects)


def test_a_busy_port_is_reported_at_start(registry: SchemaRegistryServer, tmp_path: Path) -> None:
    port = int(registry.url.rsplit(":", 1)[1])

    with pytest.raises(RuntimeError, match=f"could not start on 127.0.0.1:{port}"):
        SchemaRegistryServer(tmp_path / "other.json", port=port).start()

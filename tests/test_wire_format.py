"""Every event survives the Confluent wire format through the registry, and bad bytes are told apart."""
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from schemas.codec import EVENT_NAMES, DecodeError, EventCodec, RegistryUnavailableError
from streams.topics import CATALOGUE, value_schemas
from tests.samples import sample_events


def _topic_of(event_name: str) -> str:
    return next(t.name for t in CATALOGUE if t.value_schema == event_name)


@pytest.fixture
def codec(registry_url):
    return EventCodec(SchemaRegistryClient({"url": registry_url}), value_schemas())


def test_samples_cover_every_event_and_every_topic_has_a_schema():
    assert set(sample_events()) == set(EVENT_NAMES)
    assert {t.value_schema for t in CATALOGUE} == set(EVENT_NAMES)


@pytest.mark.parametrize("event_name", EVENT_NAMES)
def test_round_trip(codec, event_name):
    event = sample_events()[event_name]
    topic = _topic_of(event_name)
    data = codec.encode(topic, event)
    assert data[0] == 0  # Confluent magic byte, then a 4-byte schema id
    schema_id = int.from_bytes(data[1:5], "big")
    assert codec.registry.get_schema(schema_id).schema_str
    decoded = codec.decode(topic, data)
    assert _millis(decoded) == event


def test_an_image_to_video_request_names_its_image_blob_in_every_stage_s_params(codec):
    from producers.requests import video_request
    from tests.samples import BLOB, sample_events

    image = {**BLOB, "uri": "file:///var/vidgen/blobs/j1/input-0123456789abcdef.png", "shape": [],
             "dtype": "image/png"}
    request = video_request("the scene comes to life", job_id="j1", input_reference=image)
    assert _millis(codec.decode("vidgen.requested", codec.encode("vidgen.requested", request))) == request
    encoded = {**sample_events()["PromptEncoded"], "params": request["params"]}  # the params travel on unchanged
    topic = _topic_of("PromptEncoded")
    assert codec.decode(topic, codec.encode(topic, encoded))["params"]["input_reference"] == image


def _millis(value):
    """Decoded timestamps (datetimes, also inside nested records) back to the milliseconds they were written as."""
    if isinstance(value, dict):
        return {key: _millis(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_millis(item) for item in value]
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else value


def test_register_all_gives_one_id_per_schema(codec):
    ids = codec.register_all()
    assert len(ids) == len(CATALOGUE)
    encoded_ids = {ids[f"vidgen.encoded.{tier}-value"] for tier in ("premium", "standard", "free")}
    assert len(encoded_ids) == 1  # the three tier topics share the PromptEncoded schema
    assert len(set(ids.values())) == len(EVENT_NAMES)


@pytest.mark.parametrize("garbage", [b"", b"not avro at all", b"\x00\x00", b"\x00\x00\x00\x7f\xff\x02\x03",
                                     b"\x01\x00\x00\x00\x01abc"])
def test_garbage_is_a_decode_error(codec, garbage):
    with pytest.raises(DecodeError):
        codec.decode("vidgen.requested", garbage)


def test_an_event_of_another_schema_does_not_decode_as_a_request(codec):
    data = codec.encode("vidgen.step-progress", sample_events()["StepProgress"])
    with pytest.raises(DecodeError):
        codec.decode("vidgen.requested", data)


def test_truncated_body_is_a_decode_error(codec):
    data = codec.encode("vidgen.requested", sample_events()["VideoRequested"])
    with pytest.raises(DecodeError):
        codec.decode("vidgen.requested", data[:12])


def test_unreachable_registry_is_not_the_messages_fault(registry_url):
    good = EventCodec(SchemaRegistryClient({"url": registry_url}), value_schemas())
    data = good.encode("vidgen.requested", sample_events()["VideoRequested"])
    dead = EventCodec(SchemaRegistryClient({"url": "http://127.0.0.1:9", "max.retries": 0}), value_schemas())
    with pytest.raises(RegistryUnavailableError):
        dead.decode("vidgen.requested", data)

import json
import os

import pytest

from streams.kafka import TANSU_WORKAROUNDS, admin_config, consumer_config, producer_config
from streams.settings import SettingsError, load_settings


def test_kafka_passthrough_reaches_every_client(tmp_path):
    env = {"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_KAFKA_BOOTSTRAP": "kafka-1:9093,kafka-2:9093",
           "VIDGEN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIDGEN_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "VIDGEN_KAFKA_SASL_USERNAME": "vidgen", "VIDGEN_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem"}
    settings = load_settings(env)
    assert not settings.embedded
    for conf in (producer_config(settings), consumer_config(settings, "vidgen.x")):
        assert conf["bootstrap.servers"] == "kafka-1:9093,kafka-2:9093"
        assert conf["security.protocol"] == "SASL_SSL"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
        assert conf["ssl.ca.location"] == "/etc/ca.pem"
    # Tansu workarounds stay off a real cluster.
    assert "session.timeout.ms" not in consumer_config(settings, "g")


def test_settings_file_and_env_precedence(tmp_path):
    settings_file = tmp_path / "vidgen.toml"
    settings_file.write_text(
        '[kafka]\nbootstrap = "file-kafka:9092"\n[kafka.client]\n"security.protocol" = "SSL"\n'
        '[schema_registry]\nurl = "http://registry:8081"\n[models]\n"wan2.1-1.3b" = "/models/wan"\n'
    )
    env = {"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_SETTINGS": str(settings_file),
           "VIDGEN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIDGEN_MODELS": "local=/models/local"}
    settings = load_settings(env)
    assert settings.kafka_bootstrap == "file-kafka:9092"
    assert settings.kafka_client["security.protocol"] == "SASL_SSL"  # the environment wins
    assert settings.schema_registry_url == "http://registry:8081"
    assert settings.model_dirs == {"wan2.1-1.3b": "/models/wan", "local": "/models/local"}


def test_embedded_platform_file_is_used_only_while_its_process_lives(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"pid": os.getpid(), "kafka_bootstrap": "127.0.0.1:1234", "schema_registry_url": "http://127.0.0.1:5"}
    (run_dir / "platform.json").write_text(json.dumps(record))
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path)})
    assert settings.embedded and settings.kafka_bootstrap == "127.0.0.1:1234"
    assert consumer_config(settings, "g")["session.timeout.ms"] == TANSU_WORKAROUNDS["session.timeout.ms"]
    for config in (consumer_config(settings, "g"), producer_config(settings), admin_config(settings)):
        assert config["enable.metrics.push"] is False  # Tansu has no telemetry; librdkafka would keep asking
    cluster = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_KAFKA_BOOTSTRAP": "kafka:9092"})
    assert "enable.metrics.push" not in consumer_config(cluster, "g")  # a real cluster keeps librdkafka's default

    record["pid"] = 2**22 + 12345  # no such process: a stale file from a killed broker
    (run_dir / "platform.json").write_text(json.dumps(record))
    stale = load_settings({"VIDGEN_VAR_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="VIDGEN_KAFKA_BOOTSTRAP"):
        stale.require_kafka()


def test_bad_model_list_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="name=/path"):
        load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_MODELS": "just-a-path"})


def test_agent_group_settings(tmp_path):
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_MODEL_DEVICES": "wan-14b=2, big=4",
                              "VIDGEN_PARALLEL_MODE": "Ulysses", "VIDGEN_GROUP_TIMEOUT_S": "30"})
    assert settings.model_devices == {"wan-14b": 2, "big": 4}
    assert settings.parallel_mode == "ulysses" and settings.group_timeout_s == 30.0
    defaults = load_settings({"VIDGEN_VAR_DIR": str(tmp_path)})
    assert defaults.model_devices == {} and defaults.parallel_mode == "auto" and defaults.group_timeout_s == 120.0
    for bad in ({"VIDGEN_MODEL_DEVICES": "wan-14b"}, {"VIDGEN_MODEL_DEVICES": "wan=0"},
                {"VIDGEN_MODEL_DEVICES": "wan=two"}, {"VIDGEN_PARALLEL_MODE": "tensor"},
                {"VIDGEN_GROUP_TIMEOUT_S": "0"}):
        with pytest.raises(SettingsError):
            load_settings({"VIDGEN_VAR_DIR": str(tmp_path), **bad})

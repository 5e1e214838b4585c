"""Kafka client settings and the few Kafka helpers shared by every process: the admin calls and topic creation.

Defaults aim at any Apache Kafka 3.x cluster. The embedded Tansu broker has defects that only client settings can
work around (see ../shared/KNOWN-FACTS.md); those live in TANSU_WORKAROUNDS and apply only when the embedded
broker is in use. Settings passed through by the user (VIDGEN_KAFKA_*, [kafka.client]) win over both.
"""
from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .settings import Settings
from .topics import ARCHIVED, Topic

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # events carry blob references; this only leaves room for DLQ raw bytes

PRODUCER_DEFAULTS = {
    "acks": "all",
    "enable.idempotence": True,  # no duplicates or reordering from producer retries
    "linger.ms": 1,  # events are small and latency matters more than batching (progress bars)
    "partitioner": "consistent_random",  # librdkafka's default, named: key_partition() relies on it
    "message.max.bytes": MAX_MESSAGE_BYTES,
}

CONSUMER_DEFAULTS = {
    "enable.auto.commit": False,  # offsets are committed by the stage runtime after outputs are flushed
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "fetch.max.bytes": MAX_MESSAGE_BYTES,
    "receive.message.max.bytes": MAX_MESSAGE_BYTES + 1024 * 1024,
    # fetch.wait.max.ms stays librdkafka's 500: a Kafka broker answers a waiting fetch as soon as a record arrives
    # (fetch.min.bytes 1), so the wait bounds only an idle reader's round trips, never a record's latency.
}

#: Tansu (the embedded broker) holds a group join for session.timeout.ms / 2, so a short session makes joins fast.
#: Never static membership on Tansu. Its other defect — a waiting fetch is answered only when its wait is over, new
#: records or not — is handled per reader: see Latency.
TANSU_WORKAROUNDS = {
    "session.timeout.ms": 6000,
    # Each heartbeat costs the broker ~0.7 ms; every 2 s (a third of the session, as Kafka advises) saved 0.0035
    # cores at rest but added a second to every rebalance after a restart (the suite's restart fixtures: +25 s).
    "heartbeat.interval.ms": 1000,
}
#: ... and for every client (consumers, producers, admin): Tansu offers no telemetry subscription (KIP-714), and
#: librdkafka asks for one again every few seconds per client.
TANSU_CLIENT_WORKAROUNDS = {
    "enable.metrics.push": False,
}


class Latency:
    """How soon a reader must see a new record, by what it reads for: names of its fetch wait on the embedded broker
    (``settings.fetch_waits_ms``, defaults in streams/settings.py EMBEDDED_FETCH_WAITS_MS, VIDGEN_EMBEDDED_FETCH_WAITS_MS).

    On Tansu a fetch waits its whole fetch.wait.max.ms even when records arrive (KNOWN-FACTS.md), so the wait *is*
    the reader's latency, and every fetch costs the broker CPU for each partition it names (measured: one idle
    reader of all ~110 partitions of the catalogue keeps 0.24 of a core busy at a 20 ms wait, 0.04 at 250 ms, 0.01 at
    1 s). So each reader waits as long as its purpose allows, and only there. On a Kafka cluster none of this is
    applied (the broker answers a fetch when data arrives).
    """

    #: Step progress → the gateway's websockets (p99 ≤ 30 ms end to end): only while the gateway has jobs in flight.
    PROGRESS = "progress"
    #: The scheduler's orders → an idle agent; the agents' reports → a scheduler with jobs waiting.
    ORDERS = "orders"
    #: A running job's hop from one stage to the next (request → encoder → scheduler, chunk → decoder, video →
    #: compliance) and its cancellation.
    PIPELINE = "pipeline"
    #: What nobody waits for: the archiver, the tracker's states, the lifecycle, the scheduler's lease, an idle
    #: gateway's or agent's readers.
    BACKGROUND = "background"


def key_partition(key: str, partitions: int) -> int:
    """The partition a keyed record goes to: librdkafka's ``consistent_random`` partitioner (CRC32 of the key),
    which PRODUCER_DEFAULTS names, so a reader of one key's records can read that partition alone."""
    return zlib.crc32(key.encode("utf-8")) % partitions


def client_config(settings: Settings) -> dict:
    return {"bootstrap.servers": settings.require_kafka(), **(TANSU_CLIENT_WORKAROUNDS if settings.embedded else {})}


def producer_config(settings: Settings, client_id: str = "vidgen") -> dict:
    conf = {**client_config(settings), **PRODUCER_DEFAULTS, "client.id": client_id}
    conf.update(settings.kafka_client)
    # Consumer-only keys given through the shared pass-through would make librdkafka warn on every producer.
    for key in ("session.timeout.ms", "heartbeat.interval.ms", "fetch.wait.max.ms", "max.poll.interval.ms"):
        conf.pop(key, None)
    return conf


def consumer_config(settings: Settings, group_id: str, client_id: str = "vidgen",
                    latency: str = Latency.PIPELINE) -> dict:
    """A consumer's settings; ``latency`` (a ``Latency``) names its fetch wait on the embedded broker."""
    conf = {**client_config(settings), **CONSUMER_DEFAULTS, "group.id": group_id, "client.id": client_id}
    if settings.embedded:
        conf.update(TANSU_WORKAROUNDS)
        conf["fetch.wait.max.ms"] = settings.fetch_waits_ms[latency]
    conf.update(settings.kafka_client)
    for key in ("acks", "enable.idempotence", "linger.ms"):
        conf.pop(key, None)
    return conf


def admin_config(settings: Settings) -> dict:
    conf = {**client_config(settings), **settings.kafka_client}
    for key in list(conf):
        if (key in PRODUCER_DEFAULTS or key in CONSUMER_DEFAULTS or key in TANSU_WORKAROUNDS
                or key in ("max.poll.interval.ms", "fetch.wait.max.ms")):
            conf.pop(key)
    return conf


def ensure_topics(settings: Settings, topics: tuple[Topic, ...] = ARCHIVED, timeout_s: float = 30.0,
                  at_least: dict[str, int] | None = None) -> list[str]:
    """Create the catalogue's topics (and the tracker's state topics, so that the archiver's subscription finds them
    from the start) that do not exist yet; returns the names created. ``at_least``: more partitions for some topics
    than the catalogue asks (an archive of a broker made when the catalogue asked more, restored into a new one).

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
            NewTopic(t.name, num_partitions=max(t.partitions, (at_least or {}).get(t.name, 0)), replication_factor=-1, config=topic_config(t))
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


def topic_config(topic: Topic) -> dict[str, str]:
    if topic.compacted:
        return {"cleanup.policy": "compact"}
    return {"retention.ms": str(topic.retention_ms)}


class SwitchingConsumer:
    """Assigned partitions (no group) read at a fetch wait that may change: one consumer per latency class, all
    assigned, all but the current one paused. A switch pauses the current consumer and resumes the other at the
    positions reached, so it costs nothing (a new consumer's first fetch takes ~0.25 s on the embedded broker), and a
    paused consumer sends no fetches."""

    def __init__(self, settings: Settings, group_id: str, client_id: str, latencies: Iterable[str],
                 extra: dict | None = None):
        from confluent_kafka import Consumer

        self.consumers, self.fetch_waits_s = {}, {}
        for latency in dict.fromkeys(latencies):
            conf = {**consumer_config(settings, group_id, client_id, latency), **(extra or {})}
            self.consumers[latency] = Consumer(conf)
            self.fetch_waits_s[latency] = int(conf.get("fetch.wait.max.ms", 500)) / 1000.0
        self.latency = next(iter(self.consumers))

    @property
    def consumer(self):
        return self.consumers[self.latency]

    def assign(self, partitions: list, latency: str) -> None:
        self.latency = latency
        for name, consumer in self.consumers.items():
            consumer.assign(partitions)
            if name != latency:
                consumer.pause(partitions)

    def switch(self, latency: str, positions: list) -> None:
        """Go on reading at ``latency`` from ``positions`` (TopicPartitions with the next offsets)."""
        if latency == self.latency:
            return
        self.consumer.pause(positions)
        self.latency = latency
        self.consumer.resume(positions)
        for tp in positions:
            self.consumer.seek(tp)  # also drops what this consumer fetched before it was paused

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()


class TopicFollower:
    """Reads every partition of one topic outside any consumer group (nothing is committed): what a process uses to
    see all of a topic — the control topic's cancellations, the scheduler's orders, the agents' reports.

    ``start="beginning"`` reads the whole topic; ``start="end"`` only what arrives from now on. The end is the
    high watermark the broker reports (on the embedded broker it can fall a few records short of the true end,
    which only means reading them too: followers filter what they read anyway). ``caught_up()`` polls until
    everything that was on the topic when it was called has been read, for a reader that must know it missed
    nothing (an agent before it finishes a job).

    ``latency`` (a ``Latency``) may be a function, asked at every poll, answering one of ``latencies``: the follower
    then reads at that fetch wait from exactly where it was (a SwitchingConsumer: an agent reads cancellations at a
    pipeline hop's latency while it runs a job, and once a second while it is idle).
    """

    def __init__(self, settings: Settings, topic: Topic, client_id: str, start: str = "beginning",
                 timeout_s: float = 10.0, latency: str | Callable[[], str] = Latency.PIPELINE,
                 key: str | None = None, latencies: tuple[str, ...] = ()):
        """``key``: read only the partition of the records with this key (an agent's orders)."""
        from confluent_kafka import TopicPartition

        if start not in ("beginning", "end"):
            raise ValueError(f"start must be 'beginning' or 'end', got {start!r}")
        self.settings, self.topic = settings, topic.name
        self.wanted_latency = latency if callable(latency) else (lambda: latency)
        first = self.wanted_latency()
        self.reader = SwitchingConsumer(settings, f"{client_id}.{topic.name}", client_id, (first, *latencies),
                                        {"enable.partition.eof": True})
        self.consumer = self.reader.consumer
        metadata = self.consumer.list_topics(topic.name, timeout=timeout_s)
        if metadata.topics[topic.name].error is not None:
            raise KafkaException(metadata.topics[topic.name].error)
        partitions = sorted(metadata.topics[topic.name].partitions)
        if key is not None:
            partitions = [key_partition(key, len(partitions))]
        self.next: dict[int, int] = {}
        for p in partitions:
            # Real offsets, never a logical one: a switch of fetch wait (SwitchingConsumer) seeks the other consumer
            # to these, and a seek to "the beginning" would read a partition's history again, after an offset
            # lookup of its own.
            low, high = self.consumer.get_watermark_offsets(TopicPartition(topic.name, p), timeout=timeout_s,
                                                            cached=False)
            self.next[p] = high if start == "end" else low
        self.reader.assign([TopicPartition(topic.name, p, offset) for p, offset in self.next.items()], first)

    @property
    def fetch_wait_s(self) -> float:
        return self.reader.fetch_waits_s[self.reader.latency]

    def _follow_latency(self) -> None:
        from confluent_kafka import TopicPartition

        wanted = self.wanted_latency()
        if wanted != self.reader.latency:
            self.reader.switch(wanted, [TopicPartition(self.topic, p, offset) for p, offset in self.next.items()])
            self.consumer = self.reader.consumer

    def poll(self, timeout_s: float = 0.0):
        """The next message, or None (nothing new, an end-of-partition notice, or an error, which is logged)."""
        from confluent_kafka import KafkaError

        self._follow_latency()
        msg = self.consumer.poll(timeout_s)
        if msg is None:
            return None
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("reading %s: %s", self.topic, msg.error())
            return None
        self.next[msg.partition()] = msg.offset() + 1
        return msg

    def seek(self, msg) -> None:
        """Read ``msg`` again on the next poll."""
        from confluent_kafka import TopicPartition

        self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        self.next[msg.partition()] = msg.offset()

    def caught_up(self, handle, timeout_s: float = 5.0, partitions: Iterable[int] | None = None) -> bool:
        """Poll (passing each message to ``handle``) until everything on every partition (or on ``partitions``: a
        reader whose messages are keyed alike needs only theirs) when it was called has been read; False if that
        took longer than ``timeout_s``.

        The end is the larger of two high watermarks: the one a ListOffsets request reports, and the one the
        consumer's own fetches report, read once a fetch sent after the call has come back (two fetch waits). A
        broker whose ListOffsets answer can fall short of the end (the embedded one answers the newest batch's base
        offset + 1) is still read to its true end by the second."""
        from confluent_kafka import TopicPartition

        started = time.monotonic()
        deadline = started + timeout_s
        # Only the embedded broker needs the second watermark (a Kafka cluster's ListOffsets answer is the end), and
        # a fetch wait there is short; a cluster's idle fetch would take its whole 500 ms wait to come back.
        settled = started + (2 * self.fetch_wait_s if self.settings.embedded else 0.0)
        wanted = list(self.next if partitions is None else partitions)
        try:
            ends = {p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s,
                                                           cached=False)[1] for p in wanted}
        except KafkaException as exc:
            log.warning("reading %s: no high watermark: %s", self.topic, exc)
            return False
        fetched = False
        while not fetched or any(self.next[p] < end for p, end in ends.items() if end > 0):
            if time.monotonic() > deadline:
                return False
            if not fetched and time.monotonic() >= settled:
                fetched = True
                for p in wanted:
                    cached = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
                    if cached is not None:
                        ends[p] = max(ends[p], cached[1])
            msg = self.poll(0.005)
            if msg is not None:
                handle(msg)
        return True

    def read_to_end(self, handle, timeout_s: float = 60.0) -> int:
        """Read from the current position to the end (every partition's end-of-partition notice); returns how many
        messages were read."""
        from confluent_kafka import KafkaError

        pending, count = set(self.next), 0
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {self.topic} to its end took more than {timeout_s} s")
            msg = self.consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                else:
                    log.warning("reading %s: %s", self.topic, msg.error())
                continue
            self.next[msg.partition()] = msg.offset() + 1
            handle(msg)
            count += 1
        return count

    def close(self) -> None:
        self.reader.close()

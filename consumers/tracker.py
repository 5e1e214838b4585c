"""job-tracker: a faust app that folds every lifecycle topic into a job-state table the gateway reads.

Consumes the topics in ``consumers.job_state.FOLDED_TOPICS`` (requests, the three tier queues, step progress,
checkpoints, latent chunks, decoded segments, flags, publications, failures, cancellations, cancel requests and
the scheduler's queue positions on vidgen.queue).
Keeps table ``job_state``: job_id → ``JobState.to_dict()`` (JSON), whose changelog topic ``CHANGELOG_TOPIC`` holds
every state change keyed by job_id. Emits vidgen.dead-letter for bytes it cannot decode.

Co-partitioning. A faust table may only be updated from a stream whose partitions are the table's partitions (its
changelog partition is the partition of the event being processed), but the lifecycle topics have 3, 6 and 12
partitions. So the app runs in two hops:

  1. agent ``forward`` reads every lifecycle topic (raw bytes), decodes each value with the project's EventCodec
     and re-publishes it, keyed by job_id, on the tracker's own topic ``TRACKER_EVENTS_TOPIC``
     ({"topic": source topic, "event": event as JSON}); faust creates that topic with ``TRACKER_PARTITIONS``
     partitions at start-up (sized once: some brokers, the embedded Tansu among them, cannot add partitions);
  2. agent ``fold_into_table`` reads that topic and folds each event into the table, which has the same
     partition count, so every job's state lives on exactly one partition.

A GlobalTable would avoid the hop but make every worker fold every event and hold every job; the re-keyed topic
keeps the work partitioned, lets more tracker workers share it, and the decoding (and dead-lettering) happens once.
The hop costs no ordering: events of a job on one source topic stay in order, and the fold does not depend on the
order between topics (consumers/job_state.py).

Delivery is at-least-once (faust flushes its producer before it commits a source offset), so a restart or a
rebalance replays some events; the fold is idempotent, and an event that changes nothing writes nothing. The table
is in memory and rebuilt from its changelog at start-up. Settings come from ``faust_settings``: the Tansu
workarounds of KNOWN-FACTS.md (6 s session, 1 s heartbeat, producer batches of one record so that faust's
end-offset look-up during table recovery is exact) apply only on the embedded broker, as in streams/kafka.py.

Other processes read the states with ``read_job_states`` / ``JobStateReader``: the changelog from the beginning to
its end, latest value per job (Tansu never compacts, so readers fold "latest by key" themselves).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

import faust
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import DecodeError, RegistryUnavailableError
from streams import topics
from streams.events import dead_letter_event as streams_dead_letter_event
from streams.kafka import Latency, consumer_config
from streams.serde import decode_key, encode_key, event_codec
from streams.settings import Settings

from .job_state import FOLDED_TOPICS, JobState, fold, jsonable_event

log = logging.getLogger(__name__)

APP_ID = "vidgen.tracker"  # also the consumer group, and the prefix of faust's own topics
TABLE_NAME = "job_state"
#: Where the forward agent re-keys every decoded lifecycle event; the table is partitioned like it.
TRACKER_EVENTS_TOPIC = topics.TRACKER_EVENTS.name
TRACKER_PARTITIONS = topics.TRACKER_EVENTS.partitions
#: Only a hop, but it must outlive a tracker outage: as long as the lifecycle topics keep their events.
TRACKER_EVENTS_RETENTION_S = topics.REQUESTED.retention_ms / 1000
#: faust's name for the table's changelog: every state change, key job_id (UTF-8), value JobState JSON.
CHANGELOG_TOPIC = f"{APP_ID}-{TABLE_NAME}-changelog"
assert CHANGELOG_TOPIC == topics.TRACKER_CHANGELOG.name, "the catalogue names the changelog the archive keeps"
STAGE_NAME = "tracker"  # as dead letters name the stage that rejected a message

REGISTRY_RETRY_S = (0.2, 1.0, 5.0)

#: Embedded-broker (Tansu) settings faust has no librdkafka name for: with one record per produce batch, the
#: broker's wrong "latest offset" (base offset of the last batch + 1) is right, and table recovery reads exactly
#: to the end of the changelog. Costs throughput only, so real clusters keep faust's batching.
TANSU_FAUST_WORKAROUNDS = {"producer_max_batch_size": 1}


def faust_settings(settings: Settings) -> dict:
    """faust.App settings: at-least-once, no web server, and the client settings every vidgen consumer uses."""
    # The effective librdkafka consumer settings (defaults, Tansu workarounds, the user's pass-through), translated
    # to the faust names that exist; faust cannot take the others (it runs aiokafka).
    client = consumer_config(settings, APP_ID)
    conf = {
        "processing_guarantee": "at_least_once",  # exactly_once needs aiokafka transactions (not on Tansu)
        "web_enabled": False,  # nothing to serve; the gateway reads the changelog
        "consumer_auto_offset_reset": client.get("auto.offset.reset", "earliest"),
        "store": "memory://",  # rebuilt from the changelog at every start
        "datadir": str(settings.var_dir / "tracker"),
        "topic_partitions": TRACKER_PARTITIONS,
        "table_standby_replicas": 0,  # one state per job is enough: recovery from the changelog is quick
    }
    if "session.timeout.ms" in client:
        conf["broker_session_timeout"] = int(client["session.timeout.ms"]) / 1000
    if "heartbeat.interval.ms" in client:
        conf["broker_heartbeat_interval"] = int(client["heartbeat.interval.ms"]) / 1000
    if settings.embedded:
        conf.update(TANSU_FAUST_WORKAROUNDS)
    return conf


def broker_urls(settings: Settings) -> list[str]:
    return [f"kafka://{host.strip()}" for host in settings.require_kafka().split(",") if host.strip()]


def build_tracker_app(settings: Settings, loop: asyncio.AbstractEventLoop | None = None) -> faust.App:
    codec = event_codec(settings)
    app = faust.App(APP_ID, broker=broker_urls(settings), loop=loop, **faust_settings(settings))

    sources = app.topic(*(t.name for t in FOLDED_TOPICS), key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
    # Keys stay bytes (UTF-8 job ids) end to end: faust serialises table keys by type, and bytes are written raw,
    # so the changelog's keys read like every other vidgen topic's.
    tracker_events = app.topic(TRACKER_EVENTS_TOPIC, partitions=TRACKER_PARTITIONS, internal=True,
                               retention=TRACKER_EVENTS_RETENTION_S, key_type=bytes, key_serializer="raw",
                               value_serializer="json")
    dead_letters = app.topic(topics.DEAD_LETTER.name, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw")
    table = app.Table(TABLE_NAME, partitions=TRACKER_PARTITIONS, key_type=bytes)  # values: JSON dicts

    async def decode(message) -> dict | None:
        """The event, or None once undecodable bytes are dead-lettered; waits out an unreachable registry."""
        attempt = 0
        while True:
            try:
                # Synchronous, but the codec caches schemas by id, so only a new schema costs a registry call.
                return codec.decode(message.topic, message.value)
            except DecodeError as exc:
                log.warning("tracker: dead letter from %s/%s@%s: %s", message.topic, message.partition,
                            message.offset, exc)
                try:
                    await dead_letters.send(key=message.key, value=codec.encode(
                        topics.DEAD_LETTER.name, dead_letter_event(message, str(exc))))
                except Exception:  # noqa: BLE001 - losing a dead letter must not stop the tracker
                    log.exception("tracker: could not send the dead letter")
                return None
            except RegistryUnavailableError as exc:  # not the message's fault: never dead-letter a valid event
                attempt += 1
                log.warning("tracker: %s (retry %d)", exc, attempt)
                await asyncio.sleep(REGISTRY_RETRY_S[min(attempt, len(REGISTRY_RETRY_S)) - 1])

    @app.agent(sources)
    async def forward(stream):
        async for source in stream.events():
            event = await decode(source.message)
            if event is None:
                continue
            # Not source.forward(): that attaches the send to the next commit (seconds); at-least-once holds anyway
            # because faust flushes its producer before committing the source offset.
            await tracker_events.send(key=encode_key(event["job_id"]), headers=source.message.headers,
                                      value={"topic": source.message.topic,
                                             "event": bounded_strings(jsonable_event(event))})

    @app.agent(tracker_events)
    async def fold_into_table(stream):
        async for key, forwarded in stream.items():
            current = table.get(key)
            try:
                state = fold(None if current is None else JobState.from_dict(current), forwarded["topic"],
                             forwarded["event"])
            except Exception:  # noqa: BLE001 - an event the fold cannot take (a defect upstream) must not stop it
                log.exception("tracker: cannot fold a %s event of job %s", forwarded.get("topic"), key)
                continue
            new = state.to_dict()
            if new != current:  # a duplicate changes nothing and writes nothing to the changelog
                table[key] = new

    return app


#: Longest text the tracker keeps of any field: a job state is for following a job, and a 1 MB prompt (refused by the
#: prompt encoder anyway) would exceed the producer's message size on the way to the table and stall the tracker.
MAX_FORWARDED_CHARS = 10_000


def bounded_strings(value):
    """The value with every string longer than MAX_FORWARDED_CHARS cut (and the cut said)."""
    if isinstance(value, str) and len(value) > MAX_FORWARDED_CHARS:
        return value[:MAX_FORWARDED_CHARS] + f"... [{len(value) - MAX_FORWARDED_CHARS} more characters]"
    if isinstance(value, dict):
        return {key: bounded_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [bounded_strings(item) for item in value]
    return value


def changelog_topic_name(app: faust.App) -> str:
    """The job-state table's changelog topic as faust names it (``CHANGELOG_TOPIC`` for the tracker app)."""
    return app.tables[TABLE_NAME].changelog_topic.get_topic_name()


def dead_letter_event(message, error: str) -> dict:
    """A DeadLetter for a faust message the tracker cannot decode (fields as streams.runtime writes them)."""
    return streams_dead_letter_event(STAGE_NAME, "", message.topic, message.partition, message.offset, message.key,
                                     message.value, message.headers, "DECODE", error)


def run_tracker(settings: Settings) -> int:
    """Run the tracker worker until SIGTERM/SIGINT (faust's worker handles both: it commits and leaves the group)."""
    from streams.metrics import serve_metrics

    serve_metrics(settings.metrics_port, settings.metrics_host)  # the process's own metrics; the table's progress is in faust's logs
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = build_tracker_app(settings, loop=loop)
    # override_logging=False: the caller (the CLI) has configured logging already; quiet: no banner on stdout.
    worker = faust.Worker(app, loop=loop, quiet=True, override_logging=False, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# -- reading the states from another process -------------------------------------------------------------------------
class JobStateReader:
    """Follows the tracker's changelog and keeps the latest state of every job (what the gateway serves).

    Reads without a consumer group (assign, not subscribe: a reader must not take partitions from anyone), from the
    beginning. The end of a partition is where the fetch high-watermark says (a PARTITION_EOF), never a "latest"
    ListOffsets look-up, which the embedded broker answers wrongly (KNOWN-FACTS.md).
    """

    def __init__(self, settings: Settings, on_change: Callable[[str, dict | None], None] | None = None,
                 client_id: str = "vidgen.tracker-reader", latency: str = Latency.PIPELINE):
        """``on_change(job_id, state)`` is called for every state change read (None: the job was deleted), e.g. to
        push updates to a job's websocket subscribers."""
        conf = consumer_config(settings, group_id=client_id, client_id=client_id,  # group.id is never joined
                               latency=latency)
        conf["enable.partition.eof"] = True
        self.consumer = Consumer(conf)
        self.on_change = on_change
        self.states: dict[str, dict] = {}
        self._at_end: dict[int, bool] = {}  # partition → at its end now
        self._loaded: set[int] = set()  # partitions read to their end at least once

    def _assign(self) -> bool:
        """Assign the changelog's partitions once it exists (the tracker creates it at its first start)."""
        if self._at_end:
            return True
        metadata = self.consumer.list_topics(timeout=10).topics.get(CHANGELOG_TOPIC)
        if metadata is None or not metadata.partitions:
            return False
        partitions = sorted(metadata.partitions)
        self.consumer.assign([TopicPartition(CHANGELOG_TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        self._at_end = {p: False for p in partitions}
        return True

    def catch_up(self, timeout_s: float = 10.0) -> dict[str, dict]:
        """Read the changelog to its end as fetched so far; job_id → JobState dict.

        The first call returns once every partition has been read to its end (raises TimeoutError if that takes
        longer than ``timeout_s``); later calls take what has been fetched since, without waiting for more.
        """
        deadline = time.monotonic() + timeout_s
        if not self._assign():
            return self.states  # no tracker has run yet: no states
        while True:
            at_end = all(self._at_end.values())
            msg = self.consumer.poll(0 if at_end else 0.2)
            if msg is None:
                if at_end:
                    return self.states
            elif msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    self._at_end[msg.partition()] = True
                    self._loaded.add(msg.partition())
                else:
                    log.warning("tracker reader: %s", msg.error())
            else:
                self._at_end[msg.partition()] = False
                self._apply(msg.key(), msg.value())
            if time.monotonic() > deadline:
                if len(self._loaded) == len(self._at_end):
                    return self.states  # changes keep coming: what was read is as fresh as it gets
                raise TimeoutError(f"the changelog {CHANGELOG_TOPIC} was not read to its end in {timeout_s} s")

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        job_id = decode_key(key)
        if job_id is None:
            return
        state = None if value is None else json.loads(value)  # None: a tombstone, the job left the table
        if state is None:
            self.states.pop(job_id, None)
        else:
            self.states[job_id] = state
        if self.on_change is not None:
            self.on_change(job_id, state)

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> "JobStateReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_job_states(settings: Settings, timeout_s: float = 10.0) -> dict[str, dict]:
    """Every job's latest state (JobState dicts; ``job_state.to_public`` makes the gateway's view of one)."""
    with JobStateReader(settings) as reader:
        return reader.catch_up(timeout_s)


def main() -> int:
    """`python -m consumers.tracker`: run the tracker with the settings from the environment."""
    from streams.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return run_tracker(load_settings())


if __name__ == "__main__":
    raise SystemExit(main())

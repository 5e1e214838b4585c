"""Following jobs from the event log: the progress subscriber behind `vidgen submit --follow`.

Reads the lifecycle topics (and the scheduler's queue positions) without a consumer group (a follower must not take
partitions from anyone) from a point shortly before the job was submitted, and hands each of the job's events to a
callback until one of them ends the job. Positions come from timestamps, never from "latest" offsets (unreliable
on the embedded broker).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from consumers.audit import is_terminal as _ends_job
from schemas.codec import DecodeError
from streams import topics
from streams.kafka import Latency, SwitchingConsumer
from streams.serde import event_codec
from streams.settings import Settings

LIFECYCLE = (
    topics.REQUESTED,
    *topics.ENCODED.values(),
    topics.STEP_PROGRESS,
    topics.LATENT_CHUNKS,
    topics.DECODED,
    topics.FLAGGED,
    topics.PUBLISHED,
    topics.FAILED,
    topics.CANCELLED,
)
#: Records a reader takes from its consumer at once (and puts in time order).
BATCH = 500
#: What `vidgen submit --follow` reads: the lifecycle and the scheduler's queue positions of waiting jobs.
FOLLOWED = (*LIFECYCLE, topics.QUEUE)


@dataclass
class JobEvent:
    topic: str
    event: dict
    partition: int = 0
    offset: int = 0
    headers: list[tuple[str, bytes]] | None = None


def is_terminal(job_event: JobEvent) -> bool:
    """Whether the event ends its job: a publication, a failure, a cancellation, or a VideoFlagged whose
    ``ends_job`` is true (a BLOCK, or a REVIEW the platform holds); a REVIEW flag the job goes on from does not.
    The one rule, shared with the audit (``consumers.audit.is_terminal``, on a topic name and an event)."""
    return _ends_job(job_event.topic, job_event.event)


def read_events(settings: Settings, since_ms: int | None = None, lifecycle: Iterable[topics.Topic] = LIFECYCLE,
                poll_s: float = 0.1, skip_before_ms: int | None = None,
                latency: str | Callable[[], str] = Latency.PROGRESS,
                latencies: tuple[str, ...] = ()) -> Iterable[JobEvent]:
    """Every decodable event on the lifecycle topics from ``since_ms`` (or the beginning), as it arrives.

    ``skip_before_ms``: records stamped earlier are skipped before decoding (a long-running reader such as the
    gateway's, whose partitions without a record since ``since_ms`` are read from their start).
    ``latency``: how soon a new event must be seen (a Latency: the fetch wait on the embedded broker), or a function asked
    every ``poll_s`` that answers one of ``latencies``: the reader then goes on at that fetch wait from exactly where
    it was (the gateway's reader waits a second while it has no job in flight and a progress bar's latency while it
    has; streams.kafka.SwitchingConsumer).
    """
    codec = event_codec(settings)
    wanted = latency if callable(latency) else (lambda: latency)
    reader = SwitchingConsumer(settings, "vidgen.follow", "vidgen", (wanted(), *latencies))  # a group.id, never joined
    consumer = reader.consumer
    try:
        partitions = []
        metadata = consumer.list_topics(timeout=10)
        for t in lifecycle:
            for p in metadata.topics[t.name].partitions:
                partitions.append(TopicPartition(t.name, p, since_ms if since_ms is not None else OFFSET_BEGINNING))
        if since_ms is not None:
            # No record at or after the time: read the partition from its start (filtered by job anyway) rather
            # than trust an "end" offset, which the embedded broker reports wrongly.
            partitions = [
                tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING)
                for tp in consumer.offsets_for_times(partitions, timeout=10)
            ]
        positions = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        reader.assign(partitions, reader.latency)
        while True:
            if wanted() != reader.latency:  # another fetch wait, from the positions reached
                reader.switch(wanted(), [TopicPartition(t, p, offset) for (t, p), offset in positions.items()])
                consumer = reader.consumer
            first = consumer.poll(poll_s)  # (consume() would wait for a whole batch or the timeout)
            batch = [msg for msg in ([first, *consumer.consume(BATCH, 0)] if first is not None else [])
                     if not msg.error()]
            if not batch:
                yield None  # lets callers check their deadline
                continue
            # One fetch brings records of several topics in partition order; in the order they were made, a job's
            # events read as they happened (its request before its first step before its checkpoint).
            batch.sort(key=lambda msg: msg.timestamp()[1])
            for msg in batch:
                positions[(msg.topic(), msg.partition())] = msg.offset() + 1
                if skip_before_ms is not None and 0 <= msg.timestamp()[1] < skip_before_ms:
                    continue
                try:
                    event = codec.decode(msg.topic(), msg.value())
                except DecodeError:
                    continue  # dead-lettered by the stages; a follower just skips it
                yield JobEvent(msg.topic(), event, msg.partition(), msg.offset(), msg.headers())
    finally:
        reader.close()


def follow_job(settings: Settings, job_id: str, on_event: Callable[[JobEvent], None], submitted_ms: int,
               timeout_s: float = 600.0, lifecycle: Iterable[topics.Topic] = FOLLOWED) -> JobEvent:
    """Call ``on_event`` for each of the job's events (on ``lifecycle``: by default the lifecycle and the queue
    positions) until its terminal event, which is returned."""
    deadline = time.monotonic() + timeout_s
    for job_event in read_events(settings, since_ms=submitted_ms - 5000, lifecycle=lifecycle):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")
        if job_event is None or job_event.event.get("job_id") != job_id:
            continue
        on_event(job_event)
        if is_terminal(job_event):
            return job_event
    raise RuntimeError("event stream ended")  # read_events never ends on its own


class EventLog:
    """Every event on the given topics, collected by a background reader: what tests and benchmarks inspect."""

    def __init__(self, settings: Settings, lifecycle: Iterable[topics.Topic] = (
            *LIFECYCLE, topics.LATENT_CHECKPOINTED, topics.CONTROL, topics.DEAD_LETTER)):
        self.events: list[JobEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(settings, tuple(lifecycle)), daemon=True)
        self._thread.start()

    def _read(self, settings: Settings, lifecycle: tuple[topics.Topic, ...]) -> None:
        for job_event in read_events(settings, lifecycle=lifecycle, poll_s=0.02):
            if self._stop.is_set():
                return
            if job_event is not None:
                with self._lock:
                    self.events.append(job_event)

    def on(self, topic: topics.Topic) -> list[dict]:
        with self._lock:
            return [e.event for e in self.events if e.topic == topic.name]

    def of(self, job_id: str, topic: topics.Topic | None = None) -> list[dict]:
        with self._lock:
            return [e.event for e in self.events
                    if e.event.get("job_id") == job_id and (topic is None or e.topic == topic.name)]

    def terminal(self, job_id: str) -> list[tuple[str, dict]]:
        """The job's terminal events as (topic, event): exactly one once it has ended."""
        with self._lock:
            return [(e.topic, e.event) for e in self.events if e.event.get("job_id") == job_id and is_terminal(e)]

    def wait_for(self, predicate: Callable[["EventLog"], object], timeout_s: float = 120.0, what: str = "") -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = predicate(self)
            if result:
                return result
            time.sleep(0.01)
        raise TimeoutError(f"timed out after {timeout_s} s waiting for {what or predicate}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

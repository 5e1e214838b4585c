"""The stage runtime: consume → decode → dedupe → handle → produce → flush → mark → commit, once, for every stage.

Delivery is at-least-once: an input's offset is committed only after everything its handler emitted has been
acknowledged by the broker, and the dedupe ledger is marked in between, so a redelivered input is skipped (or, if
the crash came before the mark, handled again with identical event ids). Bad input never stops a stage:
undecodable bytes go to vidgen.dead-letter with the raw bytes and where they came from; readable but invalid
events go there too and fail their job with the reason. SIGTERM/SIGINT finish the current message, commit, and
leave the group.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.codec import DecodeError, EventCodec, RegistryUnavailableError

from . import topics
from .blobs import BlobStore, BlobStoreUnavailable, open_blob_store
from .events import dead_letter_event, derive_event_id, new_event
from .kafka import consumer_config, producer_config
from .ledger import ProcessedLedger
from .metrics import BusyMeter, LagMonitor, gpu_utilization, instance_id, register_stage_counters, serve_metrics
from .offsets import OffsetTracker
from .serde import decode_key, encode_key, event_codec
from .settings import Settings
from .stage import CancelledByRequest, InvalidEvent, JobInterrupted, NotDue, SourceMessage, Stage, StageContext
from .tracing import consume_span, current_trace_headers

log = logging.getLogger(__name__)

HANDLER_ATTEMPTS = 3  # tries of a handler that raises something other than InvalidEvent
RETRY_BACKOFF_S = (0.2, 1.0, 5.0)
MAX_DEAD_LETTER_RAW = 1024 * 1024  # raw bytes kept in a dead letter; the rest is cut (and the cut is noted)
TICK_S = 1.0  # how often a handler's tick() runs between inputs


@dataclass
class StageCounters:
    consumed: int = 0
    handled: int = 0
    emitted: int = 0
    deduplicated: int = 0
    dead_lettered: int = 0
    failed_jobs: int = 0
    cancelled: int = 0
    interrupted: int = 0
    retries: int = 0
    handle_seconds: float = 0.0


@dataclass
class Outcome:
    """What handling one input came to, for settling it."""

    msg: Message
    dedupe_key: str | None = None  # None: nothing to mark (undecodable input)
    ctx: StageContext | None = None
    interrupted: bool = False
    why_interrupted: str = ""  # the JobInterrupted message (the scheduler's REQUEUED reason)
    failed_job: str | None = None  # the job this input's dead letter failed
    due_s: float | None = None  # NotDue: the input waits until then, its partition paused


class DueTimes:
    """Partitions paused because their next input is not due yet (NotDue): the input's offset, and when it is due."""

    def __init__(self) -> None:
        self._due: dict[tuple[str, int], tuple[float, int]] = {}

    def __contains__(self, tp: tuple[str, int]) -> bool:
        return tp in self._due

    def wait(self, tp: tuple[str, int], offset: int, due_s: float) -> None:
        self._due[tp] = (due_s, offset)

    def due(self, now_s: float) -> list[tuple[str, int, int]]:
        """(topic, partition, offset of the waiting input) of the partitions whose time has come; they no longer
        wait."""
        ready = sorted((*tp, offset) for tp, (due_s, offset) in self._due.items() if due_s <= now_s)
        for topic, partition, _offset in ready:
            del self._due[(topic, partition)]
        return ready

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """A rebalance took them away: their new owner starts from the committed position, unpaused."""
        for tp in partitions:
            self._due.pop(tp, None)


class DeliveryFailed(RuntimeError):
    pass


#: How long a stage waits for its next input before it looks at its deferred inputs, its tick and whether it must
#: stop: an input ends the wait as it arrives, so only those wait this long. Each beat costs an idle process CPU.
IDLE_BEAT_S = 0.25

class StageRuntime:
    def __init__(self, stage: Stage, settings: Settings, blobs: BlobStore | None = None,
                 codec: EventCodec | None = None, client_id: str | None = None):
        self.stage = stage
        self.settings = settings
        self.blobs = blobs or open_blob_store(settings)
        self.codec = codec or event_codec(settings)
        self.client_id = client_id or f"{stage.name}"
        self.counters = StageCounters()
        self.ledger = ProcessedLedger(self.blobs, stage.name, settings.restore_window_ms, wait=self._sleep)
        self.offsets = OffsetTracker()
        self.stopping = threading.Event()
        self.handler = None
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._delivery_errors: list[str] = []
        #: job_id → JobCancelled request, for stages that follow the control topic
        self.cancellations: OrderedDict[str, dict] = OrderedDict()
        self.lag = LagMonitor(stage.name)
        self.busy = BusyMeter()
        self._handling_since: float | None = None  # perf_counter when the current handler call began
        self._next_report = time.monotonic() + settings.stats_interval_s
        self.due_times = DueTimes()
        self._next_tick = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            log.info("%s: %s received, finishing the current message", self.stage.name, signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def connect(self) -> None:
        self.handler = self.stage.build(self.settings, self.blobs)
        if serve_metrics(self.settings.metrics_port, self.settings.metrics_host):
            register_stage_counters(self.stage.name, self.counters)
        self.producer = Producer(producer_config(self.settings, self.client_id))
        conf = consumer_config(self.settings, self.stage.group_id, self.client_id, self.stage.latency)
        if self.settings.stats_interval_s or self.settings.metrics_port:
            # The lag comes from librdkafka's own statistics (high watermark − committed), not offset look-ups.
            conf["statistics.interval.ms"] = int(1000 * min(self.settings.stats_interval_s or 5.0, 5.0))
            conf["stats_cb"] = self.lag.on_stats
        self.consumer = Consumer(conf)
        self.consumer.subscribe([t.name for t in self.stage.consumes], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("%s: consuming %s", self.stage.name, ", ".join(t.name for t in self.stage.consumes))

    def poll(self, timeout_s: float) -> Message | None:
        """The next input, or None (nothing yet, or a consumer error, which is logged)."""
        msg = self.consumer.poll(timeout_s)
        self.report_stats()
        if msg is None:
            self.producer.poll(0)
            return None
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("%s: consumer error: %s", self.stage.name, msg.error())
            return None
        return msg

    def poll_waiting(self, max_messages: int) -> list[Message]:
        """Inputs already fetched and waiting, without blocking: what a batching stage adds to a polled one."""
        if max_messages <= 0:
            return []
        waiting = self.consumer.consume(num_messages=max_messages, timeout=0)
        for msg in waiting:
            if msg.error() and msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("%s: consumer error: %s", self.stage.name, msg.error())
        return [msg for msg in waiting if not msg.error()]

    def run(self) -> StageCounters:
        self.connect()
        # A handler with a prepare() hook sees up to batch_size waiting inputs at once (the prompt encoder encodes
        # them in one forward pass); a lone input is never held back waiting for company.
        batch_size = getattr(self.handler, "batch_size", 1) if hasattr(self.handler, "prepare") else 1
        try:
            while not self.stopping.is_set():
                self.resume_due()
                self.tick()
                msg = self.poll(IDLE_BEAT_S)
                if msg is None or self._waiting(msg):
                    continue
                if batch_size > 1:
                    self.process_batch([msg, *self.poll_waiting(batch_size - 1)])
                else:
                    self.process(msg)
        finally:
            self.close()
        return self.counters

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(30)
            self.producer.close()  # its connections go now, not whenever the object is collected
            self.producer = None
        if self.consumer is not None:
            self._commit(asynchronous=False)
            self.consumer.close()  # leaves the group, so partitions move at once
            self.consumer = None
        log.info("%s: stopped %s", self.stage.name, json.dumps(asdict(self.counters)))

    def _on_assign(self, consumer, partitions):
        log.info("%s: assigned %s", self.stage.name, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer, partitions):
        revoked = {(p.topic, p.partition) for p in partitions}
        self._commit(asynchronous=False, only=revoked)
        lost_units = self.offsets.forget(revoked)
        self.due_times.forget(revoked)
        if lost_units and hasattr(self.handler, "forget"):
            self.handler.forget(lost_units)  # the new owner replays their inputs from the committed position
        log.info("%s: revoked %s", self.stage.name, sorted(revoked))

    # -- one message -----------------------------------------------------------------------------------------
    def process(self, msg: Message) -> None:
        """Handle one input on this thread and settle it: the synchronous path of short stages."""
        self.offsets.started((msg.topic(), msg.partition()), msg.offset())
        # An exception here (stopping mid-retry) leaves the input pending: committed below it, redelivered later.
        self.settle(self.execute(msg))

    def process_batch(self, msgs: list[Message]) -> None:
        """Let the handler prepare the batch's fresh events together, then handle and settle each one as process()
        does: preparing is only an optimisation, so every input keeps its own retries, dead letter and commit."""
        events = [self._decode(msg) for msg in msgs]
        fresh = [event for event in events
                 if event is not None and not self.ledger.seen(self.stage.dedupe_key(event))]
        if fresh:
            try:
                self.handler.prepare(fresh)
            except Exception:  # noqa: BLE001 - each event is handled (and fails, if it must) on its own below
                log.exception("%s: preparing a batch of %d failed; handling them one by one", self.stage.name,
                              len(fresh))
        for msg, event in zip(msgs, events):
            if self._waiting(msg):
                continue  # behind an input of its partition that is not due: fetched again after it
            self.offsets.started((msg.topic(), msg.partition()), msg.offset())
            self.settle(self.execute(msg, decoded=(event,)))

    def execute(self, msg: Message, stop_reason: Callable[[], str | None] | None = None,
                decoded: tuple[dict | None] | None = None,
                confirm: Callable[[], str | None] | None = None) -> "Outcome":
        """Decode, dedupe and handle one input, and flush what it emitted. Touches no offsets, so a long job can
        run it on a worker thread while the consumer thread keeps polling. ``decoded`` carries the event when the
        caller decoded it already (a batch)."""
        self.counters.consumed += 1
        outcome = Outcome(msg)
        event = self._decode(msg) if decoded is None else decoded[0]
        if event is None:
            return outcome
        outcome.dedupe_key = self.stage.dedupe_key(event)
        if self.ledger.seen(outcome.dedupe_key):
            self.counters.deduplicated += 1
            return outcome
        source = SourceMessage(msg.topic(), msg.partition(), msg.offset(), decode_key(msg.key()))
        with consume_span(self.stage.name, msg.topic(), msg.headers()):
            try:
                outcome.ctx, interrupted = self._handle_with_retries(msg, event, source, stop_reason, confirm)
            except NotDue as not_due:
                outcome.due_s = not_due.due_s
                return outcome
            outcome.interrupted, outcome.why_interrupted = interrupted is not None, interrupted or ""
        if outcome.ctx is None and not outcome.interrupted:  # dead-lettered, which fails the job it names
            outcome.failed_job = event.get("job_id") or None
        return outcome

    def settle(self, outcome: "Outcome") -> None:
        """After execute: mark the input done in the ledger and let its offset be committed (unless it is held
        for a unit still in progress, or its job was interrupted and must be resumed by the next owner)."""
        msg, ctx = outcome.msg, outcome.ctx
        tp = (msg.topic(), msg.partition())
        if outcome.interrupted:
            return  # stays pending: the committed position stays below it
        if outcome.due_s is not None:
            self._wait_until_due(msg, outcome.due_s)
            return  # stays pending too, and comes again when due
        if ctx is not None and ctx.held:
            for key in ctx.held:
                self.offsets.hold(key, tp, msg.offset(), outcome.dedupe_key)
        else:
            if outcome.dedupe_key is not None:
                self.ledger.mark(outcome.dedupe_key)
            self.offsets.done(tp, msg.offset())
        for key in ctx.released if ctx is not None else ():
            self._release(key)  # their outputs were flushed with this input's
        if outcome.failed_job:
            # Nothing will complete the inputs held for a failed job: pinned, they would hold back the partition's
            # committed position until a restart, and then be replayed only to fail again.
            self._release(outcome.failed_job)
            if hasattr(self.handler, "abandon"):
                self.handler.abandon(outcome.failed_job)
        self._commit(asynchronous=True)

    # -- inputs that are not due yet (NotDue) ------------------------------------------------------------------
    def _wait_until_due(self, msg: Message, due_s: float) -> None:
        """Pause the input's partition and rewind it to the input, which is fetched again once resumed."""
        where = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self.due_times.wait((msg.topic(), msg.partition()), msg.offset(), due_s)
        self.consumer.pause([where])
        self._seek(where)
        log.debug("%s: %s/%d@%d waits until %.0f", self.stage.name, msg.topic(), msg.partition(), msg.offset(), due_s)

    def _seek(self, where: TopicPartition) -> None:
        try:
            self.consumer.seek(where)
        except KafkaException as exc:  # resume_due() rewinds once more; a failed seek never stops the stage
            log.warning("%s: rewinding %s/%d to %d failed: %s", self.stage.name, where.topic, where.partition,
                        where.offset, exc)

    def _waiting(self, msg: Message) -> bool:
        """An input of a paused partition, fetched before it paused: dropped, the rewind fetches it again."""
        return (msg.topic(), msg.partition()) in self.due_times

    def resume_due(self) -> None:
        """Resume the partitions whose waiting input is due, rewound to it (again: nothing of them ran since)."""
        ready = [TopicPartition(*waiting) for waiting in self.due_times.due(time.time())]
        for where in ready:
            self._seek(where)
        if ready:
            self.consumer.resume(ready)

    def tick(self) -> None:
        """About every TICK_S, the handler's periodic work (``tick(ctx)``, streams/stage.py), then a flush."""
        if not hasattr(self.handler, "tick") or time.monotonic() < self._next_tick:
            return
        self._next_tick = time.monotonic() + TICK_S
        ctx = StageContext(self.stage.name, SourceMessage("", -1, -1, None), self.blobs, self._emit,
                           flush=self._flush)
        try:
            self.handler.tick(ctx)
            self._flush()
        except Exception as exc:  # noqa: BLE001 - periodic work is tried again; it never takes the stage down
            self._flush_quietly()
            log.warning("%s: periodic work failed (tried again later): %s: %s", self.stage.name,
                        type(exc).__name__, exc)

    def _release(self, hold_key: str) -> None:
        for held_dedupe_key in self.offsets.release(hold_key):
            self.ledger.mark(held_dedupe_key)

    def _decode(self, msg: Message) -> dict | None:
        attempt = 0
        while True:
            try:
                return self.codec.decode(msg.topic(), msg.value())
            except DecodeError as exc:
                self.dead_letter(msg, "DECODE", str(exc))
                return None
            except RegistryUnavailableError as exc:
                # Not the message's fault: wait for the registry rather than dead-letter a valid event.
                attempt += 1
                log.warning("%s: %s (retry %d)", self.stage.name, exc, attempt)
                if self._sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]):
                    raise SystemExit(f"{self.stage.name}: stopping while the schema registry is unreachable")

    def _handle_with_retries(self, msg: Message, event: dict, source: SourceMessage,
                             stop_reason: Callable[[], str | None] | None,
                             confirm: Callable[[], str | None] | None = None) -> tuple[StageContext | None, str | None]:
        """(context of the successful try or None, why the job was interrupted or None)"""
        headers = current_trace_headers()
        attempt, store_retries = 0, 0
        while attempt < HANDLER_ATTEMPTS:
            attempt += 1
            ctx = StageContext(self.stage.name, source, self.blobs, self._emit, headers=headers,
                               stop_reason=stop_reason or (lambda: None),
                               confirm=confirm or stop_reason or (lambda: None), flush=self._flush)
            started = self._handling_since = time.perf_counter()
            try:
                if ctx.stop_reason() == "cancelled":
                    raise CancelledByRequest()  # still queued when its cancellation arrived
                self.handler.handle(event, ctx)
                self._flush()
                self.counters.handled += 1
                return ctx, None
            except NotDue:
                raise  # not a failure: execute() lets the input wait
            except JobInterrupted as exc:
                self._flush_quietly()  # its checkpoint and progress are worth keeping
                return None, str(exc)
            except CancelledByRequest as exc:
                self.end_cancelled(event, exc.step, headers)
                return ctx, None
            except InvalidEvent as exc:
                self._flush_quietly()
                self.dead_letter(msg, "INVALID", str(exc), event)
                return None, None
            except BlobStoreUnavailable as exc:
                # Not the job's fault: wait for the store (as for the registry) instead of failing the job.
                self._flush_quietly()
                store_retries = store_retries + 1
                log.warning("%s: %s (job %s waits, retry %d)", self.stage.name, exc, event.get("job_id"),
                            store_retries)
                if self._sleep(RETRY_BACKOFF_S[min(store_retries, len(RETRY_BACKOFF_S)) - 1]):
                    return None, ""  # stopping: the input stays pending for the next owner
                attempt -= 1  # a try the store spoiled is not one of the job's attempts
                continue
            except Exception as exc:  # noqa: BLE001 - a stage must survive any one bad job
                self._flush_quietly()
                if attempt == HANDLER_ATTEMPTS:
                    log.exception("%s: giving up on %s after %d attempts", self.stage.name, event.get("job_id"), attempt)
                    self.dead_letter(msg, "HANDLER", f"{type(exc).__name__}: {exc}", event, attempts=attempt)
                    return None, None
                self.counters.retries += 1
                log.warning("%s: attempt %d for job %s failed: %s", self.stage.name, attempt, event.get("job_id"), exc)
                if self._sleep(RETRY_BACKOFF_S[attempt - 1]):
                    return None, ""  # stopping: leave the job to the next owner (why: the runtime's own stop)
            finally:
                self.counters.handle_seconds += time.perf_counter() - started
                self._handling_since = None
        return None, None

    def end_cancelled(self, event: dict, step: int | None, headers: list) -> None:
        """The terminal event of a job stopped by a JobCancelled request."""
        request = self.cancellations.get(event["job_id"], {})
        self._emit(topics.CANCELLED, new_event(
            event["job_id"], derive_event_id(event["job_id"], self.stage.name, "cancelled"),
            reason=request.get("reason", ""), requested_by=request.get("requested_by", ""),
            stage=self.stage.name, stopped_at_step=step,
        ), event["job_id"], headers)
        self._flush()
        self.counters.cancelled += 1

    def report_stats(self) -> None:
        """Every stats_interval_s: a StageStats event with this process's lag per partition and busy share."""
        if not self.settings.stats_interval_s or time.monotonic() < self._next_report:
            return
        self._next_report = time.monotonic() + self.settings.stats_interval_s
        since = self._handling_since
        busy_total = self.counters.handle_seconds + (time.perf_counter() - since if since is not None else 0.0)
        busy, interval = self.busy.fraction(busy_total)
        report = new_event("", f"{instance_id()}-{time.time_ns()}", stage=self.stage.name, instance=instance_id(),
                           interval_s=interval, lag=self.lag.snapshot(), busy_fraction=busy,
                           gpu_utilization=gpu_utilization(), **self.stats_fields())
        try:
            self._emit(topics.STATS, report, self.stage.name, [])
        except Exception as exc:  # noqa: BLE001 - a report is never worth a stage
            log.warning("%s: stats report not sent: %s", self.stage.name, exc)

    def stats_fields(self) -> dict:
        """More StageStats fields a runtime reports (the scheduler: its queue); none here."""
        return {}

    # -- producing -------------------------------------------------------------------------------------------
    def _emit(self, topic: topics.Topic, event: dict, key: str | None, headers: list | None = None) -> None:
        value = self.codec.encode(topic.name, event)
        self._produce(topic.name, encode_key(key), value, headers if headers is not None else current_trace_headers())
        self.counters.emitted += 1

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.1)

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _flush(self) -> None:
        remaining = self.producer.flush(60)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise DeliveryFailed(f"{remaining} undelivered, errors: {errors[:3]}")

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except DeliveryFailed as exc:
            log.warning("%s: %s", self.stage.name, exc)

    def dead_letter(self, msg: Message, error_type: str, error: str, event: dict | None = None,
                    attempts: int = 1) -> None:
        """Send the raw message to vidgen.dead-letter; when it names a job, that job fails with the reason."""
        job_id = (event or {}).get("job_id") or ""
        raw = msg.value()
        if raw is not None and len(raw) > MAX_DEAD_LETTER_RAW:
            error += f" (raw value cut from {len(raw)} to {MAX_DEAD_LETTER_RAW} bytes)"
            raw = raw[:MAX_DEAD_LETTER_RAW]
        where = f"{msg.topic()}/{msg.partition()}@{msg.offset()}"
        letter = dead_letter_event(self.stage.name, job_id, msg.topic(), msg.partition(), msg.offset(), msg.key(),
                                   raw, msg.headers(), error_type, error)
        log.warning("%s: dead letter %s from %s: %s", self.stage.name, error_type, where, error)
        self._emit(topics.DEAD_LETTER, letter, None if msg.key() is None else decode_key(msg.key()))
        self.counters.dead_lettered += 1
        if job_id and self.stage.fails_jobs:
            failure = new_event(
                job_id,
                derive_event_id(job_id, self.stage.name, "failed"),
                tenant=(event or {}).get("tenant", "default"),
                stage=self.stage.name,
                reason=error,
                error_type=error_type,
                attempts=attempts,
            )
            self._emit(topics.FAILED, failure, job_id)
            self.counters.failed_jobs += 1
        self._flush()

    # -- committing ------------------------------------------------------------------------------------------
    def _commit(self, asynchronous: bool, only: set | None = None) -> None:
        if self.consumer is None:
            return
        positions = self.offsets.commit_positions()
        if only is not None:
            positions = {tp: pos for tp, pos in positions.items() if tp in only}
        if not positions:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, pos) for (t, p), pos in positions.items()],
                                 asynchronous=asynchronous)
            self.offsets.committed(positions)
        except Exception as exc:  # noqa: BLE001 - a failed commit only means a redelivery later
            log.warning("%s: commit failed: %s", self.stage.name, exc)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when stopping. Keeps serving the producer meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                return True
            self.producer.poll(0.05)
        return self.stopping.is_set()


def run_stage(stage: Stage, settings: Settings) -> StageCounters:
    runtime = (stage.runtime or StageRuntime)(stage, settings)
    runtime.install_signal_handlers()
    return runtime.run()

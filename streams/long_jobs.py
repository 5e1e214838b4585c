"""The stage runtime for long jobs (the GPU agent): one job at a time on a worker thread, the consumer never idle.

A denoising job outlives max.poll.interval.ms, so the consumer thread never waits on it: it keeps polling,
buffers at most one waiting input per partition (pausing that partition), and follows cancellations. When the
worker is free it starts the next input, picked by lane (tier) weight (streams/scheduling.py), so premium work goes
first without starving the free tier. A job's offset is committed only after its outputs are flushed.

Stopping mid-job is always at a step boundary, after a checkpoint: when a rebalance revokes the job's partition
(the new owner resumes from the checkpoint), on SIGTERM (then the process leaves its group), and on a JobCancelled
for the job (then the job ends with a terminal event on vidgen.cancelled).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from schemas.codec import DecodeError, RegistryUnavailableError

from .kafka import consumer_config
from .runtime import Outcome, StageRuntime
from .scheduling import WeightedTierScheduler

log = logging.getLogger(__name__)

CANCELLATIONS_REMEMBERED = 100_000  # newest cancellation requests kept (the control topic is read from its start)
POLL_S = 0.02  # the consumer thread's beat: how fast a free worker gets its next job and a cancellation lands


@dataclass
class RunningJob:
    msg: Message
    thread: threading.Thread | None = None
    outcome: Outcome | None = None
    stop: str | None = None  # why it should stop at the next step boundary
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tp(self) -> tuple[str, int]:
        return (self.msg.topic(), self.msg.partition())


class LongJobRuntime(StageRuntime):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lanes = self.stage.lanes or {t.name: t.name for t in self.stage.consumes}
        self.scheduler = WeightedTierScheduler(self._lane_weights())
        self.waiting: dict[str, deque[Message]] = {lane: deque() for lane in set(self.lanes.values())}
        self.current: RunningJob | None = None
        self.control: Consumer | None = None

    def _lane_weights(self) -> dict[str, float]:
        lanes = set(self.lanes.values())
        weights = {lane: w for lane, w in self.settings.tier_weights.items() if lane in lanes}
        return {lane: weights.get(lane, 1.0) for lane in lanes}

    # -- the consumer thread ---------------------------------------------------------------------------------
    def run(self):
        self.connect()
        if self.stage.control is not None:
            self.control = self._follow_control()
        try:
            while not self.stopping.is_set():
                msg = self.poll(POLL_S)
                if msg is not None:
                    self._enqueue(msg)
                self._read_control()
                if self.current is not None and self.current.done.is_set():
                    self._finish(self.current)
                if self.current is None:
                    self._start_next()
        finally:
            if self.current is not None:
                self._interrupt(self.current, "shutdown")
            if self.control is not None:
                self.control.close()
            self.close()
        return self.counters

    def _enqueue(self, msg: Message) -> None:
        tp = (msg.topic(), msg.partition())
        self.offsets.started(tp, msg.offset())
        self.waiting[self.lanes[msg.topic()]].append(msg)
        # One waiting input per partition is enough to choose well; the rest stays on the broker, uncommitted.
        self.consumer.pause([TopicPartition(*tp)])

    def _start_next(self) -> None:
        lane = self.scheduler.pick({lane for lane, queue in self.waiting.items() if queue})
        if lane is None:
            return
        job = RunningJob(self.waiting[lane].popleft())
        job.thread = threading.Thread(target=self._work, args=(job,), name=f"{self.stage.name}-job", daemon=True)
        self.current = job
        job.thread.start()

    def _work(self, job: RunningJob) -> None:
        try:
            job.outcome = self.execute(job.msg, stop_reason=lambda: self._stop_reason(job))
        except BaseException:  # noqa: BLE001 - the consumer thread decides; the input stays uncommitted
            log.exception("%s: job worker crashed", self.stage.name)
            job.outcome = Outcome(job.msg, interrupted=True)
        finally:
            job.done.set()

    def _stop_reason(self, job: RunningJob) -> str | None:
        if job.stop:
            return job.stop
        key = job.msg.key()
        if key is not None and key.decode("utf-8", "replace") in self.cancellations:
            return "cancelled"
        return None

    def _finish(self, job: RunningJob) -> None:
        job.thread.join()
        self.current = None
        outcome = job.outcome or Outcome(job.msg, interrupted=True)
        if outcome.interrupted:
            self.counters.interrupted += 1
        else:
            self.settle(outcome)
        if job.tp in self._assigned():
            self.consumer.resume([TopicPartition(*job.tp)])

    def _interrupt(self, job: RunningJob, reason: str) -> None:
        """Ask the running job to checkpoint and stop at its next step boundary, and wait for it."""
        job.stop = reason
        job.done.wait()
        self._finish(job)

    def _assigned(self) -> set[tuple[str, int]]:
        try:
            return {(p.topic, p.partition) for p in self.consumer.assignment()}
        except Exception:  # noqa: BLE001 - closed consumer
            return set()

    def _on_revoke(self, consumer, partitions):
        revoked = {(p.topic, p.partition) for p in partitions}
        if self.current is not None and self.current.tp in revoked:
            log.info("%s: partition %s revoked mid-job: checkpointing and stopping", self.stage.name, self.current.tp)
            self._interrupt(self.current, "revoked")
        for lane, queue in self.waiting.items():
            self.waiting[lane] = deque(m for m in queue if (m.topic(), m.partition()) not in revoked)
        super()._on_revoke(consumer, partitions)

    # -- cancellations ---------------------------------------------------------------------------------------
    def _follow_control(self) -> Consumer:
        """Every process reads the whole control topic (no group): a cancellation must reach whoever runs the job."""
        conf = consumer_config(self.settings, f"{self.stage.group_id}.control", self.client_id)
        control = Consumer(conf)
        metadata = control.list_topics(self.stage.control.name, timeout=10)
        partitions = metadata.topics[self.stage.control.name].partitions
        control.assign([TopicPartition(self.stage.control.name, p, OFFSET_BEGINNING) for p in partitions])
        return control

    def _read_control(self) -> None:
        if self.control is None:
            return
        while (msg := self.control.poll(0)) is not None:
            if msg.error():
                continue
            try:
                request = self.codec.decode(msg.topic(), msg.value())
            except DecodeError as exc:
                log.warning("%s: unreadable control message at %s@%d: %s", self.stage.name, msg.topic(),
                            msg.offset(), exc)
                continue
            except RegistryUnavailableError as exc:  # read it again on the next round rather than lose it
                log.warning("%s: %s; control message %s@%d kept for later", self.stage.name, exc, msg.topic(),
                            msg.offset())
                self.control.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
                return
            self.cancellations[request["job_id"]] = request
            self.cancellations.move_to_end(request["job_id"])
            while len(self.cancellations) > CANCELLATIONS_REMEMBERED:
                self.cancellations.popitem(last=False)  # the oldest: long finished or never seen here

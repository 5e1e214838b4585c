"""The runtime of a GPU agent: runs the jobs the scheduler assigns it, one at a time, and reports its state.

An agent consumes no generation topic and is in no consumer group: the scheduler (consumers/scheduler.py) owns the
fleet's queue and sends each agent its work on vidgen.assignments, so any idle agent gets the next job, whatever
partition it arrived on, and nothing in Kafka's partitioning bounds the number of agents.

The consumer thread never waits on a job (a denoising job outlives max.poll.interval.ms); its beat, every POLL_S:
1. Read the assignments topic (every partition, from its end at start-up; only this agent's messages, only from
   the newest scheduler leader): ASSIGN starts a job on the worker thread; PREEMPT and REVOKE of the running job
   ask it to stop at its next step boundary.
2. Read the control topic (cancellations; from its start, as every process that may run a job must).
3. When the worker is done: report at once how the job ended (COMPLETED: it needs no GPU any more; INTERRUPTED:
   it stopped after a checkpoint and must resume elsewhere), so the scheduler can hand out the next job.
4. Report the agent's state on vidgen.agents when it changes, and every REPORT_INTERVAL_S anyway: the scheduler
   declares an agent that stops reporting dead.

A job stops only at a step boundary: cancelled (it ends, terminal event), preempted or drained on SIGTERM (after a
checkpoint at that step; it resumes elsewhere), or fenced — the scheduler took it back (REVOKE, after it declared
this agent dead) and another agent runs it now. Before a job's outputs become final the worker asks the consumer
thread to catch up on the assignments topic (``confirm``), so a zombie that wakes up on its last step learns that
it was fenced before it emits a result: a job is never finished by two agents.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from confluent_kafka import Message, Producer

from schemas.codec import DecodeError, RegistryUnavailableError

from . import topics
from .events import new_event
from .kafka import Latency, TopicFollower, producer_config
from .metrics import register_stage_counters, serve_metrics
from .runtime import Outcome, StageRuntime

log = logging.getLogger(__name__)

CANCELLATIONS_REMEMBERED = 100_000  # newest cancellation requests kept (the control topic is read from its start)
#: The consumer thread's beat while a job runs (a blocking poll of the orders, which an order ends as it arrives,
#: then the job's confirmations and cancellations); shorter beats cost the denoising thread GIL time for nothing.
POLL_S = 0.02
#: An idle agent's beat: an order ends it as it arrives, and what a beat does besides (reports every few seconds,
#: cancellations read in the background) can wait this long. Each beat costs an idle process CPU.
IDLE_POLL_S = 0.25
#: Also while idle: a scheduler that takes over follows vidgen.agents from its end, so it knows an idle agent only
#: once that agent reports again (every 2.5 s while idle cost each takeover as much before the first dispatch).
REPORT_INTERVAL_S = 1.0
CONFIRM_TIMEOUT_S = 5.0


@dataclass
class RunningJob:
    msg: Message  # the ASSIGN message
    job_id: str
    epoch: int
    tier: str | None
    thread: threading.Thread | None = None
    outcome: Outcome | None = None
    stop: str | None = None  # why it should stop at the next step boundary
    done: threading.Event = field(default_factory=threading.Event)
    confirm_asked: threading.Event = field(default_factory=threading.Event)
    confirmed: threading.Event = field(default_factory=threading.Event)


class AgentRuntime(StageRuntime):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_id = ""
        self.current: RunningJob | None = None
        self.assignments: TopicFollower | None = None
        self.control: TopicFollower | None = None
        self.leader_epoch = 0
        self.last_assignment = 0  # seq of the newest message for this agent read
        self.finished: tuple[str, int, str, str] = ("", 0, "NONE", "")  # job, epoch, outcome, reason
        self.own_partition: int | None = None  # where orders keyed by this agent land (one partition per key)
        self._next_status = 0.0
        self._last_state: tuple | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        self.handler = self.stage.build(self.settings, self.blobs)
        self.agent_id = self.handler.agent_id
        self.client_id = f"{self.stage.name}-{self.agent_id}"
        if serve_metrics(self.settings.metrics_port, self.settings.metrics_host):
            register_stage_counters(self.stage.name, self.counters)
        self.producer = Producer(producer_config(self.settings, self.client_id))
        # Read from the end: every message for this agent is sent after its first report, which follows this. Only
        # its own partition (orders are keyed by agent): one partition fetched at the orders' latency, not six.
        self.assignments = TopicFollower(self.settings, topics.ASSIGNMENTS, self.client_id, start="end",
                                         latency=Latency.ORDERS, key=self.agent_id)
        [self.own_partition] = self.assignments.next
        if self.stage.control is not None:
            # A cancellation reaches a running job within a pipeline hop (plus a step); an idle agent has nothing
            # to stop (the scheduler skips a waiting job), so it reads them once a second.
            self.control = TopicFollower(
                self.settings, self.stage.control, self.client_id, start="beginning",
                latency=lambda: Latency.PIPELINE if self.current is not None else Latency.BACKGROUND,
                latencies=(Latency.PIPELINE, Latency.BACKGROUND))
        log.info("%s: agent %s takes work from %s", self.stage.name, self.agent_id, topics.ASSIGNMENTS.name)

    def run(self):
        self.connect()
        try:
            self._report(force=True)
            while not self.stopping.is_set():
                self._beat(POLL_S if self.current is not None else IDLE_POLL_S)
        finally:
            self._stop()
        return self.counters

    def _beat(self, timeout_s: float) -> None:
        msg = self.assignments.poll(timeout_s)
        while msg is not None:
            self._on_assignment(msg)
            msg = self.assignments.poll(0)
        self._read_control()
        self._serve_confirm()
        job = self.current
        if job is not None and job.done.is_set():
            self._finish(job)
        self._report()
        self.producer.poll(0)

    def _serve_confirm(self) -> None:
        job = self.current
        if job is not None and job.confirm_asked.is_set() and not job.confirmed.is_set():
            own = None if self.own_partition is None else (self.own_partition,)
            self.assignments.caught_up(self._on_assignment, CONFIRM_TIMEOUT_S, own)
            job.confirmed.set()

    def _stop(self) -> None:
        """SIGTERM (drain): the running job checkpoints at its next step and is handed back; then leave."""
        try:
            if self.current is not None:
                log.info("%s: draining: job %s stops at its next step", self.stage.name, self.current.job_id)
                self.current.stop = "drained"
                while not self.current.done.wait(0.05):
                    self._serve_confirm()
                    self._report()
                self._finish(self.current)
            self._report(state="STOPPED", force=True)
            self.producer.flush(10)
        finally:
            for follower in (self.assignments, self.control):
                if follower is not None:
                    follower.close()
            self.close()

    # -- assignments ---------------------------------------------------------------------------------------
    def _on_assignment(self, msg: Message) -> None:
        if msg.key() is not None and msg.key().decode("utf-8", "replace") != self.agent_id:
            return  # another agent's
        self.own_partition = msg.partition()
        try:
            order = self.codec.decode(msg.topic(), msg.value())
        except DecodeError as exc:
            self.dead_letter(msg, "DECODE", str(exc))
            return
        except RegistryUnavailableError as exc:
            log.warning("%s: %s; assignment %s@%d read again later", self.stage.name, exc, msg.topic(), msg.offset())
            self.assignments.seek(msg)
            return
        if order["agent_id"] != self.agent_id or order["leader_epoch"] < self.leader_epoch:
            return  # not ours, or from a scheduler that has been replaced
        self.leader_epoch = order["leader_epoch"]
        self.last_assignment = max(self.last_assignment, order["seq"])
        job, kind = self.current, order["kind"]
        if kind == "ASSIGN":
            if job is not None and not job.done.is_set():
                log.warning("%s: assigned job %s while running %s: left to the scheduler to requeue",
                            self.stage.name, order["job_id"], job.job_id)
                return
            if job is not None:
                self._finish(job)
            self._start(msg, order)
        elif job is not None and job.job_id == order["job_id"] and job.epoch == order["epoch"]:
            job.stop = "preempted" if kind == "PREEMPT" else "fenced"
            log.info("%s: job %s %s at its next step", self.stage.name, job.job_id, job.stop)
        self._report(force=True)

    def _start(self, msg: Message, order: dict) -> None:
        event = order["job"]
        if event is None:
            self.dead_letter(msg, "INVALID", "ASSIGN without a job")
            return
        job = RunningJob(msg, order["job_id"], order["epoch"], event.get("tier"))
        self.current = job
        job.thread = threading.Thread(target=self._work, args=(job, event), name=f"{self.stage.name}-job",
                                      daemon=True)
        job.thread.start()

    def _work(self, job: RunningJob, event: dict) -> None:
        try:
            job.outcome = self.execute(job.msg, stop_reason=lambda: self._stop_reason(job), decoded=(event,),
                                       confirm=lambda: self._confirm(job))
        except BaseException:  # noqa: BLE001 - the consumer thread decides; the scheduler requeues the job
            log.exception("%s: job worker crashed", self.stage.name)
            job.outcome = Outcome(job.msg, interrupted=True)
        finally:
            job.done.set()

    def _stop_reason(self, job: RunningJob) -> str | None:
        if job.stop:
            return job.stop
        return "cancelled" if job.job_id in self.cancellations else None

    def _confirm(self, job: RunningJob) -> str | None:
        """Called by the worker before a job's result becomes final: wait until the consumer thread has read every
        assignment message sent so far (a REVOKE among them fences the job)."""
        job.confirm_asked.set()
        if not job.confirmed.wait(CONFIRM_TIMEOUT_S):
            log.warning("%s: could not confirm job %s with the assignments topic; finishing it", self.stage.name,
                        job.job_id)
        return self._stop_reason(job)

    def _finish(self, job: RunningJob) -> None:
        job.thread.join()
        self.current = None
        outcome = job.outcome or Outcome(job.msg, interrupted=True)
        if outcome.interrupted:
            self.counters.interrupted += 1
            # Why the job itself says it stopped first: a drain asked while the job was already handing itself back
            # (its agent group broke) must not hide that.
            reason = outcome.why_interrupted or job.stop or "worker stopped"
            self.finished = (job.job_id, job.epoch, "INTERRUPTED", reason)
        else:
            if outcome.dedupe_key is not None:
                self.ledger.mark(outcome.dedupe_key)
            self.finished = (job.job_id, job.epoch, "COMPLETED", "")
        self._report(force=True)

    # -- cancellations ---------------------------------------------------------------------------------------
    def _read_control(self) -> None:
        if self.control is None:
            return
        while (msg := self.control.poll(0)) is not None:
            try:
                request = self.codec.decode(msg.topic(), msg.value())
            except DecodeError as exc:
                log.warning("%s: unreadable control message at %s@%d: %s", self.stage.name, msg.topic(),
                            msg.offset(), exc)
                continue
            except RegistryUnavailableError as exc:  # read it again on the next beat rather than lose it
                log.warning("%s: %s; control message %s@%d kept for later", self.stage.name, exc, msg.topic(),
                            msg.offset())
                self.control.seek(msg)
                return
            self.cancellations[request["job_id"]] = request
            self.cancellations.move_to_end(request["job_id"])
            while len(self.cancellations) > CANCELLATIONS_REMEMBERED:
                self.cancellations.popitem(last=False)  # the oldest: long finished or never seen here

    # -- reports ---------------------------------------------------------------------------------------------
    def _report(self, state: str | None = None, force: bool = False) -> None:
        """Report when something the scheduler acts on changed (state, job, orders read, an ending), and every
        REPORT_INTERVAL_S anyway. Cheap when there is nothing to say: it runs on every beat, beside the denoising
        thread, and the GIL is shared."""
        job = self.current
        if state is None:  # a stopping agent takes nothing new, even once its job has handed back
            state = "DRAINING" if self.stopping.is_set() else "BUSY" if job is not None else "IDLE"
        key = (state, job.epoch if job else 0, job.job_id if job else "", self.last_assignment, self.finished)
        now = time.monotonic()
        if not force and key == self._last_state and now < self._next_status:
            return
        self._last_state, self._next_status = key, now + REPORT_INTERVAL_S
        status = self.handler.status()
        finished_job, finished_epoch, outcome, reason = self.finished
        fields = dict(
            agent_id=self.agent_id, state=state, epoch=job.epoch if job else 0,
            step=status.get("step", 0) if job else 0, total_steps=status.get("total_steps", 0) if job else 0,
            tier=job.tier if job else None,
            models=status.get("models", []), device=status.get("device", "cpu"), devices=status.get("devices", 1),
            free_memory_bytes=status.get("free_memory_bytes"), step_s=status.get("step_s"),
            last_assignment=self.last_assignment, leader_epoch=self.leader_epoch, finished_job_id=finished_job,
            finished_epoch=finished_epoch, finished_outcome=outcome, finished_reason=reason,
        )
        event = new_event(job.job_id if job else "", None, **fields)
        try:
            self._emit(topics.AGENTS, event, self.agent_id, [])
            self.producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - the next beat reports again
            log.warning("%s: state report not sent: %s", self.stage.name, exc)

"""scheduler: the fleet's one queue — PromptEncoded on the tier topics → assignments to idle GPU agents.

Consumes vidgen.encoded.{premium,standard,free} (group vidgen.scheduler), vidgen.agents (the agents' state
reports) and vidgen.control (cancellations). Emits every decision to vidgen.scheduler, orders to agents on
vidgen.assignments, JobCancelled on vidgen.cancelled for a job cancelled while it waits, and QueuePosition on
vidgen.queue. What to start, where, and what yields is consumers/queue_policy.py; the state and its decisions are
consumers/dispatcher.py; this module is the Kafka around them.

Exactly one scheduler is active: the one that owns the single partition of vidgen.scheduler-lease through the
consumer group vidgen.scheduler-lease. Standbys sit in that group with nothing assigned; when the active process
dies, Kafka moves the partition after the session timeout and a standby takes over:
1. fold the decision log (vidgen.scheduler, one partition) from its start into a new state;
2. log a LEADER decision with the next leader epoch (agents ignore orders from older leaders);
3. join the tier topics' group, and follow the control topic (from its start) and the agents' reports (from now);
4. wait ``grace_s`` to hear from every live agent, then start jobs; an agent named in the log that does not report
   within the agent timeout is dead, and its job resumes elsewhere from its newest checkpoint.

The commit protocol of a tier-topic record: (1) the QUEUED decision is produced and (2) flushed, (3) the record is
marked done and (4) its offset committed — so a job is durably in the scheduler's log before its record is let go,
and a redelivered record of a known job changes nothing. Decisions are flushed before the orders they cause are
sent, so the log never misses an assignment an agent acted on.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict

from confluent_kafka import Consumer, Producer

from schemas.codec import DecodeError, RegistryUnavailableError
from streams import topics
from streams.kafka import Latency, TopicFollower, consumer_config, producer_config
from streams.metrics import register_scheduler_queue, register_stage_counters, serve_metrics
from streams.runtime import StageRuntime
from streams.settings import Settings
from streams.stage import InvalidEvent, Stage, StageContext

from .dispatcher import Dispatcher, Orders
from .queue_policy import QueuePolicy

log = logging.getLogger(__name__)

TRACES_REMEMBERED = 200_000
POLL_S = 0.005  # the beat while jobs wait: an agent that reports idle gets the next one within a few beats
#: ... and with none waiting: a new job ends the beat's poll as it arrives, and agents' reports can wait this long.
IDLE_POLL_S = 0.25
QUEUE_SNAPSHOT_S = 1.0  # how often the queue's size is taken for the autoscalers


class Scheduler:
    """The handler: a tier-topic record becomes a QUEUED decision (emitted, so flushed before the commit).
    A job a GPU could not run (unknown model, parameters out of range) is refused here, before it waits in line:
    dead-lettered with its tier-topic position, its job failed with the reason."""

    def __init__(self, settings: Settings, blobs=None):
        from gpu_agents.models import ModelCatalogue  # the parameter rules; it loads no model

        self.settings = settings
        self.models = ModelCatalogue(settings.model_dirs)
        self.scheduler_id = f"{socket.gethostname()}-{os.getpid()}"
        self.dispatcher: Dispatcher | None = None  # while leading
        # job → the trace context (Kafka headers) of its tier-topic record, put on everything sent about the job so
        # one trace follows it through the queue; a new leader takes it from the QUEUED decisions' headers.
        self.traces: OrderedDict[str, list] = OrderedDict()

    def remember_trace(self, job_id: str, headers: list | None) -> None:
        self.traces[job_id] = list(headers or [])
        self.traces.move_to_end(job_id)
        while len(self.traces) > TRACES_REMEMBERED:
            self.traces.popitem(last=False)

    def new_dispatcher(self) -> Dispatcher:
        s = self.settings
        policy = QueuePolicy(s.tier_weights, preempt_after_s=s.preempt_after_s, preempting_tiers=s.preempting_tiers)
        return Dispatcher(policy, self.scheduler_id, agent_timeout_s=s.agent_timeout_s, grace_s=s.scheduler_grace_s,
                          model_devices=s.model_devices)

    def handle(self, job: dict, ctx: StageContext) -> None:
        from gpu_agents.models import InvalidParamsError, UnknownModelError, check_params

        try:
            check_params(job["params"], self.models)
        except (InvalidParamsError, UnknownModelError) as exc:
            raise InvalidEvent(str(exc)) from exc
        source = (ctx.source.topic, ctx.source.partition, ctx.source.offset)
        self.remember_trace(job["job_id"], ctx.headers)
        emit_orders(ctx.emit, self.dispatcher.enqueue(job, source, time.time()))


def emit_orders(emit, orders: Orders) -> None:
    """Decisions first (the caller flushes them before anything that depends on them), then what they cause."""
    for decision in orders.decisions:
        emit(topics.SCHEDULER_LOG, decision, decision["job_id"])
    for order in orders.assignments:
        emit(topics.ASSIGNMENTS, order, order["agent_id"])
    for cancelled in orders.cancelled:
        emit(topics.CANCELLED, cancelled, cancelled["job_id"])
    for position in orders.positions:
        emit(topics.QUEUE, position, position["job_id"])


class SchedulerRuntime(StageRuntime):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lease: Consumer | None = None
        self.leading = False  # the lease partition is ours
        self.active = False  # ... and the state is rebuilt: we serve
        self.control: TopicFollower | None = None
        self.agents: TopicFollower | None = None

    def connect(self) -> None:
        self.handler = self.stage.build(self.settings, self.blobs)
        self.client_id = f"{self.stage.name}-{self.handler.scheduler_id}"
        if serve_metrics(self.settings.metrics_port, self.settings.metrics_host):
            register_stage_counters(self.stage.name, self.counters)
        self.producer = Producer(producer_config(self.settings, self.client_id))
        # The lease topic holds no records: its consumer only keeps the membership, so its fetches may wait long.
        self.lease = Consumer(consumer_config(self.settings, f"{self.stage.group_id}-lease", self.client_id,
                                              Latency.BACKGROUND))
        self.lease.subscribe([topics.SCHEDULER_LEASE.name], on_assign=self._lease_assigned,
                             on_revoke=self._lease_revoked, on_lost=self._lease_revoked)
        log.info("scheduler %s: standing by for the lease", self.handler.scheduler_id)

    def _lease_assigned(self, consumer, partitions) -> None:
        if partitions:
            self.leading = True

    def _lease_revoked(self, consumer, partitions) -> None:
        if partitions:
            self.leading = False

    def run(self):
        self.connect()
        try:
            while not self.stopping.is_set():
                self.lease.poll(0 if self.active else 0.1)
                if self.leading and not self.active:
                    self._take_over()
                elif self.active and not self.leading:
                    log.warning("scheduler %s: lease lost; standing by", self.handler.scheduler_id)
                    self._step_down()
                if self.active:
                    self._serve()
        finally:
            if self.active:
                self._step_down()
            self.lease.close()
            self.close()
        return self.counters

    # -- leading ---------------------------------------------------------------------------------------------
    def _take_over(self) -> None:
        started = time.monotonic()
        dispatcher = self.handler.new_dispatcher()
        log_reader = TopicFollower(self.settings, topics.SCHEDULER_LOG, self.client_id, start="beginning")
        try:
            count = log_reader.read_to_end(lambda msg: self._fold(dispatcher, msg))
        finally:
            log_reader.close()
        self.handler.dispatcher = dispatcher
        self._send(dispatcher.take_over(time.time()))
        self.consumer = Consumer(consumer_config(self.settings, self.stage.group_id, self.client_id, Latency.PIPELINE))
        self.consumer.subscribe([t.name for t in self.stage.consumes], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        # At the orders' latency while any job waits or runs (a cancellation of a waiting job must be seen before an
        # agent that frees up is given that job, and an agent that reports idle gets the next one); in the
        # background while the fleet is idle, when neither can change a decision. The switch is free
        # (SwitchingConsumer), but it is made before it matters: a job that arrives at an idle fleet starts at once
        # on an idle agent, and an agent can only free up while something runs.
        watch = lambda: Latency.ORDERS if self._fleet_busy() else Latency.BACKGROUND  # noqa: E731
        latencies = (Latency.ORDERS, Latency.BACKGROUND)
        self.control = TopicFollower(self.settings, topics.CONTROL, self.client_id, start="beginning",
                                     latency=watch, latencies=latencies)
        self.agents = TopicFollower(self.settings, topics.AGENTS, self.client_id, start="end", latency=watch,
                                    latencies=latencies)
        self.active = True
        log.info("scheduler %s leads (epoch %d): %d decisions folded in %.2f s, %d jobs waiting, %d running",
                 self.handler.scheduler_id, dispatcher.leader_epoch, count, time.monotonic() - started,
                 len(dispatcher.policy), sum(r.state == "assigned" for r in dispatcher.jobs.values()))

    def _jobs_waiting(self) -> bool:
        dispatcher = self.handler.dispatcher
        return dispatcher is not None and len(dispatcher.policy) > 0

    def _fleet_busy(self) -> bool:
        """Jobs wait or run."""
        dispatcher = self.handler.dispatcher
        return self._jobs_waiting() or (dispatcher is not None and any(
            record.state == "assigned" for record in dispatcher.jobs.values()))

    def _step_down(self) -> None:
        self.active = False
        self.handler.dispatcher = None
        for follower in (self.control, self.agents):
            if follower is not None:
                follower.close()
        self.control = self.agents = None
        if self.consumer is not None:
            self._commit(asynchronous=False)
            self.consumer.close()
            self.consumer = None
        self.offsets = type(self.offsets)()

    def _serve(self) -> None:
        """One beat: new jobs, cancellations, agents' reports, then the dispatcher's tick."""
        dispatcher = self.handler.dispatcher
        msg = self.poll(POLL_S if self._jobs_waiting() else IDLE_POLL_S)
        if msg is not None:
            for each in (msg, *self.poll_waiting(99)):
                self.process(each)
        orders = Orders()
        for follower, apply in ((self.control, dispatcher.cancel), (self.agents, dispatcher.report)):
            while (msg := follower.poll(0)) is not None:
                try:
                    event = self.codec.decode(msg.topic(), msg.value())
                except DecodeError as exc:
                    self.dead_letter(msg, "DECODE", str(exc))
                    continue
                except RegistryUnavailableError as exc:
                    log.warning("scheduler: %s; %s@%d read again later", exc, msg.topic(), msg.offset())
                    follower.seek(msg)
                    break
                orders.extend(apply(event, time.time()))
        orders.extend(dispatcher.tick(time.time()))
        self._send(orders)

    def _fold(self, dispatcher: Dispatcher, msg) -> None:
        decision = self.codec.decode(msg.topic(), msg.value())
        dispatcher.apply(decision)
        if decision["kind"] == "QUEUED":
            self.handler.remember_trace(decision["job_id"], msg.headers())

    def _send(self, orders: Orders) -> None:
        if not orders:
            return
        traces = self.handler.traces
        emit = lambda topic, event, key: self._emit(topic, event, key, traces.get(event["job_id"], []))  # noqa: E731
        emit_orders(emit, Orders(decisions=orders.decisions))
        if orders.decisions:
            self._flush()
        emit_orders(emit, Orders(assignments=orders.assignments, cancelled=orders.cancelled,
                                 positions=orders.positions))
        self.producer.poll(0)

    # -- the queue, for autoscaling (KEDA reads the gauges, `vidgen autoscale` the StageStats report) ----------
    _queue: dict | None = None  # the newest snapshot: a new dict each time, read by the metrics thread too
    _queue_due = 0.0
    _queue_exported = False

    def report_stats(self) -> None:
        """Called by ``poll`` on every beat while leading: about once a second a snapshot of the queue, which the
        gauges vidgen_scheduler_* export while this process is active; then the StageStats report, carrying it."""
        now = time.monotonic()
        if now >= self._queue_due:
            self._queue_due = now + QUEUE_SNAPSHOT_S
            self._queue = self.queue_snapshot()
            if not self._queue_exported and serve_metrics(self.settings.metrics_port, self.settings.metrics_host):
                register_scheduler_queue(lambda: self._queue if self.active else None)
                self._queue_exported = True
        super().report_stats()

    def stats_fields(self) -> dict:
        return {"queue": self._queue if self.active else None}

    def queue_snapshot(self) -> dict | None:
        """Jobs waiting per tier, jobs running, live agents per state (a SchedulerQueue record)."""
        dispatcher = self.handler.dispatcher
        if dispatcher is None:
            return None
        agents: dict[str, int] = {}
        for agent in dispatcher.agents.values():
            agents[agent.state] = agents.get(agent.state, 0) + 1
        waiting_gpu_s, arrived_gpu_s = dispatcher.gpu_seconds(DEFAULT_STEP_S)
        return {"waiting": dispatcher.policy.waiting_by_tier(),
                "running": sum(record.state == "assigned" for record in dispatcher.jobs.values()),
                "agents": agents, "waiting_gpu_s": waiting_gpu_s, "arrived_gpu_s": arrived_gpu_s}


#: Seconds per step assumed for the autoscaler's GPU-seconds until an agent has reported a step time.
DEFAULT_STEP_S = 1.0

STAGE = Stage(
    name="scheduler",
    consumes=tuple(topics.ENCODED.values()),
    emits=(topics.SCHEDULER_LOG, topics.ASSIGNMENTS, topics.CANCELLED, topics.QUEUE),
    build=Scheduler,
    dedupe_key=lambda job: job["job_id"],
    control=topics.CONTROL,
    runtime=SchedulerRuntime,
    doc=__doc__,
)

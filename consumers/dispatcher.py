"""The scheduler's state and decisions: jobs waiting and running, agents and their reports, assignment epochs.

No Kafka here. Every change of state is a *decision* (a SchedulerDecision event): a method decides, returns the
decision, and applies it with ``apply`` — the same function a new leader folds the decision log with, so the
state a standby rebuilds is the state the old leader had. What the decisions cause outside (assignments to
agents, terminal events for cancelled waiting jobs, queue positions) is returned beside them in ``Orders``; the
stage sends the decisions first, then the orders.

The rules:
* An agent counts as idle only when it reports IDLE *and* has read every assignment sent to it
  (``last_assignment``), so a report that crossed an assignment never earns a second job.
* Every assignment of a job raises its epoch. A report of a job at an epoch that is no longer the job's (a zombie:
  an agent that was declared dead, or whose assignment was taken back) is answered with a REVOKE, and the agent
  stops that job at its next step boundary without finishing it.
* An agent that has not reported for ``agent_timeout_s`` is dead: its job goes back to the front of its tier and
  resumes from its newest checkpoint on the next agent. So does an assignment an agent never acknowledges.
* A new leader (``take_over``) waits ``grace_s`` before it starts anything, to hear from every live agent first.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from streams.events import derive_event_id, new_event

from .queue_policy import AgentView, QueuePolicy, WaitingJob, start_estimates

log = logging.getLogger(__name__)

STAGE = "scheduler"
DONE_REMEMBERED = 200_000  # finished job ids kept, so a redelivered tier-topic record is not queued again
CANCELLATIONS_REMEMBERED = 100_000
POSITIONS_SHOWN = 1_000  # waiting jobs whose position is published (the rest: the count of jobs waiting)


@dataclass
class JobRecord:
    job: dict  # the PromptEncoded event
    tier: str
    queued_at: float
    state: str = "waiting"  # waiting | assigned
    agent_id: str | None = None
    epoch: int = 0
    preempt_asked: bool = False


@dataclass
class AgentRecord:
    agent_id: str
    last_seen: float
    report: dict = field(default_factory=dict)
    sent_seq: int = 0  # newest ASSIGN/PREEMPT sent to it
    sent_at: float = 0.0  # when it was sent
    revoked: set = field(default_factory=set)  # (job_id, epoch) already revoked: one REVOKE each

    @property
    def state(self) -> str:
        return self.report.get("state", "IDLE")

    def view(self, tier: str | None = None) -> AgentView:
        r = self.report
        return AgentView(self.agent_id, frozenset(r.get("models") or ()), idle_since=self.last_seen,
                         job_id=r.get("job_id") or None, tier=tier, step=r.get("step", 0),
                         total_steps=r.get("total_steps", 0), devices=r.get("devices", 1))


@dataclass
class Orders:
    """What one call decided: decisions for the log (sent and flushed first), then what they cause."""

    decisions: list[dict] = field(default_factory=list)
    assignments: list[dict] = field(default_factory=list)  # Assignment events, key agent_id
    cancelled: list[dict] = field(default_factory=list)  # JobCancelled terminal events of waiting jobs
    positions: list[dict] = field(default_factory=list)  # QueuePosition events

    def __bool__(self) -> bool:
        return bool(self.decisions or self.assignments or self.cancelled or self.positions)

    def extend(self, other: "Orders") -> "Orders":
        for name in ("decisions", "assignments", "cancelled", "positions"):
            getattr(self, name).extend(getattr(other, name))
        return self


def _ms(value) -> float:
    """An event timestamp (ms, or a datetime as the codec decodes it) in seconds."""
    return value.timestamp() if hasattr(value, "timestamp") else value / 1000.0


class Dispatcher:
    def __init__(self, policy: QueuePolicy, scheduler_id: str, agent_timeout_s: float = 10.0, grace_s: float = 2.5,
                 position_interval_s: float = 1.0, model_devices: dict[str, int] | None = None):
        self.policy = policy
        self.model_devices = dict(model_devices or {})  # devices a job of the model needs (others: 1)
        self.arrived_steps: dict[str, int] = {}  # denoising steps of the jobs queued since this process started
        self.scheduler_id = scheduler_id
        self.agent_timeout_s = agent_timeout_s
        self.grace_s = grace_s
        self.position_interval_s = position_interval_s
        self.leader_epoch = 0
        self.seq = 0
        self.jobs: dict[str, JobRecord] = {}
        self.done: OrderedDict[str, None] = OrderedDict()
        self.agents: dict[str, AgentRecord] = {}
        self.cancellations: OrderedDict[str, dict] = OrderedDict()
        self.ready_at: float | None = None  # when this leader may start jobs (None: not leading)
        self._shown: dict[str, tuple[int, float | None]] = {}  # job → (position, eta) last published
        self._next_positions = 0.0

    # -- the log ---------------------------------------------------------------------------------------------
    def decision(self, kind: str, job_id: str = "", *id_parts, **fields) -> dict:
        event_id = derive_event_id(job_id or self.scheduler_id, STAGE, kind, self.leader_epoch, *id_parts)
        return new_event(job_id, event_id, kind=kind, leader_epoch=self.leader_epoch,
                         scheduler_id=self.scheduler_id, **fields)

    def apply(self, d: dict, now: float | None = None) -> None:
        """Fold one decision into the state: live, right after deciding it, and when a new leader reads the log."""
        kind, job_id = d["kind"], d["job_id"]
        if kind == "LEADER":
            self.leader_epoch = max(self.leader_epoch, d["leader_epoch"])
            return
        if d["leader_epoch"] < self.leader_epoch:
            return  # written by a deposed leader after its successor took over: never happened
        if d.get("seq"):
            self.seq = max(self.seq, d["seq"])
        record = self.jobs.get(job_id)
        if kind == "QUEUED":
            if record is None and job_id not in self.done:
                job = d["job"]
                record = self.jobs[job_id] = JobRecord(job, job["tier"].lower(), _ms(d["timestamp"]))
                self.policy.add(self._waiting(record))
        elif kind == "ASSIGNED" and record is not None:
            self.policy.take(job_id, _ms(d["timestamp"]))  # live: taken already; folding: the pick it was
            record.state, record.agent_id, record.epoch = "assigned", d["agent_id"], d["epoch"]
            record.preempt_asked = False
            agent = self.agents.setdefault(d["agent_id"], AgentRecord(d["agent_id"], now or _ms(d["timestamp"])))
            agent.sent_seq = max(agent.sent_seq, d["seq"])
        elif kind == "PREEMPT" and record is not None:
            record.preempt_asked = True
        elif kind == "REQUEUED" and record is not None:
            record.state, record.agent_id, record.preempt_asked = "waiting", None, False
            self.policy.add(self._waiting(record), front=True)
        elif kind in ("DONE", "CANCELLED"):
            self.policy.remove(job_id)
            self.jobs.pop(job_id, None)
            self._shown.pop(job_id, None)
            self._remember(self.done, job_id, None, DONE_REMEMBERED)
        elif kind == "AGENT_DEAD":
            self.agents.pop(d["agent_id"], None)  # should it report again, it is a new agent (and a zombie's job
            # report is answered with a REVOKE)

    def _waiting(self, record: JobRecord) -> WaitingJob:
        params = record.job["params"]
        return WaitingJob(record.job["job_id"], record.tier, record.job.get("tenant", "default"), params["model"],
                          params["steps"], record.queued_at, payload=record.job,
                          devices=self.model_devices.get(params["model"], 1))

    @staticmethod
    def _remember(table: OrderedDict, key: str, value, limit: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > limit:
            table.popitem(last=False)

    def _decide(self, orders: Orders, decision: dict, now: float) -> dict:
        # On the caller's clock: apply() takes a job's queued_at (and a fold its times) from this timestamp.
        decision["timestamp"] = round(now * 1000)
        orders.decisions.append(decision)
        self.apply(decision, now)
        return decision

    # -- leadership ------------------------------------------------------------------------------------------
    def take_over(self, now: float) -> Orders:
        """This process leads from now on (after folding the log). Agents named by running jobs get until the
        agent timeout to report, like any agent."""
        self.leader_epoch += 1
        orders = Orders()
        self._decide(orders, self.decision("LEADER", "", self.scheduler_id), now)
        for record in self.jobs.values():
            if record.state == "assigned":
                agent = self.agents.setdefault(record.agent_id, AgentRecord(record.agent_id, now))
                agent.last_seen = max(agent.last_seen, now)
        for agent in self.agents.values():  # the log's last sight of them says nothing about now
            agent.last_seen, agent.sent_at = max(agent.last_seen, now), max(agent.sent_at, now)
        self.ready_at = now + self.grace_s
        return orders

    # -- inputs ----------------------------------------------------------------------------------------------
    def enqueue(self, job: dict, source: tuple[str, int, int], now: float) -> Orders:
        """A PromptEncoded record from a tier topic. Known or finished jobs (a redelivery) change nothing."""
        orders = Orders()
        job_id = job["job_id"]
        if job_id in self.jobs or job_id in self.done:
            return orders
        topic, partition, offset = source
        self._decide(orders, self.decision("QUEUED", job_id, topic, partition, offset, job=job, source_topic=topic,
                                           source_partition=partition, source_offset=offset), now)
        model = job["params"]["model"]  # live arrivals only (not a log replayed): the autoscaler's demand signal
        self.arrived_steps[model] = self.arrived_steps.get(model, 0) + job["params"]["steps"]
        if job_id in self.cancellations:  # its cancellation came first
            orders.extend(self._cancel_waiting(job_id, now))
        return orders

    def cancel(self, request: dict, now: float) -> Orders:
        """A JobCancelled request: a waiting job ends here; a running one is stopped by its agent, which follows
        the control topic itself."""
        job_id = request["job_id"]
        self._remember(self.cancellations, job_id, request, CANCELLATIONS_REMEMBERED)
        record = self.jobs.get(job_id)
        if record is not None and record.state == "waiting":
            return self._cancel_waiting(job_id, now)
        return Orders()

    def _cancel_waiting(self, job_id: str, now: float) -> Orders:
        orders = Orders()
        request = self.cancellations.get(job_id, {})
        self._decide(orders, self.decision("CANCELLED", job_id, reason=request.get("reason", "")), now)
        orders.cancelled.append(new_event(
            job_id, derive_event_id(job_id, STAGE, "cancelled"), reason=request.get("reason", ""),
            requested_by=request.get("requested_by", ""), stage=STAGE, stopped_at_step=None))
        orders.positions.append(self._position(job_id, None, 0, None))
        return orders

    def report(self, status: dict, now: float) -> Orders:
        """An AgentStatus: the agent's liveness, its models, what it runs, and how its last job ended."""
        orders = Orders()
        agent_id = status["agent_id"]
        if status["leader_epoch"] > self.leader_epoch and self.ready_at is not None:
            log.warning("agent %s has heard from scheduler epoch %d, newer than this one's %d", agent_id,
                        status["leader_epoch"], self.leader_epoch)
        agent = self.agents.setdefault(agent_id, AgentRecord(agent_id, now))
        agent.last_seen, agent.report = now, status
        if status["state"] == "STOPPED":
            self._requeue_jobs_of(agent_id, "agent stopped", now, orders)
            del self.agents[agent_id]
            return orders
        finished = self.jobs.get(status.get("finished_job_id") or "")
        if (finished is not None and finished.state == "assigned" and finished.agent_id == agent_id
                and finished.epoch == status.get("finished_epoch")):
            if status["finished_outcome"] == "COMPLETED":
                self._decide(orders, self.decision("DONE", finished.job["job_id"], finished.epoch, agent_id=agent_id,
                                                   epoch=finished.epoch), now)
            elif status["finished_outcome"] == "INTERRUPTED":
                self._requeue(finished, status.get("finished_reason") or "interrupted", now, orders)
        running = status.get("job_id") or ""
        if status.get("last_assignment", 0) >= agent.sent_seq:
            # It has read every order sent to it, yet runs none of its assigned jobs and has not finished them: it
            # refused them (an ASSIGN that found it busy, after a failover). Nobody else will run them.
            for record in [r for r in self.jobs.values() if r.state == "assigned" and r.agent_id == agent_id]:
                job_id = record.job["job_id"]
                if job_id != running and (status.get("finished_job_id"), status.get("finished_epoch")) != (
                        job_id, record.epoch):
                    self._requeue(record, "not taken by its agent", now, orders)
        if running:
            record = self.jobs.get(running)
            epoch = status.get("epoch", 0)
            current = record is not None and record.state == "assigned" and record.agent_id == agent_id \
                and record.epoch == epoch
            if not current and (running, epoch) not in agent.revoked:
                agent.revoked.add((running, epoch))
                self._send(orders, agent, "REVOKE", running, epoch, now)  # a zombie: its job is someone else's now
        return orders

    # -- the beat --------------------------------------------------------------------------------------------
    def tick(self, now: float) -> Orders:
        """Dead agents, then starts, then a preemption if an overdue job still waits, then positions."""
        orders = Orders()
        if self.ready_at is None or now < self.ready_at:
            return orders
        for agent in list(self.agents.values()):
            unacknowledged = agent.report.get("last_assignment", 0) < agent.sent_seq
            if now - agent.last_seen > self.agent_timeout_s:
                self._requeue_jobs_of(agent.agent_id, "agent dead", now, orders)
                self._decide(orders, self.decision("AGENT_DEAD", "", agent.agent_id, agent.last_seen,
                                                   agent_id=agent.agent_id, reason="no report"), now)
            elif unacknowledged and now - agent.sent_at > self.agent_timeout_s:
                self._requeue_jobs_of(agent.agent_id, "assignment not acknowledged", now, orders)
        idle = self.idle_agents()
        for job, agent in self.policy.dispatch(idle, now):
            record = self.jobs[job.job_id]
            epoch = record.epoch + 1
            self._decide(orders, self.decision("ASSIGNED", job.job_id, epoch, agent_id=agent.agent_id, epoch=epoch,
                                               seq=self.seq + 1), now)
            self._send(orders, self.agents[agent.agent_id], "ASSIGN", job.job_id, epoch, now, job=record.job,
                       seq=self.seq)
            orders.positions.append(self._position(job.job_id, record, 0, 0.0))
        if len(idle) <= len(orders.assignments) and len(self.policy):
            self._preempt(now, orders)
        if now >= self._next_positions:
            self._next_positions = now + self.position_interval_s
            orders.positions.extend(self.positions(now))
        return orders

    def idle_agents(self) -> list[AgentView]:
        busy = {record.agent_id for record in self.jobs.values() if record.state == "assigned"}
        return [agent.view() for agent in self.agents.values()
                if agent.state == "IDLE" and agent.agent_id not in busy
                and agent.report.get("last_assignment", 0) >= agent.sent_seq]

    def _preempt(self, now: float, orders: Orders) -> None:
        running = [self.agents[r.agent_id].view(r.tier) for r in self.jobs.values()
                   if r.state == "assigned" and r.agent_id in self.agents]
        asked = {r.job["job_id"] for r in self.jobs.values() if r.state == "assigned" and r.preempt_asked}
        victim = self.policy.preemption(running, asked, now)
        if victim is None:
            return
        record = self.jobs[victim.job_id]
        self._decide(orders, self.decision("PREEMPT", victim.job_id, record.epoch, agent_id=victim.agent_id,
                                           epoch=record.epoch, seq=self.seq + 1, reason="an overdue job waits"), now)
        self._send(orders, self.agents[victim.agent_id], "PREEMPT", victim.job_id, record.epoch, now, seq=self.seq)

    def _requeue(self, record: JobRecord, reason: str, now: float, orders: Orders) -> None:
        job_id = record.job["job_id"]
        self._decide(orders, self.decision("REQUEUED", job_id, record.epoch, agent_id=record.agent_id or "",
                                           epoch=record.epoch, reason=reason), now)
        if job_id in self.cancellations:
            orders.extend(self._cancel_waiting(job_id, now))

    def _requeue_jobs_of(self, agent_id: str, reason: str, now: float, orders: Orders) -> None:
        agent = self.agents.get(agent_id)
        for record in [r for r in self.jobs.values() if r.state == "assigned" and r.agent_id == agent_id]:
            epoch = record.epoch
            self._requeue(record, reason, now, orders)
            if agent is not None and reason != "agent stopped":
                agent.revoked.add((record.job["job_id"], epoch))
                self._send(orders, agent, "REVOKE", record.job["job_id"], epoch, now)  # fence it, should it wake up

    def _send(self, orders: Orders, agent: AgentRecord, kind: str, job_id: str, epoch: int, now: float,
              job: dict | None = None, seq: int | None = None) -> None:
        """An Assignment message. ASSIGN and PREEMPT carry the seq of their decision (logged); a REVOKE, which
        changes no state and is not logged, carries the newest seq without taking a new one: a new leader folding
        the log then goes on above every seq an agent has read."""
        if seq is None:
            seq = self.seq
        else:
            agent.sent_seq, agent.sent_at = max(agent.sent_seq, seq), now
        orders.assignments.append(new_event(
            job_id, derive_event_id(job_id, STAGE, kind, epoch, agent.agent_id, self.leader_epoch),
            agent_id=agent.agent_id, kind=kind, epoch=epoch, seq=seq, leader_epoch=self.leader_epoch, job=job))

    # -- positions -------------------------------------------------------------------------------------------
    def positions(self, now: float) -> list[dict]:
        """QueuePosition events for waiting jobs whose position or ETA moved (noticeably) since last shown."""
        order = self.policy.predicted_order(now, POSITIONS_SHOWN)
        busy_until = []
        for agent in self._working_agents():
            r = agent.report
            remaining = max(0, r.get("total_steps", 0) - r.get("step", 0)) if r.get("job_id") else 0
            busy_until.append(now + remaining * (r.get("step_s") or 0.0))
        means, default = self.step_seconds()
        etas = start_estimates(order, busy_until, means, now, default)
        out = []
        for position, (job, eta) in enumerate(zip(order, etas), start=1):
            shown = self._shown.get(job.job_id)
            if shown is not None and shown[0] == position and _close(shown[1], eta):
                continue
            out.append(self._position(job.job_id, self.jobs[job.job_id], position, eta))
        return out

    def _working_agents(self) -> list[AgentRecord]:
        return [agent for agent in self.agents.values() if agent.state not in ("DRAINING", "STOPPED")]

    def step_seconds(self) -> tuple[dict[str, float], float | None]:
        """Seconds per denoising step by model (the mean of the agents' recent medians with it loaded), and the mean
        over models (None until an agent has reported a step time)."""
        step_s: dict[str, list[float]] = {}
        for agent in self._working_agents():
            r = agent.report
            if r.get("step_s"):
                for model in r.get("models") or ():
                    step_s.setdefault(model, []).append(r["step_s"])
        means = {model: sum(values) / len(values) for model, values in step_s.items()}
        return means, sum(means.values()) / len(means) if means else None

    def gpu_seconds(self, default_step_s: float) -> tuple[dict[str, float], float]:
        """The autoscaler's demand signal in GPU-seconds: the work waiting per tier (steps left × the model's step
        time), and the work queued since this process started (cumulative)."""
        means, default = self.step_seconds()
        default = default or default_step_s
        waiting = {tier: 0.0 for tier in self.policy.tiers}
        for job in self.policy.by_id.values():
            waiting[job.tier] += max(0, job.steps - job.steps_done) * means.get(job.model, default) * job.devices
        arrived = sum(steps * means.get(model, default) * self.model_devices.get(model, 1)
                      for model, steps in self.arrived_steps.items())
        return waiting, arrived

    def _position(self, job_id: str, record: JobRecord | None, position: int, eta: float | None) -> dict:
        self._shown[job_id] = (position, eta)
        if position == 0:
            self._shown.pop(job_id, None)
        job = record.job if record is not None else {}
        return new_event(job_id, None, tenant=job.get("tenant", "default"), tier=job.get("tier", "STANDARD"),
                         position=position, waiting=len(self.policy), eta_s=eta)


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= max(2.0, 0.1 * max(a, b))

"""Dispatcher: the scheduler's state machine as plain calls on a fake clock (no broker). Jobs queued, agents'
reports, ticks; the decisions it logs, the orders it sends, and a new leader folding that log."""

import itertools
from datetime import datetime, timezone

from consumers.dispatcher import Dispatcher, Orders
from consumers.queue_policy import QueuePolicy

T0 = 1_000.0
TIMEOUT = 10.0
GRACE = 2.5
_offsets = itertools.count()


def event(job_id, tier="standard", tenant="t1", model="m1", steps=10) -> dict:
    """A PromptEncoded, as much of it as the scheduler reads."""
    return {"event_id": f"ev-{job_id}", "job_id": job_id, "timestamp": 0, "tenant": tenant, "tier": tier.upper(),
            "params": {"model": model, "steps": steps}}


def status(agent_id, **fields) -> dict:
    """An AgentStatus with the schema's defaults."""
    base = {"event_id": f"st-{agent_id}-{next(_offsets)}", "job_id": "", "timestamp": 0, "agent_id": agent_id,
            "state": "IDLE", "epoch": 0, "step": 0, "total_steps": 0, "tier": None, "models": [], "device": "cpu",
            "free_memory_bytes": None, "step_s": None, "last_assignment": 0, "leader_epoch": 1,
            "finished_job_id": "", "finished_epoch": 0, "finished_outcome": "NONE", "finished_reason": ""}
    unknown = set(fields) - set(base)
    assert not unknown, unknown
    return {**base, **fields}


def kinds(orders: Orders) -> list[tuple[str, str]]:
    return [(d["kind"], d["job_id"]) for d in orders.decisions]


def sent(orders: Orders, kind: str | None = None) -> list[tuple[str, str, str, int]]:
    return [(a["kind"], a["agent_id"], a["job_id"], a["epoch"]) for a in orders.assignments
            if kind is None or a["kind"] == kind]


def state_of(dispatcher: Dispatcher, now: float) -> dict:
    """What a new leader must rebuild."""
    return {
        "waiting": [job.job_id for job in dispatcher.policy.predicted_order(now)],
        "credits": dispatcher.policy.picker.credits,
        "jobs": {job_id: (r.state, r.agent_id, r.epoch, r.preempt_asked) for job_id, r in dispatcher.jobs.items()},
        "seq": dispatcher.seq,
        "leader_epoch": dispatcher.leader_epoch,
        "done": set(dispatcher.done),
    }


def as_decoded(decision: dict) -> dict:
    """A decision as the codec hands it to a new leader: timestamp-millis as an aware datetime."""
    return {**decision, "timestamp": datetime.fromtimestamp(decision["timestamp"] / 1000, timezone.utc)}


class Harness:
    """One leader on a fake clock, with agents that read every assignment sent to them unless told otherwise."""

    def __init__(self, policy: QueuePolicy | None = None, now: float = T0):
        policy = policy if policy is not None else QueuePolicy(preempt_after_s=30)  # an empty policy is falsy
        self.d = Dispatcher(policy, "sched-1", agent_timeout_s=TIMEOUT, grace_s=GRACE)
        self.now = now
        self.log: list[dict] = []  # every decision, in order: the vidgen.scheduler topic
        self.read: dict[str, int] = {}  # agent → newest seq sent to it (what it has read)
        self.last: dict[str, dict] = {}  # agent → fields of its last report (for heartbeats)
        self.take(self.d.take_over(now))
        self.now += GRACE

    def take(self, orders: Orders) -> Orders:
        self.log.extend(orders.decisions)
        for order in orders.assignments:
            self.read[order["agent_id"]] = max(self.read.get(order["agent_id"], 0), order["seq"])
        return orders

    def enqueue(self, job_id, tier="standard", **job) -> Orders:
        return self.take(self.d.enqueue(event(job_id, tier, **job), (f"vidgen.encoded.{tier}", 0, next(_offsets)),
                                        self.now))

    def report(self, agent_id, **fields) -> Orders:
        self.last[agent_id] = fields
        fields = {"last_assignment": self.read.get(agent_id, 0), **fields}
        return self.take(self.d.report(status(agent_id, **fields), self.now))

    def tick(self) -> Orders:
        return self.take(self.d.tick(self.now))

    def cancel(self, job_id, **request) -> Orders:
        return self.take(self.d.cancel({"job_id": job_id, "reason": "", "requested_by": "", **request}, self.now))

    def heartbeat(self, *silent) -> Orders:
        orders = Orders()
        for agent_id, fields in list(self.last.items()):
            if agent_id not in silent:
                orders.extend(self.report(agent_id, **fields))
        return orders

    def wait(self, seconds, *silent) -> Orders:
        """Let time pass in beats of 1 s, every agent but ``silent`` reporting as it did, ticking each beat."""
        orders = Orders()
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 1.0)
            orders.extend(self.heartbeat(*silent)).extend(self.tick())
        return orders

    def run(self, job_id, agent_id, tier="standard", step=0, **job) -> int:
        """Queue a job and start it on this agent (the only idle one); the agent then reports it running."""
        self.enqueue(job_id, tier, **job)
        self.report(agent_id)
        orders = self.tick()
        assert sent(orders, "ASSIGN") == [("ASSIGN", agent_id, job_id, self.d.jobs[job_id].epoch)], orders
        epoch = self.d.jobs[job_id].epoch
        self.report(agent_id, state="BUSY", job_id=job_id, epoch=epoch, step=step,
                    total_steps=job.get("steps", 10), models=[job.get("model", "m1")])
        return epoch


# -- starting jobs -------------------------------------------------------------------------------------------------
def test_a_queued_job_goes_to_an_idle_agent_at_the_next_tick():
    h = Harness()
    queued = h.enqueue("j1", "premium", tenant="acme")
    assert kinds(queued) == [("QUEUED", "j1")] and not queued.assignments
    (decision,) = queued.decisions
    assert decision["job"]["job_id"] == "j1" and decision["leader_epoch"] == 1
    assert (decision["source_topic"], decision["source_partition"]) == ("vidgen.encoded.premium", 0)
    assert not h.report("a1")
    orders = h.tick()
    (assigned,) = orders.decisions
    assert {k: assigned[k] for k in ("kind", "job_id", "agent_id", "epoch", "seq", "leader_epoch")} == {
        "kind": "ASSIGNED", "job_id": "j1", "agent_id": "a1", "epoch": 1, "seq": 1, "leader_epoch": 1}
    (order,) = orders.assignments
    assert {k: order[k] for k in ("kind", "job_id", "agent_id", "epoch", "seq", "leader_epoch")} == {
        "kind": "ASSIGN", "job_id": "j1", "agent_id": "a1", "epoch": 1, "seq": 1, "leader_epoch": 1}
    assert order["job"] == event("j1", "premium", tenant="acme")
    assert [(p["job_id"], p["position"], p["tenant"]) for p in orders.positions] == [("j1", 0, "acme")]
    assert not h.tick()


def test_affinity_through_the_dispatcher():
    h = Harness()
    h.report("a-m2", models=["m2"])
    h.report("a-m1", models=["m1"])
    h.enqueue("j1", model="m1")
    assert sent(h.tick()) == [("ASSIGN", "a-m1", "j1", 1)]
    h.enqueue("j2", model="m1")  # only an agent without its model is idle: it takes the job all the same
    assert sent(h.tick()) == [("ASSIGN", "a-m2", "j2", 1)]


def test_nothing_starts_before_grace_after_take_over():
    d = Dispatcher(QueuePolicy(), "sched-1", agent_timeout_s=TIMEOUT, grace_s=GRACE)
    d.enqueue(event("j1"), ("vidgen.encoded.standard", 0, 0), T0)
    d.report(status("a1"), T0)
    assert not d.tick(T0 + 5)  # not leading at all
    d.take_over(T0 + 10)
    d.report(status("a1"), T0 + 10)
    assert not d.tick(T0 + 10 + GRACE - 0.01)
    assert kinds(d.tick(T0 + 10 + GRACE)) == [("ASSIGNED", "j1")]


def test_a_redelivered_job_changes_nothing():
    h = Harness()
    h.enqueue("j1")
    assert not h.enqueue("j1") and len(h.d.policy) == 1
    h.run("j1", "a1")
    assert not h.enqueue("j1")  # running
    h.report("a1", finished_job_id="j1", finished_epoch=1, finished_outcome="COMPLETED")
    assert not h.enqueue("j1")  # done
    assert "j1" not in h.d.jobs and "j1" not in h.d.policy and not h.tick()


def test_a_report_that_crossed_its_assignment_earns_no_second_job():
    h = Harness()
    h.enqueue("j1")
    h.enqueue("j2")
    h.report("a1")
    assert sent(h.tick()) == [("ASSIGN", "a1", "j1", 1)]
    h.now += 0.5
    h.report("a1", last_assignment=0)  # IDLE, sent before it read the ASSIGN
    assert not h.tick().assignments
    assert h.d.idle_agents() == []


def test_an_assignment_never_acknowledged_is_taken_back_and_the_agent_gets_nothing_until_it_reads_it():
    h = Harness()
    h.enqueue("j1")
    h.enqueue("j2")
    h.report("a1")
    assert sent(h.tick()) == [("ASSIGN", "a1", "j1", 1)]
    orders = Orders()
    for _ in range(int(TIMEOUT)):  # a1 keeps reporting IDLE, never having read seq 1
        h.now += 1.0
        orders.extend(h.report("a1", last_assignment=0)).extend(h.tick())
    assert not orders.decisions and not orders.assignments
    h.now += 0.5
    h.report("a1", last_assignment=0)
    h.report("a2")
    orders = h.tick()
    assert kinds(orders) == [("REQUEUED", "j1"), ("ASSIGNED", "j1")]
    assert orders.decisions[0]["reason"] == "assignment not acknowledged"
    # a1 is fenced for j1 and, still behind on its assignments, not given j2; j1 resumes on a2.
    assert sent(orders) == [("REVOKE", "a1", "j1", 1), ("ASSIGN", "a2", "j1", 2)]
    assert "j2" in h.d.policy
    h.report("a1")  # it has read everything now
    assert sent(h.tick()) == [("ASSIGN", "a1", "j2", 1)]


def test_completed_makes_the_job_done():
    h = Harness()
    h.run("j1", "a1")
    # Not this agent's job, or not this epoch: nothing.
    assert not h.report("a2", finished_job_id="j1", finished_epoch=1, finished_outcome="COMPLETED")
    assert not h.report("a1", state="BUSY", job_id="j1", epoch=1, finished_job_id="j1", finished_epoch=2,
                        finished_outcome="COMPLETED")
    orders = h.report("a1", finished_job_id="j1", finished_epoch=1, finished_outcome="COMPLETED")
    assert kinds(orders) == [("DONE", "j1")]
    assert (orders.decisions[0]["agent_id"], orders.decisions[0]["epoch"]) == ("a1", 1)
    assert "j1" not in h.d.jobs
    assert not h.report("a1", finished_job_id="j1", finished_epoch=1, finished_outcome="COMPLETED")  # repeated


def test_an_interrupted_job_goes_back_to_the_front_and_resumes_at_the_next_epoch():
    h = Harness()
    h.enqueue("j0")
    h.report("a1")
    h.tick()
    h.enqueue("j1")
    h.enqueue("j2")  # waits behind j1
    h.report("a2")
    assert sent(h.tick()) == [("ASSIGN", "a2", "j1", 1)]
    h.report("a2", state="BUSY", job_id="j1", epoch=1, step=3, total_steps=10)
    h.now += 1
    orders = h.report("a2", finished_job_id="j1", finished_epoch=1, finished_outcome="INTERRUPTED",
                      finished_reason="preempted")
    assert kinds(orders) == [("REQUEUED", "j1")]
    assert (orders.decisions[0]["reason"], orders.decisions[0]["epoch"]) == ("preempted", 1)
    assert [job.job_id for job in h.d.policy.predicted_order(h.now)] == ["j1", "j2"]
    orders = h.tick()
    assert sent(orders) == [("ASSIGN", "a2", "j1", 2)]
    assert orders.assignments[0]["seq"] == 3 and orders.decisions[0]["seq"] == 3


def test_a_dead_agents_job_is_requeued_revoked_and_resumed_elsewhere():
    h = Harness()
    h.run("j1", "a1")
    h.report("a2")
    assert not h.wait(TIMEOUT, "a1").decisions  # a1 silent for exactly the timeout: still alive
    h.now += 0.1
    h.report("a2")
    orders = h.tick()
    assert kinds(orders) == [("REQUEUED", "j1"), ("AGENT_DEAD", ""), ("ASSIGNED", "j1")]
    assert orders.decisions[0]["reason"] == "agent dead" and orders.decisions[1]["agent_id"] == "a1"
    assert sent(orders) == [("REVOKE", "a1", "j1", 1), ("ASSIGN", "a2", "j1", 2)]
    assert "a1" not in h.d.agents


def test_a_zombie_gets_exactly_one_revoke():
    h = Harness()
    h.run("j1", "a1")
    h.report("a2")
    h.wait(TIMEOUT + 1, "a1")
    assert h.d.jobs["j1"].agent_id == "a2" and h.d.jobs["j1"].epoch == 2
    h.report("a2", state="BUSY", job_id="j1", epoch=2, step=1, total_steps=10)
    # a1 wakes up, still running j1 at epoch 1, and reports every second.
    revokes = []
    for _ in range(5):
        h.now += 1
        revokes += sent(h.report("a1", state="BUSY", job_id="j1", epoch=1, step=4, total_steps=10), "REVOKE")
        revokes += sent(h.heartbeat("a1"), "REVOKE") + sent(h.tick(), "REVOKE")
    assert revokes == [("REVOKE", "a1", "j1", 1)]
    assert h.d.jobs["j1"].agent_id == "a2" and h.d.jobs["j1"].epoch == 2  # untouched
    # A job the scheduler does not know at all (done long ago): one REVOKE too.
    assert sent(h.report("a1", state="BUSY", job_id="ghost", epoch=3)) == [("REVOKE", "a1", "ghost", 3)]
    assert not h.report("a1", state="BUSY", job_id="ghost", epoch=3)


# -- cancellation --------------------------------------------------------------------------------------------------
def test_cancelling_a_waiting_job():
    h = Harness()
    h.enqueue("j1", tenant="acme")
    h.enqueue("j2")
    orders = h.cancel("j1", reason="changed my mind", requested_by="alice")
    assert kinds(orders) == [("CANCELLED", "j1")] and orders.decisions[0]["reason"] == "changed my mind"
    (cancelled,) = orders.cancelled
    assert {k: cancelled[k] for k in ("job_id", "stage", "reason", "requested_by", "stopped_at_step")} == {
        "job_id": "j1", "stage": "scheduler", "reason": "changed my mind", "requested_by": "alice",
        "stopped_at_step": None}
    assert [(p["job_id"], p["position"], p["waiting"]) for p in orders.positions] == [("j1", 0, 1)]
    assert "j1" not in h.d.policy and "j1" not in h.d.jobs
    assert not h.enqueue("j1")
    h.report("a1")
    assert sent(h.tick()) == [("ASSIGN", "a1", "j2", 1)]


def test_a_cancellation_that_comes_before_the_job_cancels_it_on_arrival():
    h = Harness()
    assert not h.cancel("j1", reason="too slow")
    orders = h.enqueue("j1")
    assert kinds(orders) == [("QUEUED", "j1"), ("CANCELLED", "j1")]
    assert [c["reason"] for c in orders.cancelled] == ["too slow"]
    assert [p["position"] for p in orders.positions] == [0]
    assert "j1" not in h.d.policy
    h.report("a1")
    assert not h.tick().assignments


def test_cancelling_a_running_job_is_left_to_its_agent():
    h = Harness()
    h.run("j1", "a1")
    assert not h.cancel("j1")
    assert h.d.jobs["j1"].state == "assigned"
    orders = h.report("a1", finished_job_id="j1", finished_epoch=1, finished_outcome="COMPLETED",
                      finished_reason="cancelled")
    assert kinds(orders) == [("DONE", "j1")] and not orders.cancelled


def test_a_cancelled_running_job_that_comes_back_is_not_queued_again():
    h = Harness()
    h.run("j1", "a1")
    h.cancel("j1")
    orders = h.report("a1", finished_job_id="j1", finished_epoch=1, finished_outcome="INTERRUPTED",
                      finished_reason="drained")
    assert kinds(orders) == [("REQUEUED", "j1"), ("CANCELLED", "j1")] and len(orders.cancelled) == 1
    assert "j1" not in h.d.policy


# -- preemption ----------------------------------------------------------------------------------------------------
def test_an_overdue_premium_job_preempts_the_least_advanced_free_job_once():
    h = Harness()
    h.run("s1", "a1", "standard", step=0)
    h.run("f1", "a2", "free", step=5)
    h.run("f2", "a3", "free", step=2)
    h.run("f3", "a4", "free", step=8)
    h.enqueue("p1", "premium")
    assert not h.wait(29).decisions  # not overdue yet
    orders = h.wait(2)
    assert kinds(orders) == [("PREEMPT", "f2")]
    (order,) = orders.assignments
    assert (order["kind"], order["agent_id"], order["epoch"]) == ("PREEMPT", "a3", 1)
    assert order["seq"] == orders.decisions[0]["seq"] == h.d.seq
    assert not h.wait(5).decisions  # not repeated while f2 winds down
    # f2 stops at a step boundary: it goes back to the front of free, and p1 takes its agent.
    h.report("a3", finished_job_id="f2", finished_epoch=1, finished_outcome="INTERRUPTED",
             finished_reason="preempted")
    orders = h.tick()
    assert kinds(orders) == [("ASSIGNED", "p1")] and sent(orders) == [("ASSIGN", "a3", "p1", 1)]
    assert [job.job_id for job in h.d.policy.predicted_order(h.now)] == ["f2"]


def test_an_idle_agent_takes_the_overdue_job_and_only_the_next_overdue_one_preempts():
    h = Harness()
    h.run("f1", "a1", "free")
    h.run("f2", "a2", "free", step=3)
    h.enqueue("p1", "premium")
    h.enqueue("p2", "premium")
    h.wait(29)
    h.now += 2
    h.heartbeat()
    h.report("a3")
    orders = h.tick()
    assert kinds(orders) == [("ASSIGNED", "p1"), ("PREEMPT", "f1")]
    assert sent(orders) == [("ASSIGN", "a3", "p1", 1), ("PREEMPT", "a1", "f1", 1)]


def test_preempt_after_none_never_preempts():
    h = Harness(QueuePolicy(preempt_after_s=None))
    h.run("f1", "a1", "free")
    h.enqueue("p1", "premium")
    assert not h.wait(120).decisions


# -- failover ------------------------------------------------------------------------------------------------------
def scripted_run() -> Harness:
    """A leader's busy morning: three tiers and tenants, completions, a preemption, a dead agent, a zombie, a
    cancellation; jobs left waiting in every tier with credits and tenant turns mid-cycle."""
    h = Harness()
    for i in range(12):
        for tier in ("premium", "standard", "free"):
            h.enqueue(f"{tier[0]}{i}", tier, tenant="AB"[i % 2] if i < 8 else "C", model=f"m{i % 3}")
    for agent in ("a1", "a2", "a3", "a4"):
        h.report(agent)
    h.tick()
    for agent in ("a1", "a2", "a3", "a4"):
        job_id = next(j for j, r in h.d.jobs.items() if r.state == "assigned" and r.agent_id == agent)
        h.report(agent, state="BUSY", job_id=job_id, epoch=1, step=int(agent[1]), total_steps=10)
    h.cancel("s5")
    h.wait(3)
    for agent in ("a1", "a2"):  # two finish and take more
        job_id = h.last[agent]["job_id"]
        h.report(agent, finished_job_id=job_id, finished_epoch=1, finished_outcome="COMPLETED")
    h.tick()
    h.wait(1)
    h.wait(TIMEOUT + 1, "a4")  # a4 dies; its job goes back to the front
    h.report("a5")
    h.tick()
    h.report("a4", **h.last["a4"])  # and comes back as a zombie
    h.enqueue("p99", "premium")
    h.wait(TIMEOUT)
    for agent in ("a1", "a2", "a3", "a5"):  # all busy, whatever they were given
        job_id = next((j for j, r in h.d.jobs.items() if r.state == "assigned" and r.agent_id == agent), "")
        if job_id:
            h.report(agent, state="BUSY", job_id=job_id, epoch=h.d.jobs[job_id].epoch, step=1, total_steps=10)
    h.last.pop("a4")
    h.wait(25)  # premium jobs overdue → the lower-tier jobs running are asked to yield, one per tick
    preempt = next(d for d in h.log if d["kind"] == "PREEMPT")
    # One yields: the oldest overdue job takes its agent (an overdue start: no tier pick), and one more finishes.
    overdue = [job.job_id for job in h.d.policy.overdue(h.now)]
    h.report(preempt["agent_id"], finished_job_id=preempt["job_id"], finished_epoch=preempt["epoch"],
             finished_outcome="INTERRUPTED", finished_reason="preempted")
    orders = h.tick()
    assert sent(orders, "ASSIGN") == [("ASSIGN", preempt["agent_id"], overdue[0], h.d.jobs[overdue[0]].epoch)]
    other = next(a for a in ("a1", "a2", "a3", "a5") if a != preempt["agent_id"])
    job_id = h.last[other]["job_id"]
    h.report(other, finished_job_id=job_id, finished_epoch=h.d.jobs[job_id].epoch, finished_outcome="COMPLETED")
    assert len(sent(h.tick(), "ASSIGN")) == 1
    # Last, a zombie's report: a REVOKE, which no decision records.
    zombie_job = next(j for j, r in h.d.jobs.items() if r.state == "assigned")
    assert sent(h.report("z1", state="BUSY", job_id=zombie_job, epoch=99), "REVOKE")
    assert {d["kind"] for d in h.log} >= {"QUEUED", "ASSIGNED", "DONE", "REQUEUED", "AGENT_DEAD", "CANCELLED"}
    assert len(h.d.policy) > 10
    return h


def fold(log: list[dict], policy: QueuePolicy | None = None) -> Dispatcher:
    policy = policy if policy is not None else QueuePolicy(preempt_after_s=30)
    standby = Dispatcher(policy, "sched-2", agent_timeout_s=TIMEOUT, grace_s=GRACE)
    for decision in log:
        standby.apply(as_decoded(decision))
    return standby


def test_a_new_leader_folding_the_log_has_the_old_leaders_state():
    h = scripted_run()
    standby = fold(h.log)
    assert state_of(standby, h.now) == state_of(h.d, h.now)
    assert state_of(standby, h.now + 60) == state_of(h.d, h.now + 60)  # the premium jobs overdue too


def test_the_new_leader_starts_jobs_in_the_order_the_old_one_would_have():
    h = scripted_run()
    standby = fold(h.log)
    ready = h.now + GRACE
    expected = [job.job_id for job in h.d.policy.predicted_order(ready)]
    standby.take_over(h.now)
    started, finished = [], {}
    for _ in range(len(expected)):  # one fresh agent, finishing each job at once
        standby.report(status("b1", last_assignment=standby.seq, leader_epoch=2, **finished), ready)
        (assigned,) = [d for d in standby.tick(ready).decisions if d["kind"] == "ASSIGNED"]
        started.append(assigned["job_id"])
        finished = {"finished_job_id": assigned["job_id"], "finished_epoch": assigned["epoch"],
                    "finished_outcome": "COMPLETED"}
    assert started == expected


def test_decisions_of_a_deposed_leader_are_ignored():
    old = Harness()
    for i in range(4):
        old.enqueue(f"j{i}")
    old.report("a1")
    old.tick()
    new = fold(old.log)
    new_log = new.take_over(old.now).decisions
    assert new.leader_epoch == 2 and new_log[0]["kind"] == "LEADER"
    # The old leader has not noticed yet: it queues, starts and finishes jobs of its own.
    stale_start = len(old.log)
    old.enqueue("late")
    old.report("a2")
    old.tick()
    old.report("a1", finished_job_id="j0", finished_epoch=1, finished_outcome="COMPLETED")
    stale = old.log[stale_start:]
    assert {d["kind"] for d in stale} == {"QUEUED", "ASSIGNED", "DONE"}
    # The new leader decides on.
    new.report(status("a3", leader_epoch=2), old.now)
    new_orders = new.tick(old.now + GRACE)
    new_log += new_orders.decisions
    assert kinds(new_orders) == [("ASSIGNED", "j1")]
    third = fold(old.log[:stale_start] + new_log[:1] + stale + new_log[1:])
    assert state_of(third, old.now) == state_of(new, old.now)
    assert "late" not in third.jobs and third.jobs["j0"].state == "assigned"


def test_after_take_over_agents_of_running_jobs_get_the_timeout_to_report():
    h = Harness()
    h.run("j1", "a1")
    h.run("j2", "a2")
    standby = fold(h.log)
    later = h.now + 100  # long after the log last saw them
    standby.take_over(later)
    assert not standby.tick(later + GRACE).decisions
    standby.report(status("a2", state="BUSY", job_id="j2", epoch=1, total_steps=10, last_assignment=2,
                          leader_epoch=2), later + 5)
    assert not standby.tick(later + TIMEOUT).decisions
    orders = standby.tick(later + TIMEOUT + 0.1)
    assert kinds(orders) == [("REQUEUED", "j1"), ("AGENT_DEAD", "")]
    assert sent(orders) == [("REVOKE", "a1", "j1", 1)]
    assert standby.jobs["j2"].state == "assigned"


# -- positions -----------------------------------------------------------------------------------------------------
def test_positions_in_predicted_order_with_etas_from_step_times():
    h = Harness()
    h.run("r1", "a1", model="m1", steps=10)
    h.run("r2", "a2", model="m2", steps=20)
    h.report("a1", state="BUSY", job_id="r1", epoch=1, step=4, total_steps=10, models=["m1"], step_s=0.5)
    h.report("a2", state="BUSY", job_id="r2", epoch=1, step=0, total_steps=20, models=["m2"], step_s=1.0)
    h.enqueue("j1", tenant="A", model="m1", steps=10)
    h.enqueue("j3", tenant="A", model="m1", steps=10)
    h.enqueue("j2", tenant="B", model="m2", steps=20)
    # a1 free in 3 s, a2 in 20 s. j1 → a1 at +3 (until +8); j2 → a1 at +8; j3 → a2 at +20.
    shown = h.d.positions(h.now)
    assert [(p["job_id"], p["position"], p["waiting"], p["eta_s"]) for p in shown] == [
        ("j1", 1, 3, 3.0), ("j2", 2, 3, 8.0), ("j3", 3, 3, 20.0)]
    assert h.d.positions(h.now) == []  # nothing changed: nothing sent
    h.enqueue("p1", "premium", model="m1", steps=10)
    moved = h.d.positions(h.now)
    assert [(p["job_id"], p["position"]) for p in moved] == [("p1", 1), ("j1", 2), ("j2", 3), ("j3", 4)]
    assert h.d.positions(h.now) == []


def test_ticks_publish_positions_at_most_once_an_interval():
    h = Harness()
    h.enqueue("j1")
    first = h.tick()
    assert [(p["job_id"], p["position"], p["eta_s"]) for p in first.positions] == [("j1", 1, None)]
    h.enqueue("j2")
    h.now += 0.5
    assert not h.tick().positions
    h.now += 0.5
    assert [(p["job_id"], p["position"]) for p in h.tick().positions] == [("j2", 2)]


def test_an_assignment_its_agent_read_but_did_not_take_is_requeued():
    h = Harness()
    h.run("j1", "a1")
    # Busy with another job (an order of a deposed leader), every order read, j1 neither running nor finished.
    orders = h.report("a1", state="BUSY", job_id="stray", epoch=1)
    assert kinds(orders) == [("REQUEUED", "j1")]
    assert orders.decisions[0]["reason"] == "not taken by its agent"
    assert h.d.jobs["j1"].state == "waiting"


def test_an_assignment_not_yet_read_is_not_requeued():
    h = Harness()
    h.run("j1", "a1")
    h.read["a1"] = 0  # the report crossed the ASSIGN
    assert not h.report("a1", state="IDLE")
    assert h.d.jobs["j1"].state == "assigned"

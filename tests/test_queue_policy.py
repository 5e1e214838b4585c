"""QueuePolicy: tier shares, tenant turns, requeued jobs first, model affinity, overdue jobs and preemption,
predicted order and start estimates. Plain function calls on a fake clock (``now`` is passed explicitly)."""

import copy
import itertools
from collections import Counter

import pytest

from consumers.queue_policy import AgentView, QueuePolicy, WaitingJob, start_estimates

T0 = 1_000.0
TIERS = ("premium", "standard", "free")
_ids = itertools.count(1)


def job(tier="standard", tenant="t1", model="m1", steps=10, queued_at=T0, job_id=None, steps_done=0) -> WaitingJob:
    return WaitingJob(job_id or f"{tier[0]}{next(_ids)}", tier, tenant, model, steps, queued_at, steps_done)


def fill(policy: QueuePolicy, tier: str, count: int, tenant="t1", queued_at=T0) -> list[WaitingJob]:
    jobs = [job(tier, tenant, queued_at=queued_at) for _ in range(count)]
    for each in jobs:
        policy.add(each)
    return jobs


def starts(policy: QueuePolicy, count: int | None = None, now=T0) -> list[WaitingJob]:
    out = []
    while (count is None or len(out) < count) and (each := policy.next_job(now)) is not None:
        out.append(each)
    return out


def idle(agent_id, *models, since=T0) -> AgentView:
    return AgentView(agent_id, frozenset(models), idle_since=since)


def running(agent_id, job_id, tier, step, total_steps=10) -> AgentView:
    return AgentView(agent_id, job_id=job_id, tier=tier, step=step, total_steps=total_steps)


def longest_run(tiers: list[str]) -> dict[str, int]:
    runs: dict[str, int] = {}
    for tier, group in itertools.groupby(tiers):
        runs[tier] = max(runs.get(tier, 0), len(list(group)))
    return runs


# -- tier shares ---------------------------------------------------------------------------------------------------
def test_backlogged_tiers_start_6_3_1_interleaved():
    policy = QueuePolicy()
    for tier in TIERS:
        fill(policy, tier, 200)
    tiers = [each.tier for each in starts(policy, 100)]
    assert Counter(tiers[:20]) == {"premium": 12, "standard": 6, "free": 2}
    counts = Counter(tiers)
    for tier, exact in (("premium", 60), ("standard", 30), ("free", 10)):
        assert abs(counts[tier] - exact) <= 1, counts
    # Interleaved, not in runs: premium never more than twice in a row, the others never twice, free in every 10.
    assert longest_run(tiers) == {"premium": 2, "standard": 1, "free": 1}
    assert all("free" in tiers[i:i + 10] for i in range(0, 100, 10))


@pytest.mark.parametrize("tier", TIERS)
def test_a_lone_tier_is_served_at_once(tier):
    policy = QueuePolicy()
    for other in TIERS:  # the other tiers were served a while and have emptied
        fill(policy, other, 3)
    starts(policy)
    lone = fill(policy, tier, 2)
    assert starts(policy) == lone


def test_a_lone_free_job_among_empty_tiers_starts_even_after_free_was_served_ahead():
    policy = QueuePolicy()
    for tier in TIERS:
        fill(policy, tier, 10)
    assert [each.tier for each in starts(policy, 7)][-1] == "free"  # free has just had its turn
    for each in list(policy.by_id.values()):
        if each.tier != "free":
            policy.remove(each.job_id)
    assert policy.next_job(T0).tier == "free"


def test_custom_weights():
    policy = QueuePolicy({"gold": 3, "bronze": 1}, preempting_tiers=("gold",))
    fill(policy, "gold", 100)
    fill(policy, "bronze", 100)
    assert Counter(each.tier for each in starts(policy, 40)) == {"gold": 30, "bronze": 10}


def test_unknown_tier_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown tier"):
        QueuePolicy().add(job("gold"))
    with pytest.raises(ValueError, match="preempting tiers"):
        QueuePolicy({"gold": 1}, preempting_tiers=("premium",))
    with pytest.raises(ValueError, match="at least 0"):
        QueuePolicy(preempt_after_s=-1)


# -- tenants, FIFO, requeued jobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("served_before", [0, 1, 5])
def test_one_tenants_burst_keeps_another_tenants_job_behind_at_most_one(served_before):
    policy = QueuePolicy()
    burst = fill(policy, "standard", 1_000, tenant="A")
    assert starts(policy, served_before) == burst[:served_before]
    (single,) = fill(policy, "standard", 1, tenant="B")
    assert single in starts(policy, 2)


def test_tenants_take_turns_fifo_inside_each():
    policy = QueuePolicy()
    a = fill(policy, "free", 3, tenant="A")
    b = fill(policy, "free", 2, tenant="B")
    c = fill(policy, "free", 1, tenant="C")
    assert [each.job_id for each in starts(policy)] == [x.job_id for x in (a[0], b[0], c[0], a[1], b[1], a[2])]


def test_a_tenant_coming_back_goes_to_the_back_of_the_turn():
    policy = QueuePolicy()
    a = fill(policy, "free", 3, tenant="A")
    b = fill(policy, "free", 3, tenant="B")
    assert starts(policy, 1) == [a[0]]
    policy.remove(a[1].job_id)
    policy.remove(a[2].job_id)  # A empties...
    a_again = fill(policy, "free", 1, tenant="A")  # ...and comes back behind B, which was waiting
    assert starts(policy) == [b[0], a_again[0], b[1], b[2]]


def test_requeued_jobs_go_first_in_their_tier_oldest_first():
    policy = QueuePolicy()
    waiting = [job("free", "A", queued_at=T0 + i) for i in range(3)]
    for each in waiting:
        policy.add(each)
    newer = job("free", "B", queued_at=T0 + 50, steps_done=4)
    older = job("free", "C", queued_at=T0 - 50, steps_done=7)
    policy.add(newer, front=True)
    policy.add(older, front=True)
    policy.add(newer, front=True)  # known: changes nothing
    assert len(policy) == 5
    assert starts(policy) == [older, newer, *waiting]


def test_requeued_jobs_keep_their_tiers_share():
    """Front of its tier, not of the fleet: a requeued free job still waits for free's turn."""
    policy = QueuePolicy()
    fill(policy, "premium", 20)
    fill(policy, "standard", 20)
    back = job("free", queued_at=T0 - 100)
    policy.add(back, front=True)
    order = starts(policy, 10, now=T0)
    assert order.index(back) == [each.tier for each in order].index("free") == 6  # "psppspfpsp"


def test_remove_and_contains():
    policy = QueuePolicy()
    a, b = fill(policy, "standard", 2, tenant="A")
    r = job("standard")
    policy.add(r, front=True)
    assert a.job_id in policy and len(policy) == 3
    assert policy.remove(r.job_id) is r and policy.remove(a.job_id) is a
    assert policy.remove("nope") is None
    assert a.job_id not in policy and policy.waiting_by_tier() == {"premium": 0, "standard": 1, "free": 0}
    assert starts(policy) == [b]


# -- model affinity ------------------------------------------------------------------------------------------------
def test_an_idle_agent_with_the_model_is_preferred():
    wanted = job(model="m1")
    agents = [idle("a-other", "m2", since=T0 - 50), idle("a-empty", since=T0 - 40), idle("a-match", "m2", "m1")]
    assert QueuePolicy.place(wanted, agents).agent_id == "a-match"


def test_else_an_agent_with_no_model_loaded():
    wanted = job(model="m1")
    agents = [idle("a-other", "m2", since=T0 - 50), idle("a-empty", since=T0)]
    assert QueuePolicy.place(wanted, agents).agent_id == "a-empty"


def test_else_the_agent_idle_longest():
    wanted = job(model="m1")
    agents = [idle("a-new", "m2", since=T0), idle("a-old", "m3", since=T0 - 9), idle("a-mid", "m2", since=T0 - 5)]
    assert QueuePolicy.place(wanted, agents).agent_id == "a-old"


def test_a_job_is_never_held_back_for_affinity():
    policy = QueuePolicy()
    wanted = job(model="m1")
    policy.add(wanted)
    agent = idle("a-other", "m2")
    assert [(j.job_id, a.agent_id) for j, a in policy.dispatch([agent], T0)] == [(wanted.job_id, "a-other")]
    assert len(policy) == 0


def test_dispatch_places_each_job_on_its_model_and_starts_no_more_than_idle_agents():
    policy = QueuePolicy()
    first, second, third = (job("standard", tenant, model) for tenant, model in (("A", "m1"), ("B", "m2"), ("C", "m1")))
    for each in (first, second, third):
        policy.add(each)
    pairs = policy.dispatch([idle("a2", "m2"), idle("a1", "m1")], T0)
    assert [(j.job_id, a.agent_id) for j, a in pairs] == [(first.job_id, "a1"), (second.job_id, "a2")]
    assert list(policy.by_id) == [third.job_id]
    assert policy.dispatch([], T0) == [] and len(policy) == 1


# -- overdue jobs and preemption -----------------------------------------------------------------------------------
def test_an_overdue_premium_job_goes_first_whatever_the_credits():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "standard", 5)
    fill(policy, "free", 5)
    (p1,) = fill(policy, "premium", 1, queued_at=T0)
    assert policy.next_job(T0 + 1) is p1  # premium's turn by credits; premium now owes
    (p2,) = fill(policy, "premium", 1, queued_at=T0 + 1)
    credits = policy.picker.credits
    assert policy.predicted_order(T0 + 2, limit=1)[0].tier == "standard"  # on time: standard's turn
    assert policy.next_job(T0 + 31.5) is p2  # overdue: first
    assert policy.picker.credits == credits  # and no tier paid for it
    assert policy.next_job(T0 + 31.5).tier == "standard"  # then the turns go on where they were


def test_overdue_jobs_go_oldest_first_across_front_and_tenants():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "free", 3)
    a = job("premium", "A", queued_at=T0 + 5)
    b = job("premium", "B", queued_at=T0)
    front = job("premium", "C", queued_at=T0 + 2)
    late_c = job("premium", "C", queued_at=T0 + 40)  # not yet overdue at T0 + 50
    for each in (a, b, late_c):
        policy.add(each)
    policy.add(front, front=True)
    assert [each.job_id for each in policy.overdue(T0 + 50)] == [b.job_id, front.job_id, a.job_id]
    assert starts(policy, 3, now=T0 + 50) == [b, front, a]


def test_only_preempting_tiers_are_ever_overdue():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "standard", 2, queued_at=T0 - 1_000)
    assert policy.overdue(T0) == []
    assert policy.preemption([running("a1", "f1", "free", 0)], set(), T0) is None


def test_preemption_picks_the_lowest_tier_least_advanced_running_job():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "premium", 1, queued_at=T0)
    busy = [running("a1", "s1", "standard", 0), running("a2", "f1", "free", 5), running("a3", "f2", "free", 2),
            running("a4", "p1", "premium", 0), running("a5", "f3", "free", 8)]
    assert policy.preemption(busy, set(), T0 + 10) is None  # not overdue yet
    assert policy.preemption(busy, set(), T0 + 31).agent_id == "a3"
    # Without free jobs: the standard one; never a job of the same or a higher tier.
    assert policy.preemption([busy[0], busy[3]], set(), T0 + 31).agent_id == "a1"
    assert policy.preemption([busy[3], running("a6", "p2", "premium", 1)], set(), T0 + 31) is None


def test_preemption_ties_go_to_the_longer_job():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "premium", 1, queued_at=T0)
    busy = [running("a1", "f1", "free", 2, total_steps=10), running("a2", "f2", "free", 2, total_steps=50)]
    assert policy.preemption(busy, set(), T0 + 31).agent_id == "a2"


def test_one_preemption_per_overdue_job():
    policy = QueuePolicy(preempt_after_s=30)
    fill(policy, "premium", 1, queued_at=T0)
    busy = [running("a1", "f1", "free", 1), running("a2", "f2", "free", 2)]
    assert policy.preemption(busy, set(), T0 + 31).agent_id == "a1"
    assert policy.preemption(busy, {"f1"}, T0 + 31) is None  # that overdue job has its preemption
    fill(policy, "premium", 1, queued_at=T0 + 1)  # a second overdue job gets a second one, from another job
    assert policy.preemption(busy, {"f1"}, T0 + 32).agent_id == "a2"
    assert policy.preemption(busy, {"f1", "f2"}, T0 + 32) is None


def test_preempt_after_none_never_preempts():
    policy = QueuePolicy(preempt_after_s=None)
    fill(policy, "standard", 1, queued_at=T0)
    (p,) = fill(policy, "premium", 1, queued_at=T0 - 10_000)
    assert policy.overdue(T0 + 10_000) == []
    assert policy.preemption([running("a1", "f1", "free", 0)], set(), T0 + 10_000) is None
    policy.next_job(T0)  # premium by credits; the next start goes by credits too, however long p2 waits
    fill(policy, "premium", 1, queued_at=T0 - 10_000)
    assert policy.next_job(T0 + 10_000).tier == "standard"
    assert p.job_id not in policy


# -- predicted order and start estimates ---------------------------------------------------------------------------
def _mixed_queue() -> QueuePolicy:
    policy = QueuePolicy(preempt_after_s=30)
    for tenant in ("A", "B"):
        fill(policy, "premium", 3, tenant, queued_at=T0)
        fill(policy, "standard", 4, tenant, queued_at=T0 + 1)
        fill(policy, "free", 3, tenant, queued_at=T0 + 2)
    fill(policy, "standard", 5, "C", queued_at=T0 + 3)
    policy.add(job("free", "A", queued_at=T0 - 5), front=True)
    starts(policy, 4, now=T0 + 10)  # credits and tenant turns somewhere mid-cycle
    return policy


@pytest.mark.parametrize("now", [T0 + 10, T0 + 35])  # nothing overdue; the premium jobs overdue
def test_predicted_order_is_the_order_of_the_next_starts_and_changes_nothing(now):
    policy = _mixed_queue()
    credits, by_tier, size = policy.picker.credits, policy.waiting_by_tier(), len(policy)
    tenant_turns = {tier: list(queue.tenants) for tier, queue in policy.tiers.items()}
    predicted = [each.job_id for each in policy.predicted_order(now)]
    assert [each.job_id for each in policy.predicted_order(now, limit=5)] == predicted[:5]
    assert policy.picker.credits == credits and policy.waiting_by_tier() == by_tier and len(policy) == size
    assert {tier: list(queue.tenants) for tier, queue in policy.tiers.items()} == tenant_turns
    assert len(predicted) == size
    assert [each.job_id for each in starts(policy, now=now)] == predicted


def test_take_replays_the_start_next_job_made():
    """What a new leader folding ASSIGNED decisions does: the same tier credits and tenant turns as the live picks."""
    live = _mixed_queue()
    folded = copy.deepcopy(live)
    for now in (T0 + 10, T0 + 10, T0 + 35, T0 + 10, T0 + 35, T0 + 10, T0 + 10):  # picks and overdue starts
        started = live.next_job(now)
        assert folded.take(started.job_id, now).job_id == started.job_id
        assert folded.picker.credits == live.picker.credits
        assert [j.job_id for j in folded.predicted_order(now)] == [j.job_id for j in live.predicted_order(now)]
    assert folded.take("unknown", T0) is None


def test_start_estimates_by_hand():
    now = 100.0
    j1, j2, j3 = job(model="m1", steps=10), job(model="m2", steps=20), job(model="m1", steps=5)
    j1.steps_done = 4  # resumes: 6 steps left
    # Agents free at 100 (idle) and 130; m1 takes 2 s a step, m2 1 s.
    # j1 → agent 1 at 100 (eta 0), busy until 112; j2 → agent 1 at 112 (eta 12), until 132; j3 → agent 2 at 130.
    assert start_estimates([j1, j2, j3], [130.0, 100.0], {"m1": 2.0, "m2": 1.0}, now, None) == [0.0, 12.0, 30.0]


def test_start_estimates_unknown_step_times():
    now = 100.0
    j1, j2, j3 = job(model="m1"), job(model="m9"), job(model="m1")
    assert start_estimates([j1], [], {"m1": 2.0}, now, None) == [None]  # no agents
    # A model with no step time: unknown from that job on.
    assert start_estimates([j1, j2, j3], [now], {"m1": 2.0}, now, None) == [0.0, None, None]
    # With a default step time it is used instead.
    assert start_estimates([j1, j2, j3], [now], {"m1": 2.0}, now, 3.0) == [0.0, 20.0, 50.0]


# -- devices: jobs that need an agent group of N run only on agents of N --------------------------------------------
def sized(job_: WaitingJob, devices: int) -> WaitingJob:
    job_.devices = devices
    return job_


def test_jobs_go_only_to_agents_of_the_size_they_need():
    policy = QueuePolicy()
    big = [policy.add(j) or j for j in (sized(job("premium", model="big"), 2), sized(job("premium", model="big"), 2))]
    small = [policy.add(j) or j for j in (job("free", model="m1"), job("free", model="m1"))]
    group = AgentView("group", devices=2, idle_since=T0)
    single = AgentView("single", idle_since=T0)
    placed = {agent.agent_id: j.job_id for j, agent in policy.dispatch([single, group], T0)}
    # premium goes first by weight, but only the group can take it; the single agent still gets a free job at once
    assert placed == {"group": big[0].job_id, "single": small[0].job_id}
    assert [j.job_id for j, _ in policy.dispatch([single], T0)] == [small[1].job_id]
    assert policy.dispatch([single], T0) == [], "a job for a group never lands on a single device"
    assert [j.job_id for j, _ in policy.dispatch([group], T0)] == [big[1].job_id]


def test_a_job_no_idle_agent_fits_keeps_its_place_and_tenants_keep_their_turns():
    policy = QueuePolicy()
    first = sized(job("standard", tenant="a"), 2)
    policy.add(first)
    second, third = job("standard", tenant="b"), job("standard", tenant="a")
    policy.add(second), policy.add(third)
    assert policy.next_job(T0, devices={1}) is third, "tenant a's turn: its next job that fits"
    assert policy.next_job(T0, devices={1}) is second
    assert policy.next_job(T0, devices={1}) is None and first.job_id in policy
    assert policy.next_job(T0, devices={2}) is first and len(policy) == 0


def test_preemption_only_asks_an_agent_of_the_overdue_jobs_size():
    policy = QueuePolicy(preempt_after_s=30)
    late = sized(job("premium", queued_at=T0), 2)
    policy.add(late)
    on_single = running("single", "f1", "free", step=1)
    on_group = AgentView("group", job_id="f2", tier="free", step=5, total_steps=10, devices=2)
    assert policy.preemption([on_single, on_group], set(), T0 + 31).agent_id == "group"
    assert policy.preemption([on_single], set(), T0 + 31) is None

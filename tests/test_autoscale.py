"""The autoscaling policy (streams/autoscale.py) on recorded traces (tests/data/autoscale_*.csv) and edge cases."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

from streams.autoscale import Autoscaler, AutoscalePolicy, AutoscaleState, Observation, decide

DATA = Path(__file__).parent / "data"


def load_trace(name: str) -> list[Observation]:
    with open(DATA / name, newline="") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [Observation(at_s=float(r["at_s"]), waiting={"gpu-agent": float(r["waiting"])},
                            gpu_util=[float(r["gpu_util"])] if r["gpu_util"] else []) for r in rows]


def replay(policy: AutoscalePolicy, replicas: int, trace: list[Observation]) -> list[tuple[float, int, str]]:
    """(time, replicas after the decision, reason) for every observation."""
    scaler = Autoscaler(policy, replicas)
    return [(obs.at_s, (d := scaler.observe(obs)).desired, d.reason) for obs in trace]


def changes(history):
    out, previous = [], None
    for at, replicas, _ in history:
        if previous is not None and replicas != previous:
            out.append((at, replicas - previous))
        previous = replicas
    return out


def test_burst_scales_up_ten_percent_per_cooldown_then_holds():
    history = replay(AutoscalePolicy(max_replicas=1000), 100, load_trace("autoscale_burst.csv"))
    ups = changes(history)
    # The burst lasts minutes 10..19; with a 120 s cooldown the fleet steps at 10, 12, 14, 16, 18 minutes.
    assert [at for at, _ in ups] == [600, 720, 840, 960, 1080]
    assert [h[1] for h in history if h[0] in (600, 720, 840, 960, 1080)] == [110, 121, 134, 148, 163]
    # After the burst the fleet is busy (90%): it keeps its size.
    assert history[-1][1] == 163
    assert "waiting" in history[10][2]


def test_slow_decay_waits_thirty_minutes_under_forty_percent_then_steps_down_with_cooldown():
    policy = AutoscalePolicy(max_replicas=1000)
    trace = load_trace("autoscale_slow_decay.csv")
    history = replay(policy, 200, trace)
    first_low = next(obs.at_s for obs in trace if obs.mean_util < 0.4)
    downs = changes(history)
    assert downs, "an idle fleet must shrink"
    assert all(delta < 0 for _, delta in downs)
    assert downs[0][0] == first_low + policy.scale_down_after_s
    gaps = [b[0] - a[0] for a, b in zip(downs, downs[1:])]
    assert all(gap >= policy.cooldown_down_s for gap in gaps)
    assert [h[1] for h in history if h[0] in (downs[0][0], downs[1][0])] == [180, 162]


def test_cooldowns_stop_flapping_around_the_threshold():
    trace = load_trace("autoscale_flapping.csv")
    eager = AutoscalePolicy(max_replicas=1000, scale_down_after_s=300, cooldown_up_s=0, cooldown_down_s=0)
    calm = replace(eager, cooldown_up_s=300, cooldown_down_s=900)

    def churn(history):  # replicas started plus replicas stopped over the trace
        return sum(abs(delta) for _, delta in changes(history))

    eager_history, calm_history = replay(eager, 100, trace), replay(calm, 100, trace)
    assert len(changes(eager_history)) > 2 * len(changes(calm_history))
    assert churn(calm_history) < churn(eager_history) / 2
    # No scale-down within cooldown_down_s of any change, no two scale-ups within cooldown_up_s.
    moves = changes(calm_history)
    for (t0, d0), (t1, d1) in zip(moves, moves[1:]):
        if d1 < 0:
            assert t1 - t0 >= calm.cooldown_down_s
        if d0 > 0 and d1 > 0:
            assert t1 - t0 >= calm.cooldown_up_s


def test_bounds_are_respected_both_ways():
    policy = AutoscalePolicy(min_replicas=20, max_replicas=300, cooldown_up_s=60, cooldown_down_s=300)
    history = replay(policy, 50, load_trace("autoscale_bounds.csv"))
    sizes = [h[1] for h in history]
    assert max(sizes) == 300 and min(sizes) == 20
    assert all(20 <= s <= 300 for s in sizes)
    assert sizes[119] == 300 and sizes[-1] == 20
    assert any("max_replicas" in h[2] for h in history)


def test_a_step_moves_at_least_one_replica_and_out_of_bounds_state_is_clamped():
    policy = AutoscalePolicy(min_replicas=1, max_replicas=10)
    busy = Observation(at_s=0, waiting={"a": 500}, gpu_util=[1.0])
    assert decide(policy, AutoscaleState(replicas=1), busy).desired == 2  # 10% of 1 rounds up to one more
    clamped = decide(policy, AutoscaleState(replicas=50), Observation(at_s=0))
    assert clamped.desired == 10 and "bounds" in clamped.reason and clamped.state.replicas == 10


def test_no_utilisation_samples_neither_start_nor_reset_the_low_clock():
    policy = AutoscalePolicy(scale_down_after_s=600, cooldown_down_s=0)
    state = AutoscaleState(replicas=10)
    state = decide(policy, state, Observation(at_s=0, gpu_util=[0.1])).state
    assert state.low_util_since_s == 0
    state = decide(policy, state, Observation(at_s=300)).state  # no GPU reported
    assert state.low_util_since_s == 0
    d = decide(policy, state, Observation(at_s=600, gpu_util=[0.2, 0.3]))
    assert d.desired == 9 and d.changed
    # A backlog restarts it even with idle GPUs (jobs are waiting for capacity that is not there yet).
    assert decide(policy, d.state, Observation(at_s=700, waiting={"x": 101}, gpu_util=[0.1])).state.low_util_since_s is None


def test_decide_is_pure():
    policy, state = AutoscalePolicy(), AutoscaleState(replicas=100)
    obs = Observation(at_s=10, waiting={"a": 80, "b": 80}, gpu_util=[1.0])
    first, second = decide(policy, state, obs), decide(policy, state, obs)
    assert first == second and state == AutoscaleState(replicas=100)
    assert first.desired == 110  # the waiting of all stages given is summed: 160 > 100


@pytest.mark.parametrize("kwargs", [dict(min_replicas=5, max_replicas=4), dict(step_down=1.0),
                                    dict(scale_down_util=1.5), dict(cooldown_up_s=-1)])
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        AutoscalePolicy(**kwargs)


# -- the demand policy ----------------------------------------------------------------------------------------------
from streams.autoscale import DemandPolicy  # noqa: E402

TICK_S = 30.0


def demand_trace(gpus_busy_by_tick, waiting_gpu_s=None) -> list[Observation]:
    """Observations every TICK_S of a fleet whose arriving work keeps ``gpus`` GPUs busy (Little's law: GPU-seconds
    arriving per second), with that many running; ``waiting_gpu_s``: tick → {tier: GPU-seconds waiting}."""
    waiting_gpu_s = waiting_gpu_s or {}
    return [Observation(at_s=i * TICK_S, arrived_gpu_s=gpus * TICK_S, running_gpus=gpus,
                        waiting_gpu_s=waiting_gpu_s.get(i, {})) for i, gpus in enumerate(gpus_busy_by_tick)]


def needed_pods(gpus: float, policy: DemandPolicy) -> int:
    return -(-int(gpus + policy.safety * gpus ** 0.5) // policy.gpus_per_replica)


def test_demand_policy_sizes_a_steady_fleet_by_square_root_staffing():
    policy = DemandPolicy()
    history = replay(policy, 1, demand_trace([800.0] * 40))
    assert history[-1][1] == needed_pods(800, policy) == 106  # 800 + 1.5·√800 = 842 GPUs in pods of 8: 94% busy
    assert {replicas for _, replicas, _ in history} == {106}, "the right size at the first look, then steady"


def test_demand_policy_answers_a_burst_at_once_and_clears_a_backlog_within_the_objectives():
    policy = DemandPolicy()
    trace = demand_trace([400.0] * 20, waiting_gpu_s={10: {"premium": 30_000.0}})  # 30k GPU-s arrive waiting
    history = replay(policy, needed_pods(400, policy), trace)
    before, at_burst = history[9][1], history[10][1]
    assert at_burst - before == -(-30_000 // 300 // 8), "the backlog's GPU-seconds over the lead time, in pods"
    assert "up:" in history[10][2]


def test_demand_policy_follows_a_slow_decay_down_but_never_below_what_the_work_needs():
    policy = DemandPolicy()
    gpus = [800.0 - 600.0 * i / 240 for i in range(240)] + [200.0] * 60  # 2 h down to a quarter, then flat
    history = replay(policy, needed_pods(800, policy), demand_trace(gpus))
    for (at, replicas, _), busy in zip(history, gpus):
        assert replicas * policy.gpus_per_replica >= busy, f"below the running work at {at} s"
    for (_, before, _), (_, after, _) in zip(history, history[1:]):
        assert after >= min(before - 1, int(before * (1 - policy.step_down) + 1e-9)), "at most 10% per step down"
    assert history[-1][1] <= needed_pods(200, policy) * 1.06, "and it gets there"


def test_demand_policy_leads_a_rising_daily_curve():
    import math

    policy = DemandPolicy()
    day = [500.0 + 400.0 * math.sin(2 * math.pi * i / 2880) for i in range(2880)]  # one day, ticks of 30 s
    history = replay(policy, needed_pods(day[0], policy), demand_trace(day))
    short = [i for i, ((_, replicas, _), busy) in enumerate(zip(history, day))
             if replicas * policy.gpus_per_replica < busy]
    assert not short, f"fewer GPUs than busy ones at ticks {short[:5]}"
    over = sum(r * policy.gpus_per_replica for _, r, _ in history[100:]) / sum(day[100:])
    assert over < 1.15, f"provisioned {over:.2f}x the busy GPUs over the day"


def test_demand_policy_does_not_flap_on_noise():
    import random

    rng = random.Random(7)
    policy = DemandPolicy()
    noisy = [600.0 * (1 + rng.uniform(-0.1, 0.1)) for _ in range(400)]
    history = replay(policy, needed_pods(600, policy), demand_trace(noisy))
    assert len(changes(history)) <= 3, changes(history)


def test_a_switch_to_a_slower_model_grows_the_fleet_where_the_job_count_rule_sees_nothing():
    """The same 2 jobs a second, but each now takes 3x the GPU time (a 14B model instead of a 1.3B one): the work
    in GPU-seconds triples. The seed's rule counts waiting jobs; until a queue of 100 has formed it holds."""
    policy = DemandPolicy(lead_s=60.0, rate_tau_s=60.0)
    per_job_s = [65.0] * 40 + [195.0] * 80
    trace = [Observation(at_s=i * TICK_S, arrived_gpu_s=2 * TICK_S * s, running_gpus=min(2 * s, 2 * 65 + 2 * i))
             for i, s in enumerate(per_job_s)]
    history = replay(policy, needed_pods(130, policy), trace)
    assert history[39][1] == needed_pods(130, policy)
    assert history[-1][1] >= needed_pods(390, policy), history[-1]
    seed = replay(AutoscalePolicy(), needed_pods(130, policy),
                  [replace(obs, waiting={"gpu-agent": 0.0}, gpu_util=[0.95]) for obs in trace])
    assert seed[-1][1] == needed_pods(130, policy), "the job-count rule saw no queue and held"


def test_demand_policy_settings_are_checked():
    for bad in (dict(gpus_per_replica=0), dict(wait_objectives_s={"premium": 0}), dict(step_down=1.5),
                dict(min_replicas=5, max_replicas=2), dict(lead_s=-1)):
        with pytest.raises(ValueError):
            DemandPolicy(**bad)

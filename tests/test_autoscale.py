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

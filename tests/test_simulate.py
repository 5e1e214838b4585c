"""The fleet simulator (bench/simulate.py, `vidgen simulate`): small seeded runs, each well under a second."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.simulate import SimConfig, curve_kappa, DailyCurve, main, simulate, summary
from streams.autoscale import AutoscalePolicy

# ~20k jobs/day at scale 1 keep every run tiny; a flat curve makes the expected figures easy to state.
SMALL = SimConfig(jobs_per_day=20_000, curve="flat", hours=3, scale=1.0, failure_rate=0.0, preemption_rate=0.0,
                  seed=7)
EQUAL_MIX = {"premium": 1 / 3, "standard": 1 / 3, "free": 1 / 3}


def test_the_daily_curve_has_the_asked_peak_and_mean():
    cfg = SimConfig()
    curve = DailyCurve(cfg)
    assert curve.max_rate / curve.mean == pytest.approx(3.0, rel=1e-6)
    assert curve_kappa(3.0) == pytest.approx(1.76, abs=0.01)
    samples = [curve.rate(t) for t in range(0, 86_400, 60)]
    assert sum(samples) / len(samples) == pytest.approx(cfg.jobs_per_day / 86_400, rel=1e-3)
    assert max(samples) == pytest.approx(347.2, abs=0.5)  # the seed's ~350/s


def test_default_job_classes_average_130_gpu_seconds():
    # Little's law on the seed's figures: 15,000 concurrent jobs / 115.7 jobs/s = 130 s.
    assert SimConfig().mean_service_s == pytest.approx(130.0)


def test_littles_law_holds():
    res = simulate(replace(SMALL, autoscale=False, pods=8))  # 64 GPUs for ~30 busy: no queueing to speak of
    arrival_rate = res.jobs_arrived / res.window_s
    mean_service = res.busy_gpu_s / max(res.jobs_done, 1)
    assert res.mean_running == pytest.approx(arrival_rate * SMALL.mean_service_s, rel=0.1)
    assert res.mean_running == pytest.approx(arrival_rate * mean_service, rel=0.08)
    m = summary(res)
    assert m["p99_wait_free_s"] == 0.0 and m["gpu_util"] == pytest.approx(res.mean_running / 64, rel=1e-6)


def test_more_failures_lose_more_gpu_seconds():
    base = replace(SMALL, checkpoint_s=60)
    few = simulate(replace(base, failure_rate=0.02))
    many = simulate(replace(base, failure_rate=0.2))
    assert many.failures > few.failures
    assert many.interruptions > few.interruptions
    assert many.lost_gpu_s > few.lost_gpu_s > 0
    assert few.jobs_done > 0 and many.jobs_done > 0


def test_shorter_checkpoint_interval_loses_less_work():
    base = replace(SMALL, failure_rate=0.2, preemption_rate=0.05)
    lost = {interval: simulate(replace(base, checkpoint_s=interval)).lost_gpu_s for interval in (0, 120, 30, 10)}
    assert lost[0] > lost[120] > lost[30] > lost[10] > 0
    costs = {interval: simulate(replace(base, checkpoint_s=interval)).checkpoint_gpu_s for interval in (120, 10)}
    assert costs[10] > costs[120]  # ... paid for by more checkpoint stalls


def test_tier_weights_give_premium_shorter_waits_under_contention():
    # A fixed fleet slightly too small for the load: a queue builds and the weighted scheduler decides who waits.
    busy = replace(SMALL, autoscale=False, pods=3, mix=EQUAL_MIX, hours=2)  # 24 GPUs for ~30 GPUs of work
    res = simulate(busy)
    p50 = {tier: res.wait_stats(tier)[0] for tier in res.waits}
    mean = {tier: res.wait_stats(tier)[2] for tier in res.waits}
    assert mean["premium"] < mean["standard"] < mean["free"]
    assert p50["premium"] * 5 < p50["free"]
    # Equal weights and no overdue rule (premium jobs late by 30 s go first): no tier is favoured (within noise).
    flat = simulate(replace(busy, weights={"premium": 1, "standard": 1, "free": 1}, preempt_after_s=None))
    flat_means = [flat.wait_stats(tier)[2] for tier in flat.waits]
    assert max(flat_means) < 1.5 * min(flat_means)


def test_the_autoscaler_adds_capacity_under_a_burst():
    policy = AutoscalePolicy(min_replicas=1, max_replicas=100, cooldown_up_s=60)
    start_small = replace(SMALL, pods=1, policy=policy, hours=2, pod_startup_s=120)
    scaled = simulate(start_small)
    fixed = simulate(replace(start_small, autoscale=False))
    assert scaled.scale_ups > 0 and scaled.peak_pods > 1
    assert fixed.peak_pods == 1
    assert scaled.jobs_done > 2 * fixed.jobs_done
    assert scaled.wait_stats("free")[2] < fixed.wait_stats("free")[2] / 5


def test_runs_are_deterministic_for_a_seed():
    cfg = replace(SMALL, failure_rate=0.1, hours=1)
    a, b = simulate(cfg), simulate(cfg)
    assert (a.jobs_done, a.lost_gpu_s, a.waits) == (b.jobs_done, b.lost_gpu_s, b.waits)
    assert simulate(replace(cfg, seed=8)).jobs_arrived != a.jobs_arrived


def test_cli_prints_a_result_line(capsys, tmp_path):
    assert main(["--scale", "0.001", "--hours", "2", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT concurrent_jobs=") and " pods=" in lines[-1]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "fleet.png").stat().st_size > 0 and (tmp_path / "waits.png").exists()


# -- the platform's own scheduler and agents, models, policies side by side ---------------------------------------
def erlang_c_wait(servers: int, arrival_rate: float, service_s: float) -> float:
    """Mean wait in queue of M/M/c (Erlang C)."""
    import math

    a = arrival_rate * service_s
    rho = a / servers
    top = a ** servers / math.factorial(servers) / (1 - rho)
    p_wait = top / (sum(a ** k / math.factorial(k) for k in range(servers)) + top)
    return p_wait / (servers / service_s - arrival_rate)


def test_the_simulators_waits_match_an_mmc_queue_on_a_flat_curve():
    """One tier, one model that never needs loading, exponential job times, a fixed pod of 8 GPUs at 80% load:
    the waits the simulated scheduler and agents give are Erlang C's."""
    service_s, servers, rho = 60.0, 8, 0.8
    rate = rho * servers / service_s
    cfg = SimConfig(jobs_per_day=rate * 86_400, curve="flat", hours=60, scale=1.0, failure_rate=0.0,
                    preemption_rate=0.0, autoscale=False, pods=1, gpus_per_pod=servers, mix={"free": 1.0},
                    classes=(("one", 1.0, service_s),), models=(("m", 1.0, 1.0, 0.0),), service_dist="exp",
                    checkpoint_s=0, preempt_after_s=None, seed=3)
    res = simulate(cfg)
    mean_wait = res.wait_stats("free")[2]
    expected = erlang_c_wait(servers, rate, service_s)
    assert res.jobs_done > 10_000
    assert mean_wait == pytest.approx(expected, rel=0.15), (mean_wait, expected)
    assert res.gpu_util == pytest.approx(rho, rel=0.05)


def test_model_affinity_saves_model_loads():
    two_models = replace(SMALL, autoscale=False, pods=6, hours=2,
                         models=(("small", 0.6, 1.0, 20.0), ("big", 0.4, 3.0, 60.0)))
    with_affinity, without = simulate(two_models), simulate(replace(two_models, affinity=False))
    assert with_affinity.load_gpu_s * 3 < without.load_gpu_s, (with_affinity.load_gpu_s, without.load_gpu_s)
    assert with_affinity.cold_loads < without.cold_loads


def test_the_old_partition_owned_dispatch_leaves_agents_idle_while_jobs_wait():
    """More agents than partitions: only the partitions' owners work, whatever waits; the shared queue uses all."""
    fleet = replace(SMALL, autoscale=False, pods=6, hours=2, partitions=16)
    shared, owned = simulate(fleet), simulate(replace(fleet, dispatch="partition"))
    assert owned.wait_stats("standard")[2] > 10 * max(shared.wait_stats("standard")[2], 1.0)
    assert owned.mean_running <= 16 < shared.mean_running


def test_an_overdue_premium_job_makes_a_lower_tier_job_yield():
    busy = replace(SMALL, autoscale=False, pods=3, hours=2, mix=EQUAL_MIX, preempt_after_s=30.0)
    res = simulate(busy)
    assert res.yielded > 0 and res.wait_stats("premium")[1] < res.wait_stats("free")[1]


def test_compare_runs_both_policies_on_the_same_arrivals_and_ends_with_the_result_line(capsys, tmp_path):
    assert main(["--compare", "--scale", "0.0005", "--hours", "4", "--start-hour", "14", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT gpu_util_seed=") and "dispatch=scheduler" in lines[-1]
    fields = dict(item.split("=") for item in lines[-1].split()[1:])
    for key in ("gpu_util_demand", "pods_mean_seed", "p99_wait_premium_s_demand", "cost_per_video_usd_seed",
                "cost_per_video_usd_demand", "p99_wait_free_s_seed"):
        assert key in fields
    pytest.importorskip("matplotlib")
    assert (tmp_path / "compare.png").stat().st_size > 0

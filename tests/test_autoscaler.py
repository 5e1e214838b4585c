"""`vidgen autoscale`: the fleet view over StageStats reports, and the whole loop on the real broker — stage
processes report their lag from librdkafka's statistics, the controller reads vidgen.stats and scales up."""
from __future__ import annotations

import io
import json
import time
import urllib.request

import pytest

from consumers.autoscaler import AutoscaleController, FleetView, run_autoscale
from streams.autoscale import AutoscalePolicy
from streams.embedded import free_port
from streams.events import new_event
from streams.metrics import partition_lags

NOW = 1_800_000_000.0


def report(instance: str, at_s: float, lags: dict[tuple[str, int], int], busy=0.5, gpu=None, stage="gpu-agent"):
    event = new_event("", stage=stage, instance=instance, interval_s=10.0, busy_fraction=busy, gpu_utilization=gpu,
                      lag=[{"topic": t, "partition": p, "lag": lag} for (t, p), lag in lags.items()])
    event["timestamp"] = int(at_s * 1000)
    return event


def test_waiting_counts_each_partition_once_by_its_newest_reporter():
    fleet = FleetView(stale_after_s=30)
    fleet.add(report("a", NOW - 20, {("vidgen.encoded.free", 0): 50, ("vidgen.encoded.free", 1): 10}))
    fleet.add(report("b", NOW - 5, {("vidgen.encoded.free", 1): 70}))  # partition 1 moved to b
    observation = fleet.observation("gpu-agent", NOW)
    assert observation.total_waiting == 120
    assert sorted(observation.gpu_util) == [0.5, 0.5]


def test_silent_instances_drop_out_and_gpu_utilisation_beats_busy_share():
    fleet = FleetView(stale_after_s=30)
    fleet.add(report("gone", NOW - 31, {("vidgen.encoded.free", 0): 500}))
    fleet.add(report("gpu", NOW - 1, {}, busy=0.9, gpu=0.2))
    fleet.add(report("gpu", NOW - 10, {}, busy=0.0, gpu=1.0))  # an older report arriving late changes nothing
    assert [r["instance"] for r in fleet.live("gpu-agent", NOW)] == ["gpu"]
    observation = fleet.observation("gpu-agent", NOW)
    assert observation.total_waiting == 0 and observation.gpu_util == (0.2,)


def test_controller_scales_up_on_backlog_and_follows_the_fleet():
    controller = AutoscaleController(["gpu-agent"], AutoscalePolicy(scale_up_waiting=100, cooldown_up_s=60),
                                     stale_after_s=30)
    for i in range(10):
        controller.fleet.add(report(f"agent-{i}", NOW, {("vidgen.encoded.premium", i): 20}))
    [(stage, observation, decision)] = controller.round(NOW)
    assert (decision.previous, decision.desired) == (10, 11) and "200 waiting" in decision.reason
    [(_, _, decision)] = controller.round(NOW + 10)  # the fleet has not grown yet: the decision stands
    assert decision.desired == 11 and "cooldown" in decision.reason
    controller.fleet.add(report("agent-9", NOW + 20, {}))
    controller.fleet.reports["gpu-agent"].pop("agent-0")  # a pod died: 9 instances now
    [(_, _, decision)] = controller.round(NOW + 20)
    assert decision.previous == 9


def test_partition_lags_from_librdkafka_statistics():
    # Field values as librdkafka 2.x reports them against the embedded broker (probed): a partition the group has
    # never consumed has consumer_lag -1 whatever waits there; its backlog is high watermark − log start.
    never_consumed = {"fetch_state": "active", "lo_offset": 0, "hi_offset": 3, "committed_offset": -1001,
                      "stored_offset": -1001, "consumer_lag": -1}
    stats = {"topics": {"vidgen.encoded.free": {"partitions": {
        "0": {"consumer_lag": 4, "fetch_state": "active", "committed_offset": 2, "hi_offset": 6, "lo_offset": 0},
        "1": {"consumer_lag": -1, "fetch_state": "active", "hi_offset": -1, "lo_offset": -1},  # not known yet
        "2": never_consumed,
        "3": {**never_consumed, "lo_offset": 2, "hi_offset": 2},  # nothing waits past the log start
        "4": {**never_consumed, "consumer_lag": -1, "committed_offset": 5},  # committed but lag not computed: unknown
        "5": {**never_consumed, "fetch_state": "none"},  # not assigned to this consumer
        "-1": {"consumer_lag": -1, "fetch_state": "none"},  # librdkafka's internal UA partition
    }}}}
    assert partition_lags(json.dumps(stats)) == {("vidgen.encoded.free", 0): 4, ("vidgen.encoded.free", 2): 3,
                                                 ("vidgen.encoded.free", 3): 0}


@pytest.mark.integration
def test_agents_report_lag_and_metrics_and_the_controller_scales_up(tmp_path):
    from producers.requests import VideoRequests
    from streams.supervisor import PlatformProcesses

    metrics_port = free_port()
    platform = PlatformProcesses(tmp_path, stages=("prompt-encoder",), env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", "VIDGEN_STATS_INTERVAL_S": "1"})
    settings = platform.start()
    try:
        platform.add_stage("gpu-agent", env={"VIDGEN_METRICS_PORT": str(metrics_port)})
        with VideoRequests(settings) as requests:
            for seed in range(12):  # a backlog on fresh partitions: one agent, jobs of a second or more each
                requests.submit("a queue of paper boats", tier="free", steps=80, num_frames=9, width=64, height=64,
                                seed=seed)
        out = io.StringIO()
        controller = AutoscaleController(["gpu-agent"], AutoscalePolicy(scale_up_waiting=3, cooldown_up_s=0),
                                         stale_after_s=5)
        deadline = time.monotonic() + 60
        decisions = []
        while time.monotonic() < deadline and not any(d["desired"] > d["current"] for d in decisions):
            run_autoscale(settings, controller, interval_s=1.0, rounds=3, out=out)
            decisions = [json.loads(line) for line in out.getvalue().splitlines()]
        grown = [d for d in decisions if d["desired"] > d["current"]]
        assert grown, f"no scale-up decision: {decisions}"
        assert grown[0]["current"] == 1 and grown[0]["desired"] == 2 and grown[0]["waiting"] > 3
        assert "waiting" in grown[0]["reason"]

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'vidgen_consumer_lag{partition=' in metrics
        step_count = next(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith('vidgen_step_seconds_count{model="tiny-wan"}'))
        assert step_count > 0
        assert 'vidgen_stage_consumed_total{stage="gpu-agent"}' in metrics
        platform.check_alive()
    finally:
        platform.stop()

"""`vidgen autoscale`: the fleet view over StageStats reports, and the whole loop on the real broker — the GPU
agents scale on the active scheduler's queue (its StageStats report; its vidgen_scheduler_* gauges for KEDA), the
stages that consume their input on their consumer lag from librdkafka's statistics."""
from __future__ import annotations

import io
import json
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from consumers.autoscaler import AutoscaleController, FleetView, run_autoscale
from consumers.dispatcher import Dispatcher
from consumers.queue_policy import QueuePolicy
from consumers.scheduler import SchedulerRuntime
from streams.autoscale import AutoscalePolicy, DemandPolicy
from streams.embedded import free_port
from streams.events import new_event
from streams.metrics import partition_lags, register_scheduler_queue
from tests.samples import sample_events

NOW = 1_800_000_000.0


def report(instance: str, at_s: float, lags: dict[tuple[str, int], int], busy=0.5, gpu=None, stage="vae-decoder",
           queue=None):
    event = new_event("", stage=stage, instance=instance, interval_s=10.0, busy_fraction=busy, gpu_utilization=gpu,
                      lag=[{"topic": t, "partition": p, "lag": lag} for (t, p), lag in lags.items()], queue=queue)
    event["timestamp"] = int(at_s * 1000)
    return event


def queue(waiting: dict[str, int], running: int, **agents: int) -> dict:
    return {"waiting": waiting, "running": running, "agents": agents}


def test_waiting_counts_each_partition_once_by_its_newest_reporter():
    fleet = FleetView(stale_after_s=30)
    fleet.add(report("a", NOW - 20, {("vidgen.latent-chunks", 0): 50, ("vidgen.latent-chunks", 1): 10}))
    fleet.add(report("b", NOW - 5, {("vidgen.latent-chunks", 1): 70}))  # partition 1 moved to b
    observation = fleet.observation("vae-decoder", NOW)
    assert observation.total_waiting == 120
    assert sorted(observation.gpu_util) == [0.5, 0.5]
    assert fleet.instances("vae-decoder", NOW) == 2


def test_silent_instances_drop_out_and_gpu_utilisation_beats_busy_share():
    fleet = FleetView(stale_after_s=30)
    fleet.add(report("gone", NOW - 31, {("vidgen.latent-chunks", 0): 500}))
    fleet.add(report("gpu", NOW - 1, {}, busy=0.9, gpu=0.2))
    fleet.add(report("gpu", NOW - 10, {}, busy=0.0, gpu=1.0))  # an older report arriving late changes nothing
    assert [r["instance"] for r in fleet.live("vae-decoder", NOW)] == ["gpu"]
    observation = fleet.observation("vae-decoder", NOW)
    assert observation.total_waiting == 0 and observation.gpu_util == (0.2,)


def test_gpu_agents_are_observed_through_the_active_schedulers_queue():
    fleet = FleetView(stale_after_s=30)
    # The tier topics' lag says nothing (the scheduler commits at once), whatever a report carries of it.
    fleet.add(report("old-leader", NOW - 8, {("vidgen.encoded.free", 0): 0}, stage="scheduler",
                     queue=queue({"premium": 500, "standard": 0, "free": 0}, 9, BUSY=9)))
    fleet.add(report("new-leader", NOW - 2, {}, stage="scheduler",
                     queue=queue({"premium": 70, "standard": 30, "free": 12}, 8, BUSY=8, IDLE=1, DRAINING=1)))
    fleet.add(report("standby", NOW - 1, {}, stage="scheduler"))  # a report without a queue: not the leader's
    observation = fleet.observation("gpu-agent", NOW)
    assert observation.waiting == {"premium": 70, "standard": 30, "free": 12}  # waiting only: running jobs are not
    assert observation.total_waiting == 112
    assert observation.gpu_util == (0.9,)  # 9 of the 10 live agents are not idle
    assert fleet.instances("gpu-agent", NOW) == 10
    assert fleet.observation("gpu-agent", NOW + 40) == type(observation)(at_s=NOW + 40)  # no scheduler heard
    assert fleet.instances("gpu-agent", NOW + 40) == 0


def test_controller_scales_the_agents_up_on_the_queue_and_follows_the_fleet():
    controller = AutoscaleController(["gpu-agent"], AutoscalePolicy(scale_up_waiting=100, cooldown_up_s=60),
                                     stale_after_s=30)
    controller.fleet.add(report("s", NOW, {}, stage="scheduler",
                                queue=queue({"premium": 150, "standard": 50, "free": 0}, 10, BUSY=10)))
    [(stage, observation, decision)] = controller.round(NOW)
    assert (decision.previous, decision.desired) == (10, 11) and "200 waiting" in decision.reason
    [(_, _, decision)] = controller.round(NOW + 10)  # the fleet has not grown yet: the decision stands
    assert decision.desired == 11 and "cooldown" in decision.reason
    controller.fleet.add(report("s", NOW + 20, {}, stage="scheduler",
                                queue=queue({"premium": 150, "standard": 50, "free": 0}, 9, BUSY=9)))  # one died
    [(_, _, decision)] = controller.round(NOW + 20)
    assert decision.previous == 9
    # A busy fleet with an empty queue holds, however many jobs run.
    controller.fleet.add(report("s", NOW + 30, {}, stage="scheduler", queue=queue({"premium": 0}, 1500, BUSY=1500)))
    [(_, observation, decision)] = controller.round(NOW + 30)
    assert observation.total_waiting == 0 and not decision.changed and decision.desired == 1500


def test_the_schedulers_queue_snapshot_from_its_dispatcher():
    dispatcher = Dispatcher(QueuePolicy(), "scheduler-1", grace_s=0.0)
    dispatcher.take_over(NOW)
    runtime = SimpleNamespace(handler=SimpleNamespace(dispatcher=dispatcher))
    job = sample_events()["PromptEncoded"]
    for i, tier in enumerate(("PREMIUM", "FREE", "FREE")):
        dispatcher.enqueue({**job, "job_id": f"j{i}", "tier": tier}, ("vidgen.encoded." + tier.lower(), 0, i), NOW)
    status = {"agent_id": "a1", "state": "IDLE", "leader_epoch": dispatcher.leader_epoch, "last_assignment": 0,
              "models": ["tiny-wan"], "job_id": ""}
    dispatcher.report(status, NOW)
    dispatcher.report({**status, "agent_id": "a2", "state": "DRAINING"}, NOW)
    counts = ("waiting", "running", "agents")
    snapshot = SchedulerRuntime.queue_snapshot(runtime)
    assert {k: snapshot[k] for k in counts} == queue({"premium": 1, "standard": 0, "free": 2}, 0, IDLE=1, DRAINING=1)
    # GPU-seconds: steps x the model's step time, 1 s a step (DEFAULT_STEP_S) until an agent has reported one
    steps = job["params"]["steps"]
    assert snapshot["waiting_gpu_s"] == {"premium": steps, "standard": 0.0, "free": 2 * steps}
    assert snapshot["arrived_gpu_s"] == 3 * steps
    [assignment] = dispatcher.tick(NOW + 0.1).assignments
    assert assignment["agent_id"] == "a1" and assignment["job_id"] == "j0"
    dispatcher.report({**status, "state": "BUSY", "job_id": "j0", "epoch": 1, "last_assignment": assignment["seq"],
                       "step_s": 0.25, "models": [job["params"]["model"]]}, NOW + 0.2)
    snapshot = SchedulerRuntime.queue_snapshot(runtime)
    assert {k: snapshot[k] for k in counts} == queue({"premium": 0, "standard": 0, "free": 2}, 1, BUSY=1, DRAINING=1)
    assert snapshot["waiting_gpu_s"] == {"premium": 0.0, "standard": 0.0, "free": 2 * steps * 0.25}
    assert snapshot["arrived_gpu_s"] == 3 * steps * 0.25, "arrivals are not counted again as they start"
    assert SchedulerRuntime.queue_snapshot(SimpleNamespace(handler=SimpleNamespace(dispatcher=None))) is None


def test_the_queue_gauges_are_exported_only_while_there_is_a_queue():
    registry, current = CollectorRegistry(), {"queue": None}
    register_scheduler_queue(lambda: current["queue"], registry)
    assert registry.get_sample_value("vidgen_scheduler_running_jobs") is None  # a standby exports nothing
    current["queue"] = queue({"premium": 3, "standard": 0, "free": 120}, 40, BUSY=40, DRAINING=1)
    assert registry.get_sample_value("vidgen_scheduler_waiting_jobs", {"tier": "free"}) == 120
    assert registry.get_sample_value("vidgen_scheduler_waiting_jobs", {"tier": "premium"}) == 3
    assert registry.get_sample_value("vidgen_scheduler_running_jobs") == 40
    assert registry.get_sample_value("vidgen_scheduler_agents", {"state": "BUSY"}) == 40
    assert registry.get_sample_value("vidgen_scheduler_agents", {"state": "IDLE"}) == 0
    current["queue"] = None  # stood down
    assert registry.get_sample_value("vidgen_scheduler_waiting_jobs", {"tier": "free"}) is None


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


def _sample(metrics: str, name: str) -> float | None:
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")
                 or line.startswith(name + "{")), None)


@pytest.mark.integration
def test_the_schedulers_queue_is_reported_and_exported_and_the_controller_scales_the_agents_up(tmp_path):
    from producers.requests import VideoRequests
    from streams.supervisor import PlatformProcesses

    scheduler_port, agent_port = free_port(), free_port()
    platform = PlatformProcesses(tmp_path, stages=("prompt-encoder",), env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", "VIDGEN_STATS_INTERVAL_S": "1"})
    settings = platform.start()
    try:
        platform.add_stage("scheduler", env={"VIDGEN_METRICS_PORT": str(scheduler_port)})
        platform.add_stage("gpu-agent", env={"VIDGEN_METRICS_PORT": str(agent_port)})
        with VideoRequests(settings) as requests:
            for seed in range(12):  # one agent, jobs of a second or more each: a queue builds at the scheduler
                requests.submit("a queue of paper boats", tier="free", steps=80, num_frames=9, width=64, height=64,
                                seed=seed)
        out = io.StringIO()
        # The demand policy, as `vidgen autoscale` runs it for the GPU agents: one GPU per replica, a free tier
        # whose queue must clear within 5 s, at most two agents.
        demand = DemandPolicy(gpus_per_replica=1, lead_s=1.0, rate_tau_s=5.0, max_replicas=2,
                              wait_objectives_s={"premium": 1.0, "standard": 2.0, "free": 5.0})
        controller = AutoscaleController(["gpu-agent"], AutoscalePolicy(), stale_after_s=5, agent_policy=demand)
        deadline = time.monotonic() + 90
        decisions = []
        while time.monotonic() < deadline and not any(d["desired"] > d["current"] for d in decisions):
            run_autoscale(settings, controller, interval_s=1.0, rounds=3, out=out)
            decisions = [json.loads(line) for line in out.getvalue().splitlines()]
        grown = [d for d in decisions if d["desired"] > d["current"]]
        assert grown, f"no scale-up decision: {decisions}"
        assert grown[0]["current"] == 1 and grown[0]["desired"] == 2 and grown[0]["waiting"] > 0
        assert grown[0]["reason"].startswith("up:") and "for the backlog" in grown[0]["reason"]
        queue_seen = controller.fleet.queue("gpu-agent", time.time())
        assert queue_seen is not None and queue_seen["waiting"]["free"] > 0 and sum(queue_seen["agents"].values()) == 1
        assert queue_seen["waiting_gpu_s"]["free"] > 0 and queue_seen["arrived_gpu_s"] > 0
        # KEDA's view, while the backlog is there: the active scheduler's gauges.
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{scheduler_port}/metrics", timeout=5).read().decode()
        waiting = _sample(metrics, 'vidgen_scheduler_waiting_jobs{tier="free"}')
        running = _sample(metrics, "vidgen_scheduler_running_jobs")
        assert waiting is not None and running is not None and waiting + running >= 1
        # Carried out (as KEDA would): a second agent starts, the controller follows the fleet, both agents work.
        platform.add_stage("gpu-agent")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and controller.fleet.instances("gpu-agent", time.time()) < 2:
            run_autoscale(settings, controller, interval_s=1.0, rounds=2, out=out)
        assert controller.fleet.instances("gpu-agent", time.time()) == 2
        assert controller.scalers["gpu-agent"].replicas == 2

        # Both agents in the scheduler's gauges (and the agent's own metrics).
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{scheduler_port}/metrics", timeout=5).read().decode()
        assert sum(_sample(metrics, f'vidgen_scheduler_agents{{state="{state}"}}') or 0
                   for state in ("IDLE", "BUSY", "DRAINING")) == 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/metrics", timeout=5).read().decode()
        assert _sample(metrics, 'vidgen_step_seconds_count{model="tiny-wan"}') > 0
        assert "vidgen_scheduler_waiting_jobs" not in metrics
        platform.check_alive()
    finally:
        platform.stop()

"""`vidgen autoscale`: desired replicas per stage from the fleet's own reports.

The GPU agents are scaled with the demand policy by default (streams/autoscale.py DemandPolicy: GPU-seconds arriving,
running and waiting per tier against wait objectives; `--policy seed` for the seed's rule), the stages that consume
a topic with the seed's rule on their consumer lag. The same policy objects run in `vidgen simulate`.

Consumes vidgen.stats (StageStats: every stage process reports its consumer lag, taken from librdkafka's
statistics, and how busy it was, every VIDGEN_STATS_INTERVAL_S; the active scheduler adds the fleet's queue).
Emits nothing to Kafka: each decision is one JSON line (the decision log) and the Prometheus gauges
vidgen_autoscale_* (on VIDGEN_METRICS_PORT), for an operator, a KEDA metrics adapter or a script to act on. The
policy itself is streams/autoscale.py, the same code the fleet simulator runs.

Per stage and round, for a stage that consumes its input (encoder, decoder, compliance): waiting = the newest lag
of every partition (whoever reported it last), utilisation = each live instance's GPU utilisation, or its busy
share when it has no GPU; replicas = instances heard from within three report intervals.

The GPU agents consume no topic: their work waits in the scheduler's queue (the scheduler commits the tier topics'
records as soon as it has logged them, so their lag stays near zero whatever waits). For them everything comes from
the newest queue the active scheduler reported: waiting = jobs waiting for an agent per tier, and the GPU-seconds
they hold; the GPU-seconds queued since the previous round (the difference of the scheduler's cumulative count);
running jobs; replicas = live agents (divided by --gpus-per-replica); utilisation = the share of them not idle.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Gauge

from streams import topics
from streams.autoscale import AutoscalePolicy, Autoscaler, Decision, DemandPolicy, Observation
from streams.kafka import consumer_config
from streams.metrics import serve_metrics
from streams.serde import event_codec
from streams.scheduling import parse_weights
from streams.settings import Settings, load_settings

log = logging.getLogger(__name__)

DESIRED = Gauge("vidgen_autoscale_desired_replicas", "Replicas the policy wants", ["stage"])
CURRENT = Gauge("vidgen_autoscale_current_replicas", "Instances heard from recently", ["stage"])
WAITING = Gauge("vidgen_autoscale_waiting", "Jobs waiting in the scheduler's queue (GPU agents) or messages "
                "waiting (summed consumer lag)", ["stage"])
UTILISATION = Gauge("vidgen_autoscale_utilization", "Mean utilisation of the stage's instances", ["stage"])

#: Stages whose work waits in a scheduler's queue, not in their own consumer group: stage → the scheduler's stage.
SCHEDULED = {"gpu-agent": "scheduler"}


@dataclass
class FleetView:
    """The newest StageStats of every instance, and what they add up to."""

    stale_after_s: float
    reports: dict[str, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))  # stage → instance → report
    arrived_gpu_s: dict[str, float] = field(default_factory=dict)  # stage → the scheduler's count at the last round

    def add(self, report: dict) -> None:
        known = self.reports[report["stage"]].get(report["instance"])
        if known is None or _seconds(report["timestamp"]) >= _seconds(known["timestamp"]):
            self.reports[report["stage"]][report["instance"]] = report

    def live(self, stage: str, now_s: float) -> list[dict]:
        return [r for r in self.reports.get(stage, {}).values() if now_s - _seconds(r["timestamp"]) <= self.stale_after_s]

    def queue(self, stage: str, now_s: float) -> dict | None:
        """The newest queue a live scheduler of a scheduled stage reported (after a failover, the new leader's)."""
        reports = [r for r in self.live(SCHEDULED[stage], now_s) if r.get("queue") is not None]
        return max(reports, key=lambda r: _seconds(r["timestamp"]))["queue"] if reports else None

    def instances(self, stage: str, now_s: float, gpus_per_replica: int = 1) -> int:
        if stage in SCHEDULED:
            queue = self.queue(stage, now_s)
            return -(-sum(queue["agents"].values()) // gpus_per_replica) if queue else 0
        return len(self.live(stage, now_s))

    def observation(self, stage: str, now_s: float) -> Observation:
        if stage in SCHEDULED:
            queue = self.queue(stage, now_s) or {"waiting": {}, "agents": {}}  # no scheduler heard: nothing known
            agents = sum(queue["agents"].values())
            busy = agents - queue["agents"].get("IDLE", 0)
            total = queue.get("arrived_gpu_s") or 0.0
            # A new scheduler leader (or a restarted one) counts from zero: that round's arrivals are unknown, not
            # negative.
            arrived = max(0.0, total - self.arrived_gpu_s.get(stage, total))
            self.arrived_gpu_s[stage] = total
            return Observation(at_s=now_s, waiting=dict(queue["waiting"]),
                               gpu_util=(busy / agents,) if agents else (), arrived_gpu_s=arrived,
                               running_gpus=float(queue.get("running") or 0),
                               waiting_gpu_s=dict(queue.get("waiting_gpu_s") or {}))
        newest_lag: dict[tuple[str, int], tuple[float, int]] = {}  # a partition moves: its newest reporter counts
        for report in self.live(stage, now_s):
            for entry in report["lag"]:
                key = (entry["topic"], entry["partition"])
                at = _seconds(report["timestamp"])
                if key not in newest_lag or at >= newest_lag[key][0]:
                    newest_lag[key] = (at, entry["lag"])
        utilisation = [r["gpu_utilization"] if r.get("gpu_utilization") is not None else r["busy_fraction"]
                       for r in self.live(stage, now_s)]
        return Observation(at_s=now_s, waiting={f"{t}/{p}": lag for (t, p), (_, lag) in newest_lag.items()},
                           gpu_util=tuple(utilisation))


def _seconds(timestamp) -> float:
    return timestamp.timestamp() if hasattr(timestamp, "timestamp") else timestamp / 1000.0


class AutoscaleController:
    """One Autoscaler per stage, fed by the fleet view every round; returns the round's decisions. The GPU agents get
    ``agent_policy`` (the demand policy by default), the other stages ``policy``."""

    def __init__(self, stages: list[str], policy: AutoscalePolicy, stale_after_s: float,
                 agent_policy: AutoscalePolicy | DemandPolicy | None = None):
        self.stages = stages
        self.policy = policy
        self.agent_policy = agent_policy or policy
        self.fleet = FleetView(stale_after_s)
        self.scalers: dict[str, Autoscaler] = {}
        self.instances: dict[str, int] = {}  # instances seen last round, per stage

    def round(self, now_s: float) -> list[tuple[str, Observation, Decision]]:
        decisions = []
        for stage in self.stages:
            policy = self.agent_policy if stage in SCHEDULED else self.policy
            instances = self.fleet.instances(stage, now_s, getattr(policy, "gpus_per_replica", 1))
            scaler = self.scalers.get(stage)
            if scaler is None:
                scaler = self.scalers[stage] = Autoscaler(policy, max(instances, 1))
            elif instances and instances != self.instances.get(stage):
                # The fleet changed (it followed a decision, a pod died, someone scaled by hand): go on from what
                # runs. While it has not changed, a decision not yet carried out stands.
                scaler.set_replicas(instances)
            self.instances[stage] = instances
            observation = self.fleet.observation(stage, now_s)
            decisions.append((stage, observation, scaler.observe(observation)))
        return decisions


def decision_record(stage: str, observation: Observation, decision: Decision) -> dict:
    return {"at": round(observation.at_s, 3), "stage": stage, "current": decision.previous,
            "desired": decision.desired, "waiting": observation.total_waiting,
            "utilization": None if observation.mean_util is None else round(observation.mean_util, 4),
            "reason": decision.reason}


def run_autoscale(settings: Settings, controller: AutoscaleController, interval_s: float, rounds: int | None = None,
                  out=sys.stdout) -> int:
    """Read vidgen.stats from shortly before now, decide every interval, print one JSON line per decision."""
    serve_metrics(settings.metrics_port, settings.metrics_host)
    codec = event_codec(settings)
    consumer = Consumer(consumer_config(settings, group_id="vidgen.autoscale"))  # assigned, never joined
    try:
        start_ms = int((time.time() - controller.fleet.stale_after_s) * 1000)
        partitions = [TopicPartition(topics.STATS.name, p, start_ms) for p in range(topics.STATS.partitions)]
        positions = consumer.offsets_for_times(partitions, timeout=10)
        consumer.assign([tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, -2) for tp in positions])
        done, next_round = 0, time.monotonic() + interval_s
        while rounds is None or done < rounds:
            msg = consumer.poll(0.1)
            if msg is not None and not msg.error():
                try:
                    controller.fleet.add(codec.decode(msg.topic(), msg.value()))
                except Exception as exc:  # noqa: BLE001 - a bad report is skipped, never fatal
                    log.warning("autoscale: unreadable report at %s/%d@%d: %s", msg.topic(), msg.partition(),
                                msg.offset(), exc)
            if time.monotonic() >= next_round:
                next_round += interval_s
                done += 1
                for stage, observation, decision in controller.round(time.time()):
                    record = decision_record(stage, observation, decision)
                    print(json.dumps(record), file=out, flush=True)
                    DESIRED.labels(stage).set(decision.desired)
                    CURRENT.labels(stage).set(decision.previous)
                    WAITING.labels(stage).set(observation.total_waiting)
                    if observation.mean_util is not None:
                        UTILISATION.labels(stage).set(observation.mean_util)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen autoscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", action="append", help="stage to scale (repeatable; default gpu-agent)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between decisions")
    parser.add_argument("--rounds", type=int, default=None, help="stop after N decisions (default: run on)")
    defaults = AutoscalePolicy()
    parser.add_argument("--scale-up-waiting", type=float, default=defaults.scale_up_waiting)
    parser.add_argument("--scale-down-util", type=float, default=defaults.scale_down_util)
    parser.add_argument("--scale-down-after", type=float, default=defaults.scale_down_after_s, help="seconds")
    parser.add_argument("--cooldown-up", type=float, default=defaults.cooldown_up_s, help="seconds")
    parser.add_argument("--cooldown-down", type=float, default=defaults.cooldown_down_s, help="seconds")
    parser.add_argument("--min", type=int, default=defaults.min_replicas)
    parser.add_argument("--max", type=int, default=defaults.max_replicas)
    demand = DemandPolicy()
    parser.add_argument("--policy", choices=("demand", "seed"), default="demand",
                        help="the GPU agents' policy: demand (default) or the seed's queue-threshold rule")
    parser.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs (agents) per gpu-agent pod")
    parser.add_argument("--lead-s", type=float, default=demand.lead_s,
                        help="a new gpu-agent pod's time to take work: pod start + model load (default 300)")
    parser.add_argument("--safety", type=float, default=demand.safety, help="square-root staffing factor")
    parser.add_argument("--wait-objectives", type=parse_weights, default=dict(demand.wait_objectives_s),
                        help="p99 wait objective per tier, seconds (default premium=10,standard=60,free=600)")
    args = parser.parse_args(argv)
    settings = load_settings()
    policy = AutoscalePolicy(scale_up_waiting=args.scale_up_waiting, scale_down_util=args.scale_down_util,
                             scale_down_after_s=args.scale_down_after, cooldown_up_s=args.cooldown_up,
                             cooldown_down_s=args.cooldown_down, min_replicas=args.min, max_replicas=args.max)
    agent_policy = policy if args.policy == "seed" else DemandPolicy(
        gpus_per_replica=args.gpus_per_replica, lead_s=args.lead_s, safety=args.safety,
        wait_objectives_s=args.wait_objectives, min_replicas=args.min, max_replicas=args.max)
    # An instance counts as running while its reports keep coming: three report intervals of silence and it is gone.
    controller = AutoscaleController(args.stage or ["gpu-agent"], policy,
                                     stale_after_s=3 * max(settings.stats_interval_s, 1.0), agent_policy=agent_policy)
    return run_autoscale(settings, controller, args.interval, args.rounds)

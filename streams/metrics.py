"""Prometheus metrics of a stage process, and its periodic StageStats report for `vidgen autoscale`.

Every stage process serves /metrics (prometheus-client) on VIDGEN_METRICS_PORT when it is set (the Kubernetes
manifests set 9400; locally it is off). What is measured, where it matters as histograms:

* vidgen_stage_<counter>_total — the runtime's counters (consumed, handled, emitted, deduplicated, dead-lettered,
  failed jobs, cancelled, interrupted, retries), read from the runtime's own StageCounters at scrape time;
* vidgen_consumer_lag — per assigned partition, from librdkafka's statistics (``consumer_lag``: high watermark −
  committed offset), never from offset look-ups (the embedded broker answers "latest" wrongly);
* vidgen_step_seconds, vidgen_queue_wait_seconds (request → denoising starts), vidgen_checkpoint_write_seconds,
  vidgen_decode_chunk_seconds, vidgen_compliance_seconds (per phase), vidgen_job_seconds (request → published or
  flagged after generation).

The same lag, with how busy the process was, goes out as a StageStats event on vidgen.stats every
``stats_interval_s``: a whole-fleet view `vidgen autoscale` reads without scraping every pod.

The GPU agents' backlog is no consumer lag: the scheduler commits the tier topics' records as soon as it has logged
them and keeps the fleet's queue itself. The active scheduler exports that queue (``SchedulerQueueCollector``:
vidgen_scheduler_waiting_jobs per tier, vidgen_scheduler_running_jobs, vidgen_scheduler_agents per state; a
standby exports none of them, so a sum over the scheduler pods is the queue, what KEDA scales the agents on) and
puts it in its StageStats report (field ``queue``, for `vidgen autoscale`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Buckets spanning a tiny model's milliseconds to a real model's minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CONSUMER_LAG = Gauge("vidgen_consumer_lag", "Messages between the committed offset and the high watermark",
                     ["stage", "topic", "partition"])
STEP_SECONDS = Histogram("vidgen_step_seconds", "Wall time of one denoising step", ["model"],
                         buckets=SECONDS_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram("vidgen_queue_wait_seconds", "From the request to the first denoising step",
                               ["tier"], buckets=SECONDS_BUCKETS)
CHECKPOINT_WRITE_SECONDS = Histogram("vidgen_checkpoint_write_seconds", "Serialising and storing one checkpoint",
                                     buckets=SECONDS_BUCKETS)
DECODE_CHUNK_SECONDS = Histogram("vidgen_decode_chunk_seconds", "VAE decode and segment encode of one chunk",
                                 ["model"], buckets=SECONDS_BUCKETS)
COMPLIANCE_SECONDS = Histogram("vidgen_compliance_seconds", "Compliance work per job, by phase", ["phase"],
                               buckets=SECONDS_BUCKETS)
JOB_SECONDS = Histogram("vidgen_job_seconds", "From the request to the end of compliance", ["outcome"],
                        buckets=SECONDS_BUCKETS)
AUTH_FAILURES = Counter("vidgen_gateway_auth_failures", "Gateway requests refused for a missing or invalid API key, "
                        "by client address", ["address"])

_server_lock = threading.Lock()
_server_port: int | None = None


def serve_metrics(port: int | None, host: str | None = None) -> int | None:
    """Serve /metrics on the port once per process (None or 0: off), on ``host`` (all interfaces when None).
    Returns the port served."""
    global _server_port
    if not port:
        return None
    with _server_lock:
        if _server_port is None:
            start_http_server(port, addr=host or "0.0.0.0")
            _server_port = port
            log.info("metrics on %s:%d/metrics", host or "*", port)
    return _server_port


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StageCountersCollector:
    """Exposes a runtime's StageCounters as Prometheus counters, read when scraped (no second bookkeeping)."""

    def __init__(self, stage: str, counters):
        self.stage = stage
        self.counters = counters

    def collect(self):
        for name, value in asdict(self.counters).items():
            family = CounterMetricFamily(f"vidgen_stage_{name}", f"Stage runtime counter {name}", labels=["stage"])
            family.add_metric([self.stage], value)
            yield family


def register_stage_counters(stage: str, counters) -> None:
    REGISTRY.register(StageCountersCollector(stage, counters))


#: The states of a live agent (AgentStatus.state; a STOPPED agent has left the fleet).
AGENT_STATES = ("IDLE", "BUSY", "DRAINING")


class SchedulerQueueCollector:
    """The active scheduler's queue as gauges, read when scraped from ``snapshot()``: a SchedulerQueue record
    (``{"waiting": {tier: n}, "running": n, "agents": {state: n}}``, a fresh dict each time the scheduler's loop
    takes one, so the scrape thread never reads a half-made one), or None while the process is not the active
    scheduler, which then exports none of these metrics."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    @staticmethod
    def _families():
        return (GaugeMetricFamily("vidgen_scheduler_waiting_jobs", "Jobs waiting for an agent in the active "
                                  "scheduler's queue", labels=["tier"]),
                GaugeMetricFamily("vidgen_scheduler_running_jobs", "Jobs assigned to an agent and not finished yet",
                                  labels=[]),
                GaugeMetricFamily("vidgen_scheduler_agents", "Live GPU agents by reported state", labels=["state"]))

    def describe(self):
        return self._families()

    def collect(self):
        queue = self.snapshot()
        if queue is None:
            return
        waiting, running, agents = self._families()
        for tier, count in sorted(queue["waiting"].items()):
            waiting.add_metric([tier], count)
        running.add_metric([], queue["running"])
        for state in sorted(set(AGENT_STATES) | set(queue["agents"])):
            agents.add_metric([state], queue["agents"].get(state, 0))
        yield from (waiting, running, agents)


def register_scheduler_queue(snapshot, registry=REGISTRY) -> SchedulerQueueCollector:
    collector = SchedulerQueueCollector(snapshot)
    registry.register(collector)
    return collector


def partition_lags(stats_json: str) -> dict[tuple[str, int], int]:
    """(topic, partition) → messages waiting, from a librdkafka statistics document.

    librdkafka's ``consumer_lag`` is -1 on a partition this group has never consumed or committed (no stored or
    committed offset), however many messages wait there: exactly the backlog an autoscaler must see when jobs land
    on fresh partitions. The group reads such a partition from its log start (auto.offset.reset=earliest, see
    streams/kafka.py), so its lag is high watermark − log start, both known from fetching. Partitions whose offsets
    are not known yet and librdkafka's internal partition -1 are left out."""
    stats = json.loads(stats_json)
    lags = {}
    for topic, topic_stats in stats.get("topics", {}).items():
        for partition, p in topic_stats.get("partitions", {}).items():
            if int(partition) < 0 or p.get("fetch_state") in (None, "none"):
                continue
            lag = p.get("consumer_lag", -1)
            if lag < 0 and max(p.get("committed_offset", -1), p.get("stored_offset", -1)) < 0:
                high, start = p.get("hi_offset", -1), p.get("lo_offset", -1)
                lag = high - start if high >= 0 and start >= 0 else -1
            if lag >= 0:
                lags[(topic, int(partition))] = int(lag)
    return lags


class LagMonitor:
    """The stats_cb of a stage's consumer: keeps the newest lag per partition and mirrors it into the gauge."""

    def __init__(self, stage: str):
        self.stage = stage
        self.lags: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def on_stats(self, stats_json: str) -> None:
        try:
            lags = partition_lags(stats_json)
        except (ValueError, KeyError, TypeError) as exc:  # a statistics format change must not stop a stage
            log.warning("%s: unreadable consumer statistics: %s", self.stage, exc)
            return
        with self._lock:
            for key in set(self.lags) - set(lags):  # partitions no longer held
                CONSUMER_LAG.remove(self.stage, key[0], str(key[1]))
            self.lags = lags
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(self.stage, topic, str(partition)).set(lag)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [{"topic": t, "partition": p, "lag": lag} for (t, p), lag in sorted(self.lags.items())]


class BusyMeter:
    """Share of wall time spent handling, between two reports: handle seconds done plus the running one's."""

    def __init__(self):
        self._last_wall = time.monotonic()
        self._last_busy = 0.0

    def fraction(self, busy_seconds_total: float) -> tuple[float, float]:
        """(busy fraction, interval seconds) since the previous call."""
        now = time.monotonic()
        interval = max(now - self._last_wall, 1e-9)
        busy = max(0.0, busy_seconds_total - self._last_busy)
        self._last_wall, self._last_busy = now, busy_seconds_total
        return min(1.0, busy / interval), interval


def gpu_utilization() -> float | None:
    """Device utilisation in [0, 1] from NVML through torch, or None (no GPU, or NVML not available)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.utilization() / 100.0
    except Exception:  # noqa: BLE001 - utilisation is optional
        return None
    return None


def observe_since(histogram, labels: tuple, since) -> None:
    """Observe now − ``since`` (a datetime, epoch ms, or None) in seconds; nothing when it is unknown."""
    if since is None:
        return
    started_s = since.timestamp() if hasattr(since, "timestamp") else since / 1000.0
    (histogram.labels(*labels) if labels else histogram).observe(max(0.0, time.time() - started_s))

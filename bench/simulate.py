"""`vidgen simulate`: a discrete-event simulation of the GPU fleet, to size it and to see what its policies do.

Pure Python, no Kafka: a heap of timed events (arrivals, job ends, pods ready, GPU failures, pod preemptions,
autoscaler ticks). It runs the platform's own decision code, not a copy of it:

* which waiting job a free GPU starts next: ``streams.scheduling.WeightedTierScheduler`` (VIDGEN_TIER_WEIGHTS);
* how many pods the fleet should have: ``streams.autoscale.decide`` with an ``AutoscalePolicy``.

What is modelled
  arrivals   a non-homogeneous Poisson process over a day: rate(t) ∝ exp(k·cos(2π(t − peak)/24 h)) (a smooth
             daily curve; k is solved so that peak/mean = --peak-factor, 3 by default: 10M/day is 116/s on
             average and ~350/s at the peak, the seed's figures). ``--curve flat`` keeps the mean rate all day.
  tiers      each job's tier drawn from --mix (default premium 0.1, standard 0.4, free 0.5).
  jobs       GPU-seconds per job by resolution and length (--classes; lognormal around each class's mean,
             coefficient of variation --service-cv); one job per GPU, as the agent runs one job per device.
  fleet      pods of --gpus-per-pod GPUs (8); a new pod is ready --pod-startup-s after it is asked for (image,
             weights, warm-up); a pod scaled down stops taking jobs and goes when its running jobs end
             (terminationGracePeriodSeconds covers a job; the agent checkpoints on SIGTERM anyway).
  failures   GPU failures at --failure-rate per GPU-hour (the GPU's agent is back --gpu-restart-s later) and pod
             preemptions at --preemption-rate per pod-hour (the Deployment replaces the pod). The job on a
             failed GPU loses the work done since its last checkpoint (--checkpoint-s of progress between
             checkpoints, each stalling the GPU --checkpoint-cost-s), is redelivered after --redelivery-s
             (rebalance), and pays --resume-s to load its checkpoint before it goes on.
  autoscaler every --autoscale-every-s: waiting jobs (the scheduler's queue) and the GPU utilisation over the
             interval go to ``decide``; the fleet follows the desired pod count.

Where the default job length comes from (change it with --classes or --service-scale): the seed gives 10M
videos/day (115.7 jobs/s on average) and ~15,000 concurrent jobs. Little's law (L = λ·W) gives
W = 15,000 / 115.7 ≈ 130 GPU-seconds per job at one job per GPU; the default classes (480p·5 s 65 s,
720p·5 s 150 s, 720p·10 s 240 s, 1080p·5 s 330 s, mixed 50/30/15/5%) average exactly 130 s. ~15,000 busy GPUs
are ~1,900 pods of 8 busy all the time: the seed's ~2,000 pods is the fleet for the *mean* load. The daily curve
needs ~3× that at the peak, and the autoscaling policy decides how much of the trough it gives back.

Scaling (a default run, --scale 0.25, takes ~40 s here; --sweep adds ~1 min): --scale f simulates the fraction f of the traffic on a fleet
that the same policy sizes for it (the queue-depth threshold, min and max replicas are scaled by f too, so the
policy sees the same relative signal); counts of jobs, GPUs and pods are reported divided by f. What does not
scale exactly: a smaller fleet pools fewer GPUs, so its queueing waits are somewhat *longer* than the full
fleet's (conservative), a pod is a larger share of it, and rare events (failures) are fewer, so lost
GPU-seconds are noisier. --hours simulates a shorter window (starting at --start-hour); per-day figures are
extrapolated from it.

Prints waits per tier (p50/p99 from arrival to first start), GPU utilisation, GPU-seconds lost to failures,
concurrent jobs and pods; with --out DIR draws PNG charts (matplotlib, if installed); --sweep prints how the
answer moves with the checkpoint interval and the tier mix. The last line is ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.common import format_table, percentile, print_result
from streams.autoscale import Autoscaler, AutoscalePolicy, Observation
from streams.scheduling import DEFAULT_TIER_WEIGHTS, WeightedTierScheduler, parse_weights

DAY_S = 86_400.0
TIERS = ("premium", "standard", "free")
#: (name, share of jobs, mean GPU-seconds); see the module doc for why these average 130 s
DEFAULT_CLASSES = (("480p-5s", 0.50, 65.0), ("720p-5s", 0.30, 150.0), ("720p-10s", 0.15, 240.0),
                   ("1080p-5s", 0.05, 330.0))
DEFAULT_MIX = {"premium": 0.1, "standard": 0.4, "free": 0.5}


@dataclass
class SimConfig:
    jobs_per_day: float = 10_000_000
    curve: str = "daily"  # daily | flat
    peak_factor: float = 3.0
    peak_hour: float = 18.0
    start_hour: float = 0.0
    hours: float = 24.0
    scale: float = 0.25
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    classes: tuple = DEFAULT_CLASSES
    service_scale: float = 1.0
    service_cv: float = 0.25
    gpus_per_pod: int = 8
    pod_startup_s: float = 240.0
    failure_rate: float = 1e-3  # per GPU-hour
    preemption_rate: float = 1e-3  # per pod-hour
    gpu_restart_s: float = 120.0
    checkpoint_s: float = 60.0  # progress between checkpoints; 0 = never
    checkpoint_cost_s: float = 0.1
    resume_s: float = 10.0
    redelivery_s: float = 10.0
    autoscale: bool = True
    autoscale_every_s: float = 30.0
    policy: AutoscalePolicy = field(default_factory=lambda: AutoscalePolicy(max_replicas=10_000))
    pods: int | None = None  # full-scale pods at the start (fixed fleet when autoscale is off); None: sized
    initial_util: float = 0.9  # ... for the rate at the start at this utilisation
    seed: int = 1

    @property
    def mean_service_s(self) -> float:
        return self.service_scale * sum(p * s for _, p, s in self.classes) / sum(p for _, p, _ in self.classes)


# -- arrivals ------------------------------------------------------------------------------------------------------
def _bessel_i0(x: float) -> float:
    total, term, k = 1.0, 1.0, 1
    while term > 1e-15 * total:
        term *= (x / (2 * k)) ** 2
        total += term
        k += 1
    return total


def curve_kappa(peak_factor: float) -> float:
    """k such that max/mean of exp(k·cos θ) equals peak_factor (bisection; peak_factor 3 → k ≈ 1.76)."""
    if peak_factor <= 1:
        return 0.0
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if math.exp(mid) / _bessel_i0(mid) < peak_factor:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class DailyCurve:
    """Arrival rate (jobs/s) at time t (seconds since midnight)."""

    def __init__(self, cfg: SimConfig):
        self.mean = cfg.jobs_per_day / DAY_S
        self.kappa = curve_kappa(cfg.peak_factor) if cfg.curve == "daily" else 0.0
        self.norm = _bessel_i0(self.kappa)
        self.peak_s = cfg.peak_hour * 3600

    def rate(self, t: float) -> float:
        return self.mean * math.exp(self.kappa * math.cos(2 * math.pi * (t - self.peak_s) / DAY_S)) / self.norm

    @property
    def max_rate(self) -> float:
        return self.mean * math.exp(self.kappa) / self.norm


# -- the simulation ------------------------------------------------------------------------------------------------
class Job:
    __slots__ = ("id", "tier", "arrival", "service", "saved", "started", "first_start", "token", "pod",
                 "overhead", "interrupts")

    def __init__(self, job_id: int, tier: str, arrival: float, service: float):
        self.id, self.tier, self.arrival, self.service = job_id, tier, arrival, service
        self.saved = 0.0  # progress (s) kept by the last checkpoint
        self.started = 0.0
        self.first_start: float | None = None
        self.token = 0
        self.pod: Pod | None = None
        self.overhead = 0.0  # resume time at the head of the current run
        self.interrupts = 0


class Pod:
    __slots__ = ("id", "state", "jobs", "capacity")

    def __init__(self, pod_id: int, capacity: int, state: str):
        self.id, self.capacity, self.state = pod_id, capacity, state
        self.jobs: list[Job] = []


ARRIVE, DONE, READY, FAIL, PREEMPT, GPU_BACK, REQUEUE, TICK = range(8)


@dataclass
class SimResult:
    cfg: SimConfig
    window_s: float
    jobs_arrived: int
    jobs_done: int
    waits: dict[str, list[float]]
    mean_running: float  # time-average running jobs (scaled fleet)
    peak_running: int
    mean_pods: float  # time-average provisioned pods (starting + ready + draining)
    peak_pods: int
    gpu_util: float  # busy GPU-seconds / provisioned GPU-seconds
    lost_gpu_s: float  # progress since the last checkpoint, thrown away by failures and preemptions
    resume_gpu_s: float
    checkpoint_gpu_s: float
    busy_gpu_s: float
    interruptions: int
    failures: int
    preemptions: int
    scale_ups: int
    scale_downs: int
    series: list[tuple] = field(default_factory=list)  # (t, arrivals/s, running, provisioned GPUs, q per tier...)
    wall_s: float = 0.0

    def per_day(self, value: float) -> float:
        """A scaled-fleet total over the window → the full fleet's per-day figure."""
        return value / self.cfg.scale * DAY_S / self.window_s

    def wait_stats(self, tier: str) -> tuple[float, float, float]:
        waits = self.waits.get(tier)
        if not waits:
            return math.nan, math.nan, math.nan
        return percentile(waits, 50), percentile(waits, 99), sum(waits) / len(waits)


class FleetSim:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.curve = DailyCurve(cfg)
        self.rng_arrival = random.Random(cfg.seed * 1_000_003 + 1)
        self.rng_job = random.Random(cfg.seed * 1_000_003 + 2)
        self.rng_fail = random.Random(cfg.seed * 1_000_003 + 3)
        self.scheduler = WeightedTierScheduler(cfg.weights)
        total_mix = sum(cfg.mix.values())
        self.mix = [(tier, share / total_mix) for tier, share in cfg.mix.items()]
        unknown = set(cfg.mix) - set(cfg.weights)
        if unknown:
            raise ValueError(f"tiers {sorted(unknown)} in the mix have no weight")
        total_cls = sum(p for _, p, _ in cfg.classes)
        self.classes = [(name, p / total_cls, mean * cfg.service_scale) for name, p, mean in cfg.classes]
        sigma2 = math.log(1 + cfg.service_cv ** 2)
        self.sigma, self.mu_shift = math.sqrt(sigma2), -sigma2 / 2

        scale = cfg.scale
        policy = cfg.policy
        self.policy = replace(policy, scale_up_waiting=policy.scale_up_waiting * scale,
                              min_replicas=max(1, round(policy.min_replicas * scale)),
                              max_replicas=max(1, round(policy.max_replicas * scale)))
        self.t0 = cfg.start_hour * 3600
        self.t_end = self.t0 + cfg.hours * 3600
        self.queues: dict[str, deque[Job]] = {tier: deque() for tier in cfg.weights}
        self.pods: dict[int, Pod] = {}
        self.free: dict[int, Pod] = {}  # ready pods with a free GPU (insertion-ordered set)
        self.events: list = []
        self.seq = 0
        self.next_job = 0
        self.next_pod = 0
        # integrals, updated on every change
        self.last_t = self.t0
        self.running = 0
        self.gpus_provisioned = 0
        self.pods_provisioned = 0
        self.busy_area = self.gpu_area = self.pod_area = 0.0
        self.peak_running = self.peak_pods = 0
        self.waits: dict[str, list[float]] = {tier: [] for tier in cfg.weights}
        self.lost = self.resume_cost = self.ckpt_cost = 0.0
        self.interruptions = self.failures = self.preemptions = 0
        self.arrived = self.done = 0
        self.pending_requeue = 0
        self.fail_token = self.preempt_token = 0
        self.series: list[tuple] = []
        self.tick_arrivals = 0
        self.tick_busy = self.tick_gpu = 0.0
        self.scale_ups = self.scale_downs = 0
        if cfg.pods is not None:
            pods0 = max(1, round(cfg.pods * scale))
        else:
            pods0 = math.ceil(self.curve.rate(self.t0) * scale * cfg.mean_service_s / cfg.gpus_per_pod
                              / cfg.initial_util)
        self.autoscaler = Autoscaler(self.policy, pods0) if cfg.autoscale else None
        for _ in range(self.autoscaler.replicas if self.autoscaler else pods0):
            self._add_pod(ready=True)

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _advance(self, t: float) -> None:
        dt = t - self.last_t
        if dt > 0:
            self.busy_area += self.running * dt
            self.gpu_area += self.gpus_provisioned * dt
            self.pod_area += self.pods_provisioned * dt
            self.last_t = t

    def _add_pod(self, ready: bool, now: float | None = None) -> None:
        pod = Pod(self.next_pod, self.cfg.gpus_per_pod, "ready" if ready else "starting")
        self.next_pod += 1
        self.pods[pod.id] = pod
        self.gpus_provisioned += pod.capacity
        self.pods_provisioned += 1
        self.peak_pods = max(self.peak_pods, self.pods_provisioned)
        if ready:
            self.free[pod.id] = pod
        else:
            self._push(now + self.cfg.pod_startup_s, READY, pod)

    def _remove_pod(self, pod: Pod) -> None:
        pod.state = "gone"
        self.pods.pop(pod.id, None)
        self.free.pop(pod.id, None)
        self.gpus_provisioned -= self.cfg.gpus_per_pod
        self.pods_provisioned -= 1

    def _tier_of_new_job(self) -> str:
        x = self.rng_job.random()
        for tier, share in self.mix:
            x -= share
            if x < 0:
                return tier
        return self.mix[-1][0]

    def _service_of_new_job(self) -> float:
        x = self.rng_job.random()
        mean = self.classes[-1][2]
        for _, share, class_mean in self.classes:
            x -= share
            if x < 0:
                mean = class_mean
                break
        if self.cfg.service_cv <= 0:
            return mean
        return mean * math.exp(self.rng_job.gauss(self.mu_shift, self.sigma))

    def _next_arrival(self, t: float) -> None:
        """Thinning: candidates at the peak rate, each kept with probability rate(t)/peak."""
        lam_max = self.curve.max_rate * self.cfg.scale
        rng = self.rng_arrival
        while True:
            t += rng.expovariate(lam_max)
            if t >= self.t_end:
                return
            if rng.random() * lam_max <= self.curve.rate(t) * self.cfg.scale:
                self._push(t, ARRIVE)
                return

    def _redraw_failures(self, t: float) -> None:
        """Memoryless: the next failure and preemption are redrawn for the fleet as it is now."""
        live = sum(1 for pod in self.pods.values() if pod.state in ("ready", "draining"))
        self.fail_token += 1
        self.preempt_token += 1
        if self.cfg.failure_rate > 0 and live:
            self._push(t + self.rng_fail.expovariate(self.cfg.failure_rate * live * self.cfg.gpus_per_pod / 3600),
                       FAIL, self.fail_token)
        if self.cfg.preemption_rate > 0 and live:
            self._push(t + self.rng_fail.expovariate(self.cfg.preemption_rate * live / 3600), PREEMPT,
                       self.preempt_token)

    # -- jobs -------------------------------------------------------------------------------------------------------
    def _run_time(self, job: Job) -> float:
        remaining = job.service - job.saved
        ckpts = math.floor(remaining / self.cfg.checkpoint_s - 1e-9) if self.cfg.checkpoint_s > 0 else 0
        return job.overhead + remaining + ckpts * self.cfg.checkpoint_cost_s

    def _dispatch(self, t: float) -> None:
        queues, free = self.queues, self.free
        while free:
            waiting = [tier for tier, q in queues.items() if q]
            if not waiting:
                return
            tier = self.scheduler.pick(waiting)
            job = queues[tier].popleft()
            pod = next(iter(free.values()))
            pod.jobs.append(job)
            if len(pod.jobs) >= pod.capacity:
                del free[pod.id]
            job.pod, job.started = pod, t
            job.token += 1
            if job.first_start is None:
                job.first_start = t
                self.waits[job.tier].append(t - job.arrival)
            self._advance(t)
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            self._push(t + self._run_time(job), DONE, (job, job.token))

    def _release(self, job: Job, t: float) -> Pod:
        pod = job.pod
        pod.jobs.remove(job)
        job.pod = None
        self._advance(t)
        self.running -= 1
        return pod

    def _pod_has_room(self, pod: Pod) -> None:
        if pod.state == "ready" and len(pod.jobs) < pod.capacity:
            self.free[pod.id] = pod
        elif pod.state == "draining" and not pod.jobs:
            self._remove_pod(pod)

    def _finish(self, job: Job, t: float) -> None:
        remaining = job.service - job.saved
        ckpts = math.floor(remaining / self.cfg.checkpoint_s - 1e-9) if self.cfg.checkpoint_s > 0 else 0
        self.ckpt_cost += ckpts * self.cfg.checkpoint_cost_s
        self.resume_cost += job.overhead
        pod = self._release(job, t)
        self.done += 1
        self._pod_has_room(pod)

    def _interrupt(self, job: Job, t: float) -> None:
        """The job's GPU went away: keep what the last checkpoint saved, redeliver the rest."""
        cfg = self.cfg
        elapsed = max(0.0, t - job.started - job.overhead)
        self.resume_cost += min(t - job.started, job.overhead)
        interval = cfg.checkpoint_s
        if interval > 0:
            per_ckpt = interval + cfg.checkpoint_cost_s
            ckpts = min(math.floor(elapsed / per_ckpt), math.floor((job.service - job.saved) / interval - 1e-9))
            progress = min(elapsed - ckpts * cfg.checkpoint_cost_s, job.service - job.saved)
            saved = ckpts * interval
            self.ckpt_cost += ckpts * cfg.checkpoint_cost_s
        else:
            progress, saved = min(elapsed, job.service - job.saved), 0.0
        self.lost += max(0.0, progress - saved)
        job.saved += saved
        job.overhead = cfg.resume_s
        job.interrupts += 1
        job.token += 1  # its DONE event is void
        self.interruptions += 1
        self._release(job, t)
        self.pending_requeue += 1
        self._push(t + cfg.redelivery_s, REQUEUE, job)

    # -- the fleet --------------------------------------------------------------------------------------------------
    def _apply(self, desired: int, t: float) -> None:
        active = [pod for pod in self.pods.values() if pod.state in ("starting", "ready")]
        if desired > len(active):
            for _ in range(desired - len(active)):
                self._add_pod(ready=False, now=t)
        elif desired < len(active):
            # Give back pods not yet started first, then the emptiest ready ones (they drain).
            active.sort(key=lambda pod: (pod.state != "starting", len(pod.jobs)))
            self._advance(t)
            for pod in active[:len(active) - desired]:
                if pod.state == "starting" or not pod.jobs:
                    self._remove_pod(pod)
                else:
                    pod.state = "draining"
                    self.free.pop(pod.id, None)

    def _tick(self, t: float) -> None:
        self._advance(t)
        busy = self.busy_area - self.tick_busy
        gpus = self.gpu_area - self.tick_gpu
        self.tick_busy, self.tick_gpu = self.busy_area, self.gpu_area
        waiting = sum(len(q) for q in self.queues.values()) + self.pending_requeue
        every = self.cfg.autoscale_every_s
        self.series.append((t, self.tick_arrivals / every, self.running, self.gpus_provisioned,
                            *(len(self.queues[tier]) for tier in self.queues)))
        self.tick_arrivals = 0
        if self.autoscaler is not None:
            util = [busy / gpus] if gpus > 0 else []
            decision = self.autoscaler.observe(Observation(at_s=t, waiting={"gpu-agent": waiting}, gpu_util=util))
            if decision.desired > decision.previous:
                self.scale_ups += 1
            elif decision.desired < decision.previous:
                self.scale_downs += 1
            self._apply(decision.desired, t)
        self._redraw_failures(t)
        if t + every < self.t_end:
            self._push(t + every, TICK)

    def _fail_gpu(self, t: float) -> None:
        live = [pod for pod in self.pods.values() if pod.state in ("ready", "draining")]
        if not live:
            return
        pod = live[self.rng_fail.randrange(len(live))]
        slot = self.rng_fail.randrange(self.cfg.gpus_per_pod)
        if slot >= pod.capacity:
            return  # that GPU is already down
        self.failures += 1
        if slot < len(pod.jobs):
            self._interrupt(pod.jobs[slot], t)
        pod.capacity -= 1
        if len(pod.jobs) >= pod.capacity:
            self.free.pop(pod.id, None)
        self._push(t + self.cfg.gpu_restart_s, GPU_BACK, pod)

    def _preempt_pod(self, t: float) -> None:
        live = [pod for pod in self.pods.values() if pod.state in ("ready", "draining")]
        if not live:
            return
        pod = live[self.rng_fail.randrange(len(live))]
        self.preemptions += 1
        for job in list(pod.jobs):
            self._interrupt(job, t)
        replace_it = pod.state == "ready"
        self._remove_pod(pod)
        if replace_it:  # the Deployment still wants that replica
            self._add_pod(ready=False, now=t)

    def run(self) -> SimResult:
        started = time.perf_counter()
        self._next_arrival(self.t0)
        self._push(self.t0, TICK)
        events = self.events
        while events:
            t, _, kind, payload = heapq.heappop(events)
            if t >= self.t_end:
                break
            if kind == ARRIVE:
                self.arrived += 1
                self.tick_arrivals += 1
                job = Job(self.next_job, self._tier_of_new_job(), t, self._service_of_new_job())
                self.next_job += 1
                self.queues[job.tier].append(job)
                self._next_arrival(t)
                self._dispatch(t)
            elif kind == DONE:
                job, token = payload
                if token == job.token:
                    self._finish(job, t)
                    self._dispatch(t)
            elif kind == REQUEUE:
                self.pending_requeue -= 1
                self.queues[payload.tier].appendleft(payload)  # redelivered: its partition's next message
                self._dispatch(t)
            elif kind == READY:
                pod = payload
                if pod.state == "starting":
                    pod.state = "ready"
                    self.free[pod.id] = pod
                    self._dispatch(t)
            elif kind == GPU_BACK:
                pod = payload
                if pod.state in ("ready", "draining"):
                    pod.capacity += 1
                    self._pod_has_room(pod)
                    self._dispatch(t)
            elif kind == TICK:
                self._tick(t)
            elif kind == FAIL:
                if payload == self.fail_token:
                    self._fail_gpu(t)
                    self.fail_token += 1
                    live = sum(1 for p in self.pods.values() if p.state in ("ready", "draining"))
                    if live:
                        self._push(t + self.rng_fail.expovariate(
                            self.cfg.failure_rate * live * self.cfg.gpus_per_pod / 3600), FAIL, self.fail_token)
            elif kind == PREEMPT:
                if payload == self.preempt_token:
                    self._preempt_pod(t)
                    self.preempt_token += 1
                    live = sum(1 for p in self.pods.values() if p.state in ("ready", "draining"))
                    if live:
                        self._push(t + self.rng_fail.expovariate(self.cfg.preemption_rate * live / 3600),
                                   PREEMPT, self.preempt_token)
                    self._dispatch(t)
        self._advance(self.t_end)
        window = self.t_end - self.t0
        return SimResult(
            cfg=self.cfg, window_s=window, jobs_arrived=self.arrived, jobs_done=self.done, waits=self.waits,
            mean_running=self.busy_area / window, peak_running=self.peak_running,
            mean_pods=self.pod_area / window, peak_pods=self.peak_pods,
            gpu_util=self.busy_area / self.gpu_area if self.gpu_area else 0.0,
            lost_gpu_s=self.lost, resume_gpu_s=self.resume_cost, checkpoint_gpu_s=self.ckpt_cost,
            busy_gpu_s=self.busy_area, interruptions=self.interruptions, failures=self.failures,
            preemptions=self.preemptions, scale_ups=self.scale_ups, scale_downs=self.scale_downs,
            series=self.series, wall_s=time.perf_counter() - started,
        )


def simulate(cfg: SimConfig) -> SimResult:
    return FleetSim(cfg).run()


# -- reporting -----------------------------------------------------------------------------------------------------
def summary(res: SimResult) -> dict[str, float]:
    s = res.cfg.scale
    out = {
        "concurrent_jobs": res.mean_running / s,
        "peak_concurrent_jobs": res.peak_running / s,
        "pods": res.mean_pods / s,
        "peak_pods": res.peak_pods / s,
        "pods_busy": res.mean_running / s / res.cfg.gpus_per_pod,
        "gpu_util": res.gpu_util,
        "lost_gpu_s_per_day": res.per_day(res.lost_gpu_s),
        "lost_share": res.lost_gpu_s / res.busy_gpu_s if res.busy_gpu_s else 0.0,
    }
    for tier in res.waits:
        p50, p99, _ = res.wait_stats(tier)
        out[f"p50_wait_{tier}_s"], out[f"p99_wait_{tier}_s"] = p50, p99
    return out


def report(res: SimResult) -> str:
    cfg, s = res.cfg, res.cfg.scale
    lines = [
        f"simulated {cfg.hours:g} h from {cfg.start_hour:g}:00 at scale {cfg.scale:g} ({res.jobs_arrived:,} jobs "
        f"arrived, {res.jobs_done:,} done) in {res.wall_s:.1f} s; figures below are for the full fleet",
        f"traffic {cfg.jobs_per_day:,.0f}/day: mean {cfg.jobs_per_day / DAY_S:.1f}/s, "
        f"peak {DailyCurve(cfg).max_rate:.1f}/s ({cfg.curve} curve); mean GPU time {cfg.mean_service_s:.1f} s/job",
        "",
        format_table(["tier", "share", "weight", "jobs", "p50 wait s", "p99 wait s", "mean wait s"], [
            (tier, cfg.mix.get(tier, 0.0), cfg.weights[tier], len(res.waits[tier]), *res.wait_stats(tier))
            for tier in res.waits
        ], float_format="{:.2f}"),
        "",
        f"concurrent jobs      mean {res.mean_running / s:,.0f}   peak {res.peak_running / s:,.0f}   "
        f"(Little: arrival rate x GPU time = {res.jobs_arrived / res.window_s / s * cfg.mean_service_s:,.0f})",
        f"pods of {cfg.gpus_per_pod} GPUs     mean {res.mean_pods / s:,.0f}   peak {res.peak_pods / s:,.0f}   "
        f"busy-equivalent {res.mean_running / s / cfg.gpus_per_pod:,.0f}   "
        f"({'autoscaled: ' + str(res.scale_ups) + ' ups, ' + str(res.scale_downs) + ' downs' if cfg.autoscale else 'fixed fleet'})",
        f"GPU utilisation      {res.gpu_util:.1%} of provisioned GPU time",
        f"failures             {res.failures} GPU failures, {res.preemptions} pod preemptions, "
        f"{res.interruptions} jobs interrupted (scaled fleet)",
        f"lost to failures     {res.per_day(res.lost_gpu_s):,.0f} GPU-s/day of redone work "
        f"({res.lost_gpu_s / max(res.busy_gpu_s, 1e-9):.4%} of busy time) at a {cfg.checkpoint_s:g} s checkpoint "
        f"interval; resumes {res.per_day(res.resume_gpu_s):,.0f} GPU-s/day, checkpoints "
        f"{res.per_day(res.checkpoint_gpu_s):,.0f} GPU-s/day",
    ]
    return "\n".join(lines)


def draw(res: SimResult, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib)", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    s, gpp = res.cfg.scale, res.cfg.gpus_per_pod
    hours = [row[0] / 3600 for row in res.series]
    paths = []

    fig, ax = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax[0].plot(hours, [row[1] / s for row in res.series], lw=0.8)
    ax[0].set_ylabel("arrivals / s")
    ax[0].set_title("vidgen simulate: traffic and fleet")
    ax[1].plot(hours, [row[3] / s / gpp for row in res.series], label="pods provisioned")
    ax[1].plot(hours, [row[2] / s / gpp for row in res.series], label="pods' worth of busy GPUs", lw=0.8)
    ax[1].set_ylabel("pods")
    ax[1].set_xlabel("hour of day")
    ax[1].legend()
    fig.tight_layout()
    paths.append(out / "fleet.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    tiers = list(res.waits)
    for i, tier in enumerate(tiers):
        ax[0].plot(hours, [row[4 + i] / s for row in res.series], label=tier, lw=0.8)
    ax[0].set_ylabel("jobs waiting")
    ax[0].set_xlabel("hour of day")
    ax[0].legend()
    ax[0].set_title("queue per tier")
    for tier in tiers:
        waits = sorted(res.waits[tier])
        if waits:
            ax[1].plot([max(w, 1e-3) for w in waits], [k / len(waits) for k in range(len(waits))], label=tier)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("wait before first start, s")
    ax[1].set_ylabel("share of jobs")
    ax[1].set_title("queue wait CDF")
    ax[1].legend()
    fig.tight_layout()
    paths.append(out / "waits.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def sweep(cfg: SimConfig) -> str:
    """How the answer moves with the checkpoint interval and the tier mix (same random streams for every row)."""
    runs: dict[tuple, SimResult] = {}

    def run(interval: float, mix: dict[str, float]) -> SimResult:
        key = (interval, tuple(sorted(mix.items())))
        if key not in runs:
            runs[key] = simulate(replace(cfg, checkpoint_s=interval, mix=mix))
        return runs[key]

    rows = []
    plan = [(float(interval), cfg.mix) for interval in (0, 300, 120, 60, 30, 10)]
    plan += [(cfg.checkpoint_s, mix) for mix in ({"premium": 0.1, "standard": 0.4, "free": 0.5},
                                                 {"premium": 0.3, "standard": 0.4, "free": 0.3},
                                                 {"premium": 0.6, "standard": 0.3, "free": 0.1})]
    for interval, mix in plan:
        res = run(interval, mix)
        m = summary(res)
        rows.append((f"checkpoint {f'{interval:g} s' if interval else 'never'}", res.cfg.mix_label(),
                     res.interruptions, m["lost_gpu_s_per_day"], res.per_day(res.checkpoint_gpu_s),
                     m["pods"], m["peak_pods"], m["gpu_util"], m["p99_wait_premium_s"],
                     m["p99_wait_standard_s"], m["p99_wait_free_s"]))
    return format_table(["run", "mix p/s/f", "interrupted", "lost GPU-s/day", "ckpt GPU-s/day", "pods mean",
                         "pods peak", "GPU util", "p99 wait premium s", "p99 standard s", "p99 free s"], rows,
                        float_format="{:,.2f}")


def _mix_label(self: SimConfig) -> str:
    return "/".join(f"{self.mix.get(t, 0):g}" for t in TIERS)


SimConfig.mix_label = _mix_label  # type: ignore[attr-defined]


# -- command line --------------------------------------------------------------------------------------------------
def _parse_mix(text: str) -> dict[str, float]:
    mix = parse_weights(text)  # same "tier=share,..." form and checks as the weights
    return mix


def _parse_classes(text: str) -> tuple:
    classes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            name, share, seconds = item.split(":")
            classes.append((name, float(share), float(seconds)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"job class {item!r} is not name:share:gpu_seconds") from None
    if not classes:
        raise argparse.ArgumentTypeError("no job classes")
    return tuple(classes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidgen simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SimConfig()
    p.add_argument("--jobs-per-day", type=float, default=d.jobs_per_day)
    p.add_argument("--curve", choices=("daily", "flat"), default=d.curve)
    p.add_argument("--peak-factor", type=float, default=d.peak_factor, help="peak rate / mean rate (default 3)")
    p.add_argument("--peak-hour", type=float, default=d.peak_hour)
    p.add_argument("--start-hour", type=float, default=d.start_hour)
    p.add_argument("--hours", type=float, default=d.hours, help="simulated window (default a whole day)")
    p.add_argument("--scale", type=float, default=d.scale,
                   help="fraction of the traffic and fleet simulated (default 0.02); results are divided by it")
    p.add_argument("--mix", type=_parse_mix, default=d.mix, help="tier shares: premium=0.1,standard=0.4,free=0.5")
    p.add_argument("--weights", type=parse_weights, default=d.weights, help="tier weights (VIDGEN_TIER_WEIGHTS)")
    p.add_argument("--classes", type=_parse_classes, default=d.classes,
                   help="job classes name:share:gpu_seconds,... (default averages 130 s)")
    p.add_argument("--service-scale", type=float, default=d.service_scale, help="multiply every job's GPU time")
    p.add_argument("--service-cv", type=float, default=d.service_cv)
    p.add_argument("--gpus-per-pod", type=int, default=d.gpus_per_pod)
    p.add_argument("--pod-startup-s", type=float, default=d.pod_startup_s)
    p.add_argument("--failure-rate", type=float, default=d.failure_rate, help="GPU failures per GPU-hour")
    p.add_argument("--preemption-rate", type=float, default=d.preemption_rate, help="preemptions per pod-hour")
    p.add_argument("--gpu-restart-s", type=float, default=d.gpu_restart_s)
    p.add_argument("--checkpoint-s", type=float, default=d.checkpoint_s,
                   help="seconds of progress between checkpoints (0: never; VIDGEN_CHECKPOINT_EVERY_S)")
    p.add_argument("--checkpoint-cost-s", type=float, default=d.checkpoint_cost_s)
    p.add_argument("--resume-s", type=float, default=d.resume_s)
    p.add_argument("--redelivery-s", type=float, default=d.redelivery_s)
    p.add_argument("--pods", type=int, default=None,
                   help="pods at the start (full-scale count); with --no-autoscale the fixed fleet")
    p.add_argument("--no-autoscale", dest="autoscale", action="store_false")
    p.add_argument("--autoscale-every-s", type=float, default=d.autoscale_every_s)
    pol = d.policy
    p.add_argument("--scale-up-waiting", type=float, default=pol.scale_up_waiting)
    p.add_argument("--step-up", type=float, default=pol.step_up)
    p.add_argument("--scale-down-util", type=float, default=pol.scale_down_util)
    p.add_argument("--scale-down-after-s", type=float, default=pol.scale_down_after_s)
    p.add_argument("--step-down", type=float, default=pol.step_down)
    p.add_argument("--min-pods", type=int, default=pol.min_replicas)
    p.add_argument("--max-pods", type=int, default=pol.max_replicas)
    p.add_argument("--cooldown-up-s", type=float, default=pol.cooldown_up_s)
    p.add_argument("--cooldown-down-s", type=float, default=pol.cooldown_down_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="directory for PNG charts")
    p.add_argument("--sweep", action="store_true",
                   help="also print a table over checkpoint intervals and tier mixes (runs at --sweep-scale)")
    p.add_argument("--sweep-scale", type=float, default=0.05)
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    policy = AutoscalePolicy(
        scale_up_waiting=args.scale_up_waiting, step_up=args.step_up, scale_down_util=args.scale_down_util,
        scale_down_after_s=args.scale_down_after_s, step_down=args.step_down, min_replicas=args.min_pods,
        max_replicas=args.max_pods, cooldown_up_s=args.cooldown_up_s, cooldown_down_s=args.cooldown_down_s)
    if not 0 < args.scale <= 1:
        raise SystemExit("--scale must be within (0, 1]")
    return SimConfig(
        jobs_per_day=args.jobs_per_day, curve=args.curve, peak_factor=args.peak_factor, peak_hour=args.peak_hour,
        start_hour=args.start_hour, hours=args.hours, scale=args.scale, mix=args.mix, weights=args.weights,
        classes=args.classes, service_scale=args.service_scale, service_cv=args.service_cv,
        gpus_per_pod=args.gpus_per_pod, pod_startup_s=args.pod_startup_s, failure_rate=args.failure_rate,
        preemption_rate=args.preemption_rate, gpu_restart_s=args.gpu_restart_s, checkpoint_s=args.checkpoint_s,
        checkpoint_cost_s=args.checkpoint_cost_s, resume_s=args.resume_s, redelivery_s=args.redelivery_s,
        autoscale=args.autoscale, autoscale_every_s=args.autoscale_every_s, policy=policy, pods=args.pods,
        seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    res = simulate(cfg)
    print(report(res))
    if args.out is not None:
        for path in draw(res, args.out):
            print(f"chart: {path}")
    if args.sweep:
        print(f"\nsweep at scale {args.sweep_scale:g} (same seed, same arrivals and failure times in every row):")
        print(sweep(replace(cfg, scale=args.sweep_scale)))
    m = summary(res)
    print_result(concurrent_jobs=round(m["concurrent_jobs"]), pods=round(m["pods"]), peak_pods=round(m["peak_pods"]),
                 pods_busy=round(m["pods_busy"]), gpu_util=round(m["gpu_util"], 4),
                 p99_wait_premium_s=m["p99_wait_premium_s"], p99_wait_standard_s=m["p99_wait_standard_s"],
                 p99_wait_free_s=m["p99_wait_free_s"], lost_gpu_s_per_day=round(m["lost_gpu_s_per_day"]),
                 checkpoint_s=cfg.checkpoint_s, scale=cfg.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())

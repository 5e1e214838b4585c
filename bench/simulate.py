"""`vidgen simulate`: a discrete-event simulation of the GPU fleet, to size it and to see what its policies do.

Pure Python, no Kafka: a heap of timed events (arrivals, job ends, pods ready, GPU failures, pod preemptions,
autoscaler ticks). It runs the platform's own decision code, not a copy of it:

* which waiting job starts next, on which idle agent, and which running job yields to an overdue premium one: the
  scheduler's ``consumers.queue_policy.QueuePolicy`` (tier weights, tenant turns, model affinity, preemption) —
  or, with ``--dispatch partition``, the old partition-owned dispatch (each job waits for the agent that owns its
  partition of the tier topic, as a consumer group assigns them; agents beyond the partition count sit idle);
* how many pods the fleet should have: ``streams.autoscale`` with the ``DemandPolicy`` (default) or the seed's
  ``AutoscalePolicy`` (``--policy seed``); ``--compare`` runs both on the same arrivals, and the demand policy
  again without model affinity and with partition dispatch, and ends with the two policies' RESULT line.

What is modelled
  arrivals   a non-homogeneous Poisson process over a day: rate(t) ∝ exp(k·cos(2π(t − peak)/24 h)) (a smooth
             daily curve; k is solved so that peak/mean = --peak-factor, 3 by default: 10M/day is 116/s on
             average and ~350/s at the peak, the seed's figures). ``--curve flat`` keeps the mean rate all day.
  tiers      each job's tier drawn from --mix (default premium 0.1, standard 0.4, free 0.5).
  jobs       GPU-seconds per job by resolution and length (--classes; lognormal around each class's mean,
             coefficient of variation --service-cv) and model (--models: a share, a relative GPU time, a cold-load
             time); each from one of --tenants tenants (a few large, a long tail).
  agents     one per GPU, one job at a time, one model loaded: a job whose model is not loaded on its agent
             first pays the model's load time (counted as busy GPU time: the GPU is held).
  fleet      pods of --gpus-per-pod GPUs (8); a new pod is ready --pod-startup-s after it is asked for (image,
             weights, warm-up; its agents have no model loaded); a scale-down gives back pods not yet started,
             then the least busy, then those whose models are least in demand: their agents drain at the next
             step boundary (checkpoint) and the jobs go back to the front of their tier to resume elsewhere.
  failures   GPU failures at --failure-rate per GPU-hour (the GPU's agent is back --gpu-restart-s later) and pod
             preemptions at --preemption-rate per pod-hour (the Deployment replaces the pod). The job on a
             failed GPU loses the work done since its last checkpoint (--checkpoint-s of progress between
             checkpoints, each stalling the GPU --checkpoint-cost-s), is redelivered after --redelivery-s
             (rebalance), and pays --resume-s to load its checkpoint before it goes on.
  autoscaler every --autoscale-every-s: the scheduler's view (waiting jobs and their GPU-seconds per tier,
             GPU-seconds arrived, GPUs busy, utilisation over the interval) goes to the policy; the fleet follows
             the desired pod count. Cost: provisioned GPU-hours (starting, ready, draining) × --gpu-hour-usd.

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
GPU-seconds are noisier; and the demand policy's square-root headroom is a larger share of a smaller fleet,
so its utilisation at a small --scale understates the full fleet's. --hours simulates a shorter window (starting at --start-hour); per-day figures are
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
from consumers.queue_policy import AgentView, QueuePolicy, WaitingJob
from streams.autoscale import Autoscaler, AutoscalePolicy, DemandPolicy, Observation
from streams.scheduling import DEFAULT_TIER_WEIGHTS, WeightedTierScheduler, parse_weights

DAY_S = 86_400.0
TIERS = ("premium", "standard", "free")
#: (name, share of jobs, mean GPU-seconds); see the module doc for why these average 130 s
DEFAULT_CLASSES = (("480p-5s", 0.50, 65.0), ("720p-5s", 0.30, 150.0), ("720p-10s", 0.15, 240.0),
                   ("1080p-5s", 0.05, 330.0))
DEFAULT_MIX = {"premium": 0.1, "standard": 0.4, "free": 0.5}
#: (model, share of jobs, relative GPU time, cold-load seconds): a 1.3B model and a 14B one three times slower per
#: job, which takes a minute to load onto a GPU that had another model. The GPU times are normalised so the mean
#: job stays the classes' mean.
DEFAULT_MODELS = (("wan-1.3b", 0.7, 1.0, 20.0), ("wan-14b", 0.3, 3.0, 60.0))


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
    policy: AutoscalePolicy | DemandPolicy = field(default_factory=lambda: DemandPolicy(max_replicas=10_000))
    pods: int | None = None  # full-scale pods at the start (fixed fleet when autoscale is off); None: sized
    initial_util: float = 0.9  # ... for the rate at the start at this utilisation
    seed: int = 1
    models: tuple = DEFAULT_MODELS
    service_dist: str = "lognormal"  # lognormal (around each class's mean, service_cv) | exp (for M/M/c checks)
    tenants: int = 50
    dispatch: str = "scheduler"  # scheduler (the platform's QueuePolicy) | partition (the old partition-owned agents)
    partitions: int = 512  # per tier topic (partition dispatch), full scale
    affinity: bool = True  # place jobs on agents that have their model loaded (QueuePolicy.place)
    preempt_after_s: float | None = 30.0
    gpu_hour_usd: float = 2.50

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
    __slots__ = ("id", "tier", "tenant", "model", "partition", "arrival", "service", "saved", "started",
                 "first_start", "token", "agent", "overhead", "interrupts", "waiting")

    def __init__(self, job_id: int, tier: str, arrival: float, service: float, model: str = "", tenant: str = "t0",
                 partition: int = 0):
        self.id, self.tier, self.arrival, self.service = job_id, tier, arrival, service
        self.model, self.tenant, self.partition = model, tenant, partition
        self.saved = 0.0  # progress (s) kept by the last checkpoint
        self.started = 0.0
        self.first_start: float | None = None
        self.token = 0
        self.agent: Agent | None = None
        self.overhead = 0.0  # resume and model-load time at the head of the current run
        self.interrupts = 0
        self.waiting = 0.0  # GPU-seconds it adds to its tier's waiting work while it waits

    @property
    def remaining(self) -> float:
        return self.service - self.saved


class Agent:
    """One GPU and the agent process that runs it (one job at a time, one model loaded)."""

    __slots__ = ("id", "pod", "model", "job", "idle_since", "up")

    def __init__(self, agent_id: int, pod: "Pod"):
        self.id, self.pod = agent_id, pod
        self.model: str | None = None
        self.job: Job | None = None
        self.idle_since = 0.0
        self.up = True


class Pod:
    __slots__ = ("id", "state", "agents")

    def __init__(self, pod_id: int, state: str):
        self.id, self.state = pod_id, state
        self.agents: list[Agent] = []

    def busy(self) -> int:
        return sum(1 for agent in self.agents if agent.job is not None)


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
    cold_loads: int = 0  # jobs that found their model not loaded on their agent
    load_gpu_s: float = 0.0  # GPU-seconds spent loading models
    drained: int = 0  # jobs handed back by a scale-down (checkpoint at a step boundary, resumed elsewhere)
    yielded: int = 0  # jobs preempted by an overdue premium job
    hourly_waits: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # tier → hour → waits

    def per_day(self, value: float) -> float:
        """A scaled-fleet total over the window → the full fleet's per-day figure."""
        return value / self.cfg.scale * DAY_S / self.window_s

    def wait_stats(self, tier: str) -> tuple[float, float, float]:
        waits = self.waits.get(tier)
        if not waits:
            return math.nan, math.nan, math.nan
        return percentile(waits, 50), percentile(waits, 99), sum(waits) / len(waits)

    @property
    def useful_util(self) -> float:
        """Denoising GPU-seconds (busy minus model loads) over provisioned GPU-seconds."""
        provisioned = self.mean_pods * self.cfg.gpus_per_pod * self.window_s
        return (self.busy_gpu_s - self.load_gpu_s) / provisioned if provisioned else 0.0

    @property
    def cost_per_video_usd(self) -> float:
        """Provisioned GPU-hours (starting, ready and draining pods alike) at the configured price, per video done."""
        return self.mean_pods * self.cfg.gpus_per_pod * self.window_s / 3600 * self.cfg.gpu_hour_usd / max(
            self.jobs_done, 1)


class FleetSim:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.curve = DailyCurve(cfg)
        self.rng_arrival = random.Random(cfg.seed * 1_000_003 + 1)
        self.rng_job = random.Random(cfg.seed * 1_000_003 + 2)
        self.rng_fail = random.Random(cfg.seed * 1_000_003 + 3)
        total_mix = sum(cfg.mix.values())
        self.mix = [(tier, share / total_mix) for tier, share in cfg.mix.items()]
        unknown = set(cfg.mix) - set(cfg.weights)
        if unknown:
            raise ValueError(f"tiers {sorted(unknown)} in the mix have no weight")
        total_cls = sum(p for _, p, _ in cfg.classes)
        self.classes = [(name, p / total_cls, mean * cfg.service_scale) for name, p, mean in cfg.classes]
        total_models = sum(share for _, share, _, _ in cfg.models)
        mean_factor = sum(share * factor for _, share, factor, _ in cfg.models) / total_models
        # (name, share, GPU-time factor normalised so the mean job stays the classes' mean, cold-load seconds)
        self.models = [(name, share / total_models, factor / mean_factor, load_s)
                       for name, share, factor, load_s in cfg.models]
        self.load_s = {name: load_s for name, _, _, load_s in self.models}
        sigma2 = math.log(1 + cfg.service_cv ** 2)
        self.sigma, self.mu_shift = math.sqrt(sigma2), -sigma2 / 2

        scale = cfg.scale
        policy = cfg.policy
        if isinstance(policy, DemandPolicy):
            self.policy = replace(policy, gpus_per_replica=cfg.gpus_per_pod,
                                  min_replicas=max(1, round(policy.min_replicas * scale)),
                                  max_replicas=max(1, round(policy.max_replicas * scale)))
        else:
            self.policy = replace(policy, scale_up_waiting=policy.scale_up_waiting * scale,
                                  min_replicas=max(1, round(policy.min_replicas * scale)),
                                  max_replicas=max(1, round(policy.max_replicas * scale)))
        self.t0 = cfg.start_hour * 3600
        self.t_end = self.t0 + cfg.hours * 3600
        # The platform's own queue policy (tiers, tenants, affinity, preemption), or the old partition-owned queues.
        self.queue = QueuePolicy(dict(cfg.weights), preempt_after_s=cfg.preempt_after_s,
                                 preempting_tiers=tuple(t for t in ("premium",) if t in cfg.weights))
        self.partitions = max(1, round(cfg.partitions * scale))
        self.part_queues: dict[tuple[str, int], deque[Job]] = {}
        self.part_pickers: dict[int, WeightedTierScheduler] = {}
        self.owner: dict[int, Agent] = {}
        self.owned: dict[int, list[int]] = {}  # agent id → its partitions
        self.members_changed = True
        self.dirty_parts: set[int] = set()  # partitions with new work since the last dispatch
        self.freed: list[Agent] = []  # agents freed since the last dispatch
        self.waiting_jobs = 0
        self.waiting_gpu_s = {tier: 0.0 for tier in cfg.weights}
        self.pods: dict[int, Pod] = {}
        self.idle: dict[str | None, dict[int, Agent]] = {}  # loaded model → idle agents, longest idle first
        self.idle_count = 0
        self.events: list = []
        self.seq = 0
        self.next_job = 0
        self.next_pod = 0
        self.next_agent = 0
        # integrals, updated on every change
        self.last_t = self.t0
        self.running = 0
        self.gpus_provisioned = 0
        self.pods_provisioned = 0
        self.busy_area = self.gpu_area = self.pod_area = 0.0
        self.peak_running = self.peak_pods = 0
        self.waits: dict[str, list[float]] = {tier: [] for tier in cfg.weights}
        self.hourly_waits: dict[str, dict[int, list[float]]] = {tier: {} for tier in cfg.weights}
        self.lost = self.resume_cost = self.ckpt_cost = self.load_cost = 0.0
        self.interruptions = self.failures = self.preemptions = self.cold_loads = self.drained = self.yielded = 0
        self.arrived = self.done = 0
        self.pending_requeue = 0
        self.fail_token = self.preempt_token = 0
        self.series: list[tuple] = []
        self.tick_arrivals = 0
        self.tick_arrived_gpu_s = 0.0
        self.tick_busy = self.tick_gpu = 0.0
        self.scale_ups = self.scale_downs = 0
        if cfg.pods is not None:
            pods0 = max(1, round(cfg.pods * scale))
        else:
            pods0 = math.ceil(self.curve.rate(self.t0) * scale * cfg.mean_service_s / cfg.gpus_per_pod
                              / cfg.initial_util)
        self.autoscaler = Autoscaler(self.policy, pods0) if cfg.autoscale else None
        for _ in range(self.autoscaler.replicas if self.autoscaler else pods0):
            self._add_pod(ready=True, now=self.t0)

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

    def _add_pod(self, ready: bool, now: float) -> None:
        pod = Pod(self.next_pod, "ready" if ready else "starting")
        self.next_pod += 1
        for _ in range(self.cfg.gpus_per_pod):
            pod.agents.append(Agent(self.next_agent, pod))
            self.next_agent += 1
        self.pods[pod.id] = pod
        self._advance(now)
        self.gpus_provisioned += self.cfg.gpus_per_pod
        self.pods_provisioned += 1
        self.peak_pods = max(self.peak_pods, self.pods_provisioned)
        if ready:
            self._pod_ready(pod, now)
        else:
            self._push(now + self.cfg.pod_startup_s, READY, pod)

    def _pod_ready(self, pod: Pod, t: float) -> None:
        pod.state = "ready"
        for agent in pod.agents:
            self._mark_idle(agent, t)
        self.members_changed = True

    def _remove_pod(self, pod: Pod, t: float) -> None:
        self._advance(t)
        for agent in pod.agents:
            self._unmark_idle(agent)
        pod.state = "gone"
        self.pods.pop(pod.id, None)
        self.gpus_provisioned -= self.cfg.gpus_per_pod
        self.pods_provisioned -= 1
        self.members_changed = True

    def _mark_idle(self, agent: Agent, t: float) -> None:
        if agent.up and agent.job is None and agent.pod.state == "ready":
            agent.idle_since = t
            self.idle.setdefault(agent.model, {})[agent.id] = agent
            self.idle_count += 1
            if self.cfg.dispatch == "partition":
                self.freed.append(agent)

    def _unmark_idle(self, agent: Agent) -> None:
        idle = self.idle.get(agent.model)
        if idle is not None and idle.pop(agent.id, None) is not None:
            self.idle_count -= 1

    def _pick(self, rng: random.Random, table: list[tuple]) -> tuple:
        x = rng.random()
        for row in table:
            x -= row[1]
            if x < 0:
                return row
        return table[-1]

    def _new_job(self, t: float) -> Job:
        rng = self.rng_job
        tier = self._pick(rng, self.mix)[0]
        model, _, factor, _ = self._pick(rng, self.models)
        mean = self._pick(rng, self.classes)[2] * factor
        if self.cfg.service_dist == "exp":
            service = rng.expovariate(1 / mean)
        elif self.cfg.service_cv <= 0:
            service = mean
        else:
            service = mean * math.exp(rng.gauss(self.mu_shift, self.sigma))
        tenant = f"t{min(int(rng.paretovariate(1.2)), self.cfg.tenants) - 1}"  # a few big tenants, a long tail
        job = Job(self.next_job, tier, t, service, model, tenant, rng.randrange(self.partitions))
        self.next_job += 1
        return job

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

    def _live_pods(self) -> list[Pod]:
        return [pod for pod in self.pods.values() if pod.state == "ready"]

    def _redraw_failures(self, t: float) -> None:
        """Memoryless: the next failure and preemption are redrawn for the fleet as it is now."""
        live = len(self._live_pods())
        self.fail_token += 1
        self.preempt_token += 1
        if self.cfg.failure_rate > 0 and live:
            self._push(t + self.rng_fail.expovariate(self.cfg.failure_rate * live * self.cfg.gpus_per_pod / 3600),
                       FAIL, self.fail_token)
        if self.cfg.preemption_rate > 0 and live:
            self._push(t + self.rng_fail.expovariate(self.cfg.preemption_rate * live / 3600), PREEMPT,
                       self.preempt_token)

    # -- the queue ----------------------------------------------------------------------------------------------------
    def _enqueue(self, job: Job, front: bool = False) -> None:
        job.waiting = job.remaining
        self.waiting_gpu_s[job.tier] += job.waiting
        self.waiting_jobs += 1
        if self.cfg.dispatch == "partition":
            queue = self.part_queues.setdefault((job.tier, job.partition), deque())
            queue.appendleft(job) if front else queue.append(job)  # redelivered: its partition's next message
            self.dirty_parts.add(job.partition)
        else:
            self.queue.add(WaitingJob(str(job.id), job.tier, job.tenant, job.model, 1, job.arrival,
                                      steps_done=int(job.saved), payload=job), front=front)

    def _dequeued(self, job: Job) -> None:
        self.waiting_gpu_s[job.tier] -= job.waiting
        self.waiting_jobs -= 1

    def _dispatch(self, t: float) -> None:
        if self.cfg.dispatch == "partition":
            self._dispatch_partitions(t)
            return
        queue = self.queue
        while self.idle_count and len(queue):
            # The longest-idle agent of each loaded model (and of none) stands for all: QueuePolicy.place picks an
            # agent with the job's model, else one with none loaded, else the longest idle — always among these.
            reps = [next(iter(agents.values())) for agents in self.idle.values() if agents]
            if self.cfg.affinity:
                views = [AgentView(str(a.id), frozenset((a.model,)) if a.model else frozenset(),
                                   idle_since=a.idle_since) for a in reps]
                by_id = {str(a.id): a for a in reps}
                for waiting, view in queue.dispatch(views, t):
                    self._start(waiting.payload, by_id[view.agent_id], t)
            else:  # no affinity: the next job to the agent idle longest, whatever it has loaded
                waiting = queue.next_job(t)
                self._start(waiting.payload, min(reps, key=lambda a: (a.idle_since, a.id)), t)

    def _rebalance(self) -> None:
        """The consumer group's assignment of the tier topics' partitions (range assignor, agents by id): with more
        agents than partitions the rest sit idle, whatever waits."""
        members = sorted((a for pod in self.pods.values() if pod.state == "ready" for a in pod.agents if a.up),
                         key=lambda a: a.id)
        self.owner, self.owned = {}, {}
        if members:
            n, parts = len(members), self.partitions
            per, extra = divmod(parts, n)
            start = 0
            for i, agent in enumerate(members[:parts]):
                count = per + (1 if i < extra else 0)
                for p in range(start, start + count):
                    self.owner[p] = agent
                self.owned[agent.id] = list(range(start, start + count))
                start += count
        self.members_changed = False

    def _dispatch_partitions(self, t: float) -> None:
        """Only the owners of partitions with new work, and agents just freed, can start anything."""
        if self.members_changed:
            self._rebalance()
            candidates = {agent.id: agent for agent in self.owner.values()}
        else:
            candidates = {agent.id: agent for p in self.dirty_parts if (agent := self.owner.get(p)) is not None}
            candidates.update((agent.id, agent) for agent in self.freed if agent.id in self.owned)
        self.dirty_parts.clear()
        self.freed.clear()
        for agent in candidates.values():
            if agent.job is not None or not agent.up or agent.pod.state != "ready":
                continue
            parts = self.owned.get(agent.id, ())
            ready = [tier for tier in self.cfg.weights if any(self.part_queues.get((tier, p)) for p in parts)]
            if not ready:
                continue
            picker = self.part_pickers.setdefault(agent.id, WeightedTierScheduler(self.cfg.weights))
            tier = picker.pick(ready)
            queue = next(self.part_queues[(tier, p)] for p in parts if self.part_queues.get((tier, p)))
            self._start(queue.popleft(), agent, t)
        self.freed.clear()  # those just started were not freed

    # -- jobs -------------------------------------------------------------------------------------------------------
    def _run_time(self, job: Job) -> float:
        remaining = job.remaining
        ckpts = math.floor(remaining / self.cfg.checkpoint_s - 1e-9) if self.cfg.checkpoint_s > 0 else 0
        return job.overhead + remaining + ckpts * self.cfg.checkpoint_cost_s

    def _start(self, job: Job, agent: Agent, t: float) -> None:
        self._dequeued(job)
        self._unmark_idle(agent)
        if agent.model != job.model:  # a cold agent loads the job's model first
            load = self.load_s.get(job.model, 0.0)
            if agent.model is not None or load:
                self.cold_loads += 1
            job.overhead += load
            self.load_cost += load
            agent.model = job.model
        agent.job, job.agent = job, agent
        job.started = t
        job.token += 1
        if job.first_start is None:
            job.first_start = t
            self.waits[job.tier].append(t - job.arrival)
            self.hourly_waits[job.tier].setdefault(int(t // 3600), []).append(t - job.arrival)
        self._advance(t)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        self._push(t + self._run_time(job), DONE, (job, job.token))

    def _release(self, job: Job, t: float) -> Agent:
        agent = job.agent
        agent.job = None
        job.agent = None
        self._advance(t)
        self.running -= 1
        return agent

    def _agent_free(self, agent: Agent, t: float) -> None:
        pod = agent.pod
        if pod.state == "draining" and not pod.busy():
            self._remove_pod(pod, t)
        else:
            self._mark_idle(agent, t)

    def _finish(self, job: Job, t: float) -> None:
        remaining = job.remaining
        ckpts = math.floor(remaining / self.cfg.checkpoint_s - 1e-9) if self.cfg.checkpoint_s > 0 else 0
        self.ckpt_cost += ckpts * self.cfg.checkpoint_cost_s
        self.resume_cost += job.overhead
        agent = self._release(job, t)
        self.done += 1
        self._agent_free(agent, t)

    def _progress(self, job: Job, t: float) -> tuple[float, int]:
        """(progress made in this run, checkpoints taken in it) at time t."""
        cfg = self.cfg
        elapsed = max(0.0, t - job.started - job.overhead)
        if cfg.checkpoint_s <= 0:
            return min(elapsed, job.remaining), 0
        per_ckpt = cfg.checkpoint_s + cfg.checkpoint_cost_s
        ckpts = min(math.floor(elapsed / per_ckpt), math.floor(job.remaining / cfg.checkpoint_s - 1e-9))
        return min(elapsed - ckpts * cfg.checkpoint_cost_s, job.remaining), ckpts

    def _interrupt(self, job: Job, t: float, keep_all: bool = False) -> Agent:
        """The job stops on its agent. A failure keeps what the last checkpoint saved and redelivers the job later;
        a drain or a preemption (``keep_all``) checkpoints at the step boundary and hands it back at once."""
        cfg = self.cfg
        self.resume_cost += min(t - job.started, job.overhead)
        progress, ckpts = self._progress(job, t)
        self.ckpt_cost += ckpts * cfg.checkpoint_cost_s
        if keep_all:
            saved = progress
            self.ckpt_cost += cfg.checkpoint_cost_s
        else:
            saved = ckpts * cfg.checkpoint_s if cfg.checkpoint_s > 0 else 0.0
            self.lost += max(0.0, progress - saved)
            self.interruptions += 1
        job.saved += saved
        job.overhead = cfg.resume_s
        job.interrupts += 1
        job.token += 1  # its DONE event is void
        agent = self._release(job, t)
        if keep_all:
            self._enqueue(job, front=True)
        else:
            self.pending_requeue += 1
            self._push(t + cfg.redelivery_s, REQUEUE, job)
        return agent

    # -- the fleet --------------------------------------------------------------------------------------------------
    def _model_demand(self) -> dict[str | None, int]:
        demand: dict[str | None, int] = {}
        for waiting in self.queue.by_id.values():
            demand[waiting.model] = demand.get(waiting.model, 0) + 1
        for pod in self.pods.values():
            for agent in pod.agents:
                if agent.job is not None:
                    demand[agent.model] = demand.get(agent.model, 0) + 1
        return demand

    def _apply(self, desired: int, t: float) -> None:
        active = [pod for pod in self.pods.values() if pod.state in ("starting", "ready")]
        if desired > len(active):
            for _ in range(desired - len(active)):
                self._add_pod(ready=False, now=t)
        elif desired < len(active):
            # Pods not yet started first, then the least busy, then those whose models are least in demand; their
            # agents drain at the next step boundary (checkpoint) and the jobs resume elsewhere.
            demand = self._model_demand()
            active.sort(key=lambda pod: (pod.state != "starting", pod.busy(),
                                         sum(demand.get(a.model, 0) for a in pod.agents)))
            for pod in active[:len(active) - desired]:
                if pod.state == "ready":
                    for agent in pod.agents:
                        if agent.job is not None:
                            self.drained += 1
                            self._interrupt(agent.job, t, keep_all=True)
                self._remove_pod(pod, t)
            self._dispatch(t)

    def _preempt_for_overdue(self, t: float) -> None:
        """An overdue premium job and no idle agent: the platform's policy picks a running job to yield."""
        if self.cfg.dispatch == "partition" or self.idle_count or not self.queue.overdue(t):
            return
        running = [AgentView(str(a.id), frozenset((a.model,)), job_id=str(a.job.id), tier=a.job.tier,
                             step=int(a.job.saved), total_steps=int(a.job.service) or 1)
                   for pod in self.pods.values() if pod.state == "ready" for a in pod.agents
                   if a.job is not None and a.job.tier != "premium"]
        by_id = {view.agent_id: view for view in running}
        victim = self.queue.preemption(running, set(), t)
        if victim is not None:
            agent = next(a for pod in self.pods.values() for a in pod.agents if str(a.id) == victim.agent_id)
            self.yielded += 1
            self._interrupt(agent.job, t, keep_all=True)
            self._mark_idle(agent, t)
            self._dispatch(t)
        del by_id

    def _tick(self, t: float) -> None:
        self._advance(t)
        busy = self.busy_area - self.tick_busy
        gpus = self.gpu_area - self.tick_gpu
        self.tick_busy, self.tick_gpu = self.busy_area, self.gpu_area
        waiting = self.waiting_jobs + self.pending_requeue
        every = self.cfg.autoscale_every_s
        self.series.append((t, self.tick_arrivals / every, self.running, self.gpus_provisioned,
                            *(self._waiting_in(tier) for tier in self.cfg.weights)))
        arrived_gpu_s, self.tick_arrived_gpu_s, self.tick_arrivals = self.tick_arrived_gpu_s, 0.0, 0
        if self.autoscaler is not None:
            util = [busy / gpus] if gpus > 0 else []
            active = sum(1 for pod in self.pods.values() if pod.state in ("starting", "ready"))
            if active != self.autoscaler.replicas:  # pods lost (preempted and not yet replaced) or bounds
                self.autoscaler.set_replicas(active)
            decision = self.autoscaler.observe(Observation(
                at_s=t, waiting={"gpu-agent": waiting}, gpu_util=util, arrived_gpu_s=arrived_gpu_s,
                running_gpus=self.running, waiting_gpu_s=dict(self.waiting_gpu_s)))
            if decision.desired > decision.previous:
                self.scale_ups += 1
            elif decision.desired < decision.previous:
                self.scale_downs += 1
            self._apply(decision.desired, t)
        self._preempt_for_overdue(t)
        self._redraw_failures(t)
        if t + every < self.t_end:
            self._push(t + every, TICK)

    def _waiting_in(self, tier: str) -> int:
        if self.cfg.dispatch == "partition":
            return sum(len(q) for (qt, _), q in self.part_queues.items() if qt == tier)
        return len(self.queue.tiers[tier])

    def _fail_gpu(self, t: float) -> None:
        live = self._live_pods()
        if not live:
            return
        pod = live[self.rng_fail.randrange(len(live))]
        agent = pod.agents[self.rng_fail.randrange(len(pod.agents))]
        if not agent.up:
            return  # that GPU is already down
        self.failures += 1
        if agent.job is not None:
            self._interrupt(agent.job, t)
        self._unmark_idle(agent)
        agent.up = False
        self.members_changed = True
        self._push(t + self.cfg.gpu_restart_s, GPU_BACK, agent)

    def _preempt_pod(self, t: float) -> None:
        live = self._live_pods()
        if not live:
            return
        pod = live[self.rng_fail.randrange(len(live))]
        self.preemptions += 1
        for agent in pod.agents:
            if agent.job is not None:
                self._interrupt(agent.job, t)
        self._remove_pod(pod, t)
        self._add_pod(ready=False, now=t)  # the Deployment still wants that replica

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
                job = self._new_job(t)
                self.tick_arrived_gpu_s += job.service
                self._enqueue(job)
                self._next_arrival(t)
                self._dispatch(t)
            elif kind == DONE:
                job, token = payload
                if token == job.token:
                    self._finish(job, t)
                    self._dispatch(t)
            elif kind == REQUEUE:
                self.pending_requeue -= 1
                self._enqueue(payload, front=True)
                self._dispatch(t)
            elif kind == READY:
                pod = payload
                if pod.state == "starting":
                    self._pod_ready(pod, t)
                    self._dispatch(t)
            elif kind == GPU_BACK:
                agent = payload
                if agent.pod.state in ("ready", "draining"):
                    agent.up, agent.model = True, None  # a restarted agent has no model loaded
                    self.members_changed = True
                    self._agent_free(agent, t)
                    self._dispatch(t)
            elif kind == TICK:
                self._tick(t)
            elif kind in (FAIL, PREEMPT):
                token = self.fail_token if kind == FAIL else self.preempt_token
                if payload == token:
                    (self._fail_gpu if kind == FAIL else self._preempt_pod)(t)
                    live = len(self._live_pods())
                    if kind == FAIL:
                        self.fail_token += 1
                        if live:
                            self._push(t + self.rng_fail.expovariate(
                                self.cfg.failure_rate * live * self.cfg.gpus_per_pod / 3600), FAIL, self.fail_token)
                    else:
                        self.preempt_token += 1
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
            series=self.series, wall_s=time.perf_counter() - started, cold_loads=self.cold_loads,
            load_gpu_s=self.load_cost, drained=self.drained, yielded=self.yielded, hourly_waits=self.hourly_waits,
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


def _pyplot(out: Path):
    """matplotlib's pyplot (headless), with ``out`` made; None (and why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib)", file=sys.stderr)
        return None
    out.mkdir(parents=True, exist_ok=True)
    return plt


def draw(res: SimResult, out: Path) -> list[Path]:
    plt = _pyplot(out)
    if plt is None:
        return []
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


def draw_compare(results: dict[str, SimResult], out: Path) -> list[Path]:
    """One page of the simulated day for each policy side by side: arrivals, pods provisioned against busy,
    utilisation, and each tier's p99 wait hour by hour."""
    plt = _pyplot(out)
    if plt is None:
        return []
    fig, ax = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    for name, res in results.items():
        s, gpp = res.cfg.scale, res.cfg.gpus_per_pod
        hours = [row[0] / 3600 for row in res.series]
        if name == next(iter(results)):
            ax[0].plot(hours, [row[1] / s for row in res.series], lw=0.7, color="grey")
            ax[1].plot(hours, [row[2] / s / gpp for row in res.series], lw=0.8, color="black",
                       label=f"pods' worth of busy GPUs ({name})")
        ax[1].plot(hours, [row[3] / s / gpp for row in res.series], lw=1.0, label=f"provisioned ({name})")
        ax[2].plot(hours, [row[2] / row[3] if row[3] else 0 for row in res.series], lw=0.8, label=name)
        for tier, by_hour in res.hourly_waits.items():
            hs = sorted(by_hour)
            ax[3].plot([h + 0.5 for h in hs], [max(percentile(by_hour[h], 99), 0.01) for h in hs], marker=".",
                       lw=0.8, label=f"{tier} ({name})")
    ax[0].set_ylabel("arrivals / s")
    ax[0].set_title("vidgen simulate --compare: the same day under each autoscaling policy")
    ax[1].set_ylabel("pods")
    ax[1].legend(fontsize=8)
    ax[2].set_ylabel("GPU utilisation")
    ax[2].set_ylim(0, 1.05)
    ax[2].legend(fontsize=8)
    ax[3].set_yscale("log")
    ax[3].set_ylabel("p99 wait per hour, s")
    ax[3].set_xlabel("hour of day")
    ax[3].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


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
    p.add_argument("--policy", choices=("demand", "seed"), default="demand",
                   help="autoscaling policy: demand (default) or the seed's queue-threshold rule")
    p.add_argument("--compare", action="store_true",
                   help="one run per policy on the same arrivals (and the demand policy without model affinity, "
                        "and with the old partition-owned dispatch), side by side")
    seed = AutoscalePolicy()
    p.add_argument("--scale-up-waiting", type=float, default=seed.scale_up_waiting)
    p.add_argument("--step-up", type=float, default=seed.step_up)
    p.add_argument("--scale-down-util", type=float, default=seed.scale_down_util)
    p.add_argument("--scale-down-after-s", type=float, default=seed.scale_down_after_s)
    p.add_argument("--step-down", type=float, default=seed.step_down)
    p.add_argument("--min-pods", type=int, default=seed.min_replicas)
    p.add_argument("--max-pods", type=int, default=10_000)
    p.add_argument("--cooldown-up-s", type=float, default=seed.cooldown_up_s)
    p.add_argument("--cooldown-down-s", type=float, default=seed.cooldown_down_s)
    demand = DemandPolicy()
    p.add_argument("--wait-objectives", type=parse_weights, default=dict(demand.wait_objectives_s),
                   help="the demand policy's p99 wait objective per tier, s (default premium=10,standard=60,free=600)")
    p.add_argument("--safety", type=float, default=demand.safety, help="square-root staffing factor (default 1.5)")
    p.add_argument("--lead-s", type=float, default=None,
                   help="a new pod's time to take work (default: --pod-startup-s + the slowest model load)")
    p.add_argument("--models", type=_parse_models, default=d.models,
                   help="model:share:relative_gpu_time:cold_load_s,... (default wan-1.3b:0.7:1:20,wan-14b:0.3:3:60)")
    p.add_argument("--no-affinity", dest="affinity", action="store_false",
                   help="place jobs on any idle agent, whatever model it has loaded")
    p.add_argument("--dispatch", choices=("scheduler", "partition"), default=d.dispatch,
                   help="scheduler: the platform's shared queue; partition: each job waits for the agent that owns "
                        "its partition (the old consumer-group dispatch)")
    p.add_argument("--partitions", type=int, default=d.partitions, help="partitions per tier topic (full scale)")
    p.add_argument("--gpu-hour-usd", type=float, default=d.gpu_hour_usd)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="directory for PNG charts")
    p.add_argument("--sweep", action="store_true",
                   help="also print a table over checkpoint intervals and tier mixes (runs at --sweep-scale)")
    p.add_argument("--sweep-scale", type=float, default=0.05)
    return p


def _parse_models(text: str) -> tuple:
    models = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            name, share, factor, load_s = item.split(":")
            models.append((name, float(share), float(factor), float(load_s)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"model {item!r} is not name:share:relative_gpu_time:load_s") from None
    if not models or any(share <= 0 or factor <= 0 or load < 0 for _, share, factor, load in models):
        raise argparse.ArgumentTypeError("models need positive shares and GPU times, loads >= 0")
    return tuple(models)


def seed_policy(args: argparse.Namespace) -> AutoscalePolicy:
    return AutoscalePolicy(
        scale_up_waiting=args.scale_up_waiting, step_up=args.step_up, scale_down_util=args.scale_down_util,
        scale_down_after_s=args.scale_down_after_s, step_down=args.step_down, min_replicas=args.min_pods,
        max_replicas=args.max_pods, cooldown_up_s=args.cooldown_up_s, cooldown_down_s=args.cooldown_down_s)


def demand_policy(args: argparse.Namespace) -> DemandPolicy:
    lead = args.lead_s if args.lead_s is not None else args.pod_startup_s + max(m[3] for m in args.models)
    return DemandPolicy(gpus_per_replica=args.gpus_per_pod, wait_objectives_s=args.wait_objectives, lead_s=lead,
                        safety=args.safety, min_replicas=args.min_pods, max_replicas=args.max_pods)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    policy = demand_policy(args) if args.policy == "demand" else seed_policy(args)
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
        seed=args.seed, models=args.models, affinity=args.affinity, dispatch=args.dispatch,
        partitions=args.partitions, gpu_hour_usd=args.gpu_hour_usd)


def compare(args: argparse.Namespace, cfg: SimConfig) -> int:
    """The seed's rule and the demand policy on the same arrivals; the demand policy again without model affinity
    and with the old partition-owned dispatch, to show what each saves."""
    runs = {"seed": replace(cfg, policy=seed_policy(args)), "demand": replace(cfg, policy=demand_policy(args)),
            "demand, no affinity": replace(cfg, policy=demand_policy(args), affinity=False),
            "demand, partition dispatch": replace(cfg, policy=demand_policy(args), dispatch="partition")}
    results = {}
    for name, run_cfg in runs.items():
        results[name] = simulate(run_cfg)
        print(f"{name}: simulated in {results[name].wall_s:.1f} s", flush=True)
    rows = []
    for name, res in results.items():
        m = summary(res)
        rows.append((name, m["gpu_util"], res.useful_util, m["pods"], m["peak_pods"], m["p99_wait_premium_s"],
                     m["p99_wait_standard_s"], m["p99_wait_free_s"], res.cost_per_video_usd,
                     res.per_day(res.load_gpu_s), res.drained, res.yielded))
    print(f"\n{cfg.hours:g} h from {cfg.start_hour:g}:00 at scale {cfg.scale:g}, {cfg.jobs_per_day:,.0f} jobs/day "
          f"({cfg.curve} curve, peak x{cfg.peak_factor:g}); pods of {cfg.gpus_per_pod} GPUs start in "
          f"{cfg.pod_startup_s:g} s; models {', '.join(f'{n} {s:g} x{f:g} load {l:g} s' for n, s, f, l in cfg.models)}; "
          f"{cfg.gpu_hour_usd:.2f} USD per GPU-hour. Full-fleet figures.")
    print(format_table(["run", "GPU util", "w/o loads", "pods mean", "pods peak", "p99 premium s", "p99 standard s",
                        "p99 free s", "USD/video", "load GPU-s/day", "drained", "yielded"], rows,
                       float_format="{:,.3f}"))
    if args.out is not None:
        for path in draw_compare({"seed": results["seed"], "demand": results["demand"]}, args.out):
            print(f"chart: {path}")
    seed, demand = summary(results["seed"]), summary(results["demand"])
    print_result(gpu_util_seed=round(seed["gpu_util"], 4), gpu_util_demand=round(demand["gpu_util"], 4),
                 pods_mean_seed=round(seed["pods"]), pods_mean_demand=round(demand["pods"]),
                 p99_wait_premium_s_seed=seed["p99_wait_premium_s"], p99_wait_premium_s_demand=demand["p99_wait_premium_s"],
                 p99_wait_standard_s_seed=seed["p99_wait_standard_s"],
                 p99_wait_standard_s_demand=demand["p99_wait_standard_s"],
                 p99_wait_free_s_seed=seed["p99_wait_free_s"], p99_wait_free_s_demand=demand["p99_wait_free_s"],
                 cost_per_video_usd_seed=round(results["seed"].cost_per_video_usd, 5),
                 cost_per_video_usd_demand=round(results["demand"].cost_per_video_usd, 5), dispatch=cfg.dispatch,
                 useful_util_seed=round(results["seed"].useful_util, 4),
                 useful_util_demand=round(results["demand"].useful_util, 4))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.compare:
        return compare(args, cfg)
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

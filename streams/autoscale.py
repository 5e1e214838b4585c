"""The autoscaling policies of a worker fleet (GPU agents first) as pure functions: no Kafka, no Kubernetes, no clock.

Two policies, chosen by the operator and comparable on the same day (`vidgen simulate --compare`):

**DemandPolicy** (the GPU agents' default): desired replicas from what the scheduler sees — the GPU-seconds of work
arriving (and its trend), running and waiting per tier — against per-tier wait objectives; see its docstring.

**AutoscalePolicy**, the seed's rule, with the two things any real controller needs added (bounds and cooldowns):

* **scale up** by ``step_up`` (10%) of the current replicas when more than ``scale_up_waiting`` (100) jobs are
  waiting (for the GPU agents, the jobs in the scheduler's queue that no agent runs yet; for a stage that consumes
  its input, its consumer lag; summed over the entries given), at most once per ``cooldown_up_s``;
* **scale down** by ``step_down`` (10%) when the mean GPU utilisation has stayed under ``scale_down_util`` (40%)
  for ``scale_down_after_s`` (30 minutes) and nothing is backed up, at most once per ``cooldown_down_s`` and never
  within ``cooldown_down_s`` of a scale-up (a fleet that just grew is not shrunk by the next quiet sample);
* the result is always within ``[min_replicas, max_replicas]``; a step always moves by at least one replica.

The low-utilisation clock keeps running across a scale-down: while utilisation stays low, further steps down
come every ``cooldown_down_s``; any sample at or above the threshold, or a backlog, restarts it. An observation
with no utilisation samples (no GPU reported) neither starts nor restarts it.

``decide(policy, state, observation)`` (either policy) returns a ``Decision`` holding the desired replica count, a
reason in words (for logs and metrics) and the next state; it never mutates its arguments, so the same code runs in
the live controller (``vidgen autoscale``), in the fleet simulator (``vidgen simulate``) and in tests on recorded
traces. ``Autoscaler`` carries the state for callers that want an object.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ReplicaBounds:
    """The replica range every policy keeps to."""

    min_replicas: int = 1
    max_replicas: int = 2000

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")

    def bound(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class AutoscalePolicy(ReplicaBounds):
    scale_up_waiting: float = 100
    step_up: float = 0.10
    scale_down_util: float = 0.40
    scale_down_after_s: float = 1800.0
    step_down: float = 0.10
    cooldown_up_s: float = 120.0
    cooldown_down_s: float = 600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.step_up and 0 < self.step_down < 1):
            raise ValueError("step_up must be > 0 and step_down within (0, 1)")
        if not 0 <= self.scale_down_util <= 1:
            raise ValueError("scale_down_util is a fraction of 1")
        if min(self.scale_up_waiting, self.scale_down_after_s, self.cooldown_up_s, self.cooldown_down_s) < 0:
            raise ValueError("thresholds and cooldowns must not be negative")

    def decide(self, state: "AutoscaleState", observation: "Observation") -> "Decision":
        return _decide_seed(self, state, observation)

    def step_up_from(self, replicas: int) -> int:
        return self.bound(max(replicas + 1, math.ceil(replicas * (1 + self.step_up) - 1e-9)))

    def step_down_from(self, replicas: int) -> int:
        return self.bound(min(replicas - 1, math.floor(replicas * (1 - self.step_down) + 1e-9)))


@dataclass(frozen=True)
class Observation:
    """What the controller saw at ``at_s`` (seconds on any monotonic clock)."""

    at_s: float
    #: jobs waiting, per tier (the scheduler's queue) or per partition (a consumer group's lag); summed
    waiting: Mapping[str, float] = field(default_factory=dict)
    #: GPU utilisation samples in [0, 1] since the previous observation (per GPU, per scrape; averaged)
    gpu_util: Sequence[float] = ()
    #: what the demand policy reads (the scheduler's view): GPU-seconds of the work that arrived since the previous
    #: observation, GPUs busy now, and GPU-seconds of the work waiting, per tier
    arrived_gpu_s: float = 0.0
    running_gpus: float = 0.0
    waiting_gpu_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def total_waiting(self) -> float:
        return float(sum(self.waiting.values()))

    @property
    def mean_util(self) -> float | None:
        return sum(self.gpu_util) / len(self.gpu_util) if self.gpu_util else None


@dataclass(frozen=True)
class AutoscaleState:
    replicas: int
    last_up_s: float | None = None
    last_down_s: float | None = None
    #: since when utilisation has been under the threshold with no backlog (None: it is not); the demand policy:
    #: since when the fleet has been larger than it needs
    low_util_since_s: float | None = None
    #: the demand policy's smoothed demand (GPU-seconds of work arriving per second = GPUs it keeps busy), its trend
    #: (per second) and the time of the observation they include
    demand: float | None = None
    trend: float = 0.0
    observed_at_s: float | None = None
    #: the largest replica count the demand policy wanted while the fleet was too large (it scales down to that)
    wanted_since_low: int = 0


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    state: AutoscaleState
    #: the replica count the decision started from
    previous: int = 0

    @property
    def changed(self) -> bool:
        return self.desired != self.previous


def _since(now: float, then: float | None) -> float:
    return math.inf if then is None else now - then


def decide(policy: "AutoscalePolicy | DemandPolicy", state: AutoscaleState, observation: Observation) -> Decision:
    """The replica count the fleet should have now, why, and the state to pass to the next call."""
    return policy.decide(state, observation)


def _decide_seed(policy: AutoscalePolicy, state: AutoscaleState, observation: Observation) -> Decision:
    now, replicas = observation.at_s, state.replicas
    waiting, util = observation.total_waiting, observation.mean_util
    backlog = waiting > policy.scale_up_waiting

    low_since = state.low_util_since_s
    if backlog or (util is not None and util >= policy.scale_down_util):
        low_since = None
    elif util is not None and low_since is None:
        low_since = now
    state = replace(state, low_util_since_s=low_since)

    def hold(reason: str) -> Decision:
        return Decision(replicas, reason, state, previous=replicas)

    bounded = policy.bound(replicas)
    if bounded != replicas:
        return Decision(bounded, f"outside bounds [{policy.min_replicas}, {policy.max_replicas}]",
                        replace(state, replicas=bounded), previous=replicas)

    if backlog:
        if replicas >= policy.max_replicas:
            return hold(f"{waiting:.0f} waiting but at max_replicas {policy.max_replicas}")
        wait_s = policy.cooldown_up_s - _since(now, state.last_up_s)
        if wait_s > 0:
            return hold(f"{waiting:.0f} waiting; scale-up cooldown ({wait_s:.0f} s left)")
        desired = policy.step_up_from(replicas)
        return Decision(desired, f"{waiting:.0f} waiting > {policy.scale_up_waiting:g}: +{policy.step_up:.0%}",
                        replace(state, replicas=desired, last_up_s=now), previous=replicas)

    if low_since is not None and now - low_since >= policy.scale_down_after_s:
        if replicas <= policy.min_replicas:
            return hold(f"utilisation low but at min_replicas {policy.min_replicas}")
        since_change = min(_since(now, state.last_down_s), _since(now, state.last_up_s))
        wait_s = policy.cooldown_down_s - since_change
        if wait_s > 0:
            return hold(f"utilisation low; scale-down cooldown ({wait_s:.0f} s left)")
        desired = policy.step_down_from(replicas)
        return Decision(desired, f"utilisation < {policy.scale_down_util:.0%} for "
                                 f"{(now - low_since) / 60:.0f} min: -{policy.step_down:.0%}",
                        replace(state, replicas=desired, last_down_s=now), previous=replicas)

    if low_since is not None:
        return hold(f"utilisation {util if util is not None else float('nan'):.0%} low for "
                    f"{(now - low_since) / 60:.0f} of {policy.scale_down_after_s / 60:.0f} min")
    return hold("steady")


#: Default wait objectives (p99 seconds from request to first step) per tier.
DEFAULT_WAIT_OBJECTIVES_S = {"premium": 10.0, "standard": 60.0, "free": 600.0}


@dataclass(frozen=True)
class DemandPolicy(ReplicaBounds):
    """Replicas from demand, not from a threshold: enough GPUs for the work that will be arriving when a replica
    asked for now can take it, plus enough to clear what waits within each tier's objective.

    Each observation:
    1. **Demand.** The GPU-seconds that arrived since the last observation, per second, is the number of GPUs the
       arriving work keeps busy (Little's law). Smoothed (time constant ``rate_tau_s``), with its trend.
    2. **Forecast.** Replicas asked for now take work ``lead_s`` later (pod start + model load): plan for the demand
       then, ``demand + trend·lead_s``, and never below the GPUs busy now.
    3. **Headroom.** Arrivals are random: square-root staffing, ``load + safety·√load`` GPUs, keeps the chance that a
       job waits at all small however large the fleet (the Halfin–Whitt regime), so a large fleet runs hot.
    4. **Backlog.** Work already waiting, per tier: its GPU-seconds over the time it may still take
       (the tier's objective, but no less than ``lead_s``: new capacity cannot come sooner).
    5. **Up at once, down slowly.** More replicas: now, when work waits or the fleet is more than
       ``scale_up_margin`` short (the caller counts replicas still starting as replicas, so nothing is asked
       twice). Fewer, to the most it wanted over the window: only once the fleet has been more than ``scale_down_margin`` too large for
       ``scale_down_after_s``, by at most ``step_down`` of it per ``cooldown_down_s``; the replicas go at a step
       boundary (their agents drain: checkpoint, and the job resumes elsewhere).
    """

    gpus_per_replica: int = 8
    wait_objectives_s: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WAIT_OBJECTIVES_S))
    lead_s: float = 300.0
    rate_tau_s: float = 300.0
    trend_tau_s: float = 900.0
    safety: float = 1.5
    scale_up_margin: float = 0.02
    scale_down_margin: float = 0.05
    scale_down_after_s: float = 300.0
    step_down: float = 0.10
    cooldown_down_s: float = 120.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gpus_per_replica < 1:
            raise ValueError("gpus_per_replica must be at least 1")
        if any(v <= 0 for v in self.wait_objectives_s.values()):
            raise ValueError(f"wait objectives must be positive seconds, got {dict(self.wait_objectives_s)}")
        if not 0 < self.step_down < 1 or not 0 <= self.scale_down_margin < 1:
            raise ValueError("step_down within (0, 1) and scale_down_margin within [0, 1)")
        if min(self.lead_s, self.rate_tau_s, self.safety, self.scale_down_after_s, self.cooldown_down_s) < 0:
            raise ValueError("times and the safety factor must not be negative")

    def gpus_needed(self, state: AutoscaleState, observation: Observation) -> tuple[float, AutoscaleState, str]:
        """Steps 1-4: the GPUs the fleet should have, the state with the new demand estimate, and why."""
        now = observation.at_s
        demand, trend = state.demand, state.trend
        dt = None if state.observed_at_s is None else now - state.observed_at_s
        if dt is not None and dt > 0:
            rate = observation.arrived_gpu_s / dt
            if demand is None:
                demand = rate
            else:
                weight = 1 - math.exp(-dt / self.rate_tau_s) if self.rate_tau_s > 0 else 1.0
                smoothed = demand + weight * (rate - demand)
                trend_weight = 1 - math.exp(-dt / self.trend_tau_s) if self.trend_tau_s > 0 else 1.0
                trend += trend_weight * ((smoothed - demand) / dt - trend)
                demand = smoothed
        elif demand is None:  # the first observation: what runs now is the best guess of the demand
            demand = observation.running_gpus
        state = replace(state, demand=demand, trend=trend, observed_at_s=now)
        # Rising demand is met ahead (new capacity comes lead_s late); falling demand is not anticipated (capacity
        # goes at once), so the plan never drops below the demand now.
        forecast = max(0.0, demand + trend * self.lead_s)
        load = max(forecast, demand)
        staffed = load + self.safety * math.sqrt(load)
        backlog = sum(gpu_s / max(self.wait_objectives_s.get(tier, max(self.wait_objectives_s.values())),
                                  self.lead_s)
                      for tier, gpu_s in observation.waiting_gpu_s.items())
        why = (f"demand {demand:.1f} GPUs (trend {trend * 60:+.2f}/min) → {forecast:.1f} in {self.lead_s:.0f} s, "
               f"{observation.running_gpus:.0f} busy, +{staffed - load:.1f} headroom, +{backlog:.1f} for the backlog")
        return staffed + backlog, state, why

    def decide(self, state: AutoscaleState, observation: Observation) -> Decision:
        now, replicas = observation.at_s, state.replicas
        gpus, state, why = self.gpus_needed(state, observation)
        desired = self.bound(math.ceil(gpus / self.gpus_per_replica - 1e-9))
        waiting = sum(observation.waiting_gpu_s.values()) > 0
        if desired > replicas and (waiting or desired > replicas * (1 + self.scale_up_margin)
                                   or replicas < self.min_replicas):
            return Decision(desired, f"up: {why}", replace(state, replicas=desired, last_up_s=now,
                                                           low_util_since_s=None), previous=replicas)
        if desired >= replicas * (1 - self.scale_down_margin) or replicas <= self.min_replicas:
            return Decision(replicas, f"steady: {why}", replace(state, low_util_since_s=None), previous=replicas)
        # Too large: down to the most it wanted over the whole window, so a dip in the noise is not a step down.
        fresh = state.low_util_since_s is None
        low_since = now if fresh else state.low_util_since_s
        wanted = desired if fresh else max(state.wanted_since_low, desired)
        state = replace(state, low_util_since_s=low_since, wanted_since_low=wanted)
        since_change = min(_since(now, state.last_down_s), _since(now, state.last_up_s))
        if now - low_since < self.scale_down_after_s or since_change < self.cooldown_down_s:
            return Decision(replicas, f"too large ({wanted} would do) for {now - low_since:.0f} s: {why}", state,
                            previous=replicas)
        smaller = min(replicas - 1, max(wanted, self.bound(math.floor(replicas * (1 - self.step_down) + 1e-9))))
        return Decision(smaller, f"down: {why}", replace(state, replicas=smaller, last_down_s=now,
                                                         low_util_since_s=None), previous=replicas)


class Autoscaler:
    """``decide`` with its state carried between calls."""

    def __init__(self, policy: "AutoscalePolicy | DemandPolicy", replicas: int):
        self.policy = policy
        self.state = AutoscaleState(replicas=policy.bound(replicas))

    @property
    def replicas(self) -> int:
        return self.state.replicas

    def observe(self, observation: Observation) -> Decision:
        decision = decide(self.policy, self.state, observation)
        self.state = decision.state
        return decision

    def set_replicas(self, replicas: int) -> None:
        """The fleet changed outside the policy (a pod lost, a manual scale): follow it."""
        self.state = replace(self.state, replicas=self.policy.bound(replicas))

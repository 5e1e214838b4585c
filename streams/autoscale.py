"""The autoscaling policy of a worker fleet (GPU agents first) as a pure function: no Kafka, no Kubernetes, no clock.

The seed's rule, with the two things any real controller needs added (bounds and cooldowns):

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

``decide(policy, state, observation)`` returns a ``Decision`` holding the desired replica count, a reason in
words (for logs and metrics) and the next state; it never mutates its arguments, so the same code runs in the
live controller (``vidgen autoscale``), in the fleet simulator (``vidgen simulate``) and in tests on recorded
traces. ``Autoscaler`` carries the state for callers that want an object.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class AutoscalePolicy:
    scale_up_waiting: float = 100
    step_up: float = 0.10
    scale_down_util: float = 0.40
    scale_down_after_s: float = 1800.0
    step_down: float = 0.10
    min_replicas: int = 1
    max_replicas: int = 2000
    cooldown_up_s: float = 120.0
    cooldown_down_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if not (0 < self.step_up and 0 < self.step_down < 1):
            raise ValueError("step_up must be > 0 and step_down within (0, 1)")
        if not 0 <= self.scale_down_util <= 1:
            raise ValueError("scale_down_util is a fraction of 1")
        if min(self.scale_up_waiting, self.scale_down_after_s, self.cooldown_up_s, self.cooldown_down_s) < 0:
            raise ValueError("thresholds and cooldowns must not be negative")

    def bound(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

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
    #: since when utilisation has been under the threshold with no backlog (None: it is not)
    low_util_since_s: float | None = None


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


def decide(policy: AutoscalePolicy, state: AutoscaleState, observation: Observation) -> Decision:
    """The replica count the fleet should have now, why, and the state to pass to the next call."""
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


class Autoscaler:
    """``decide`` with its state carried between calls."""

    def __init__(self, policy: AutoscalePolicy, replicas: int):
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

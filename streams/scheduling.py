"""Which tier the scheduler starts a job from next: smooth weighted round robin over service tiers (the tier step of
consumers/queue_policy.py, across the whole fleet).

Each tier has a weight; while every tier has work waiting, started jobs are shared in proportion to the
weights (6/3/1 gives 60%/30%/10%), interleaved rather than in runs (nginx's "smooth" weighted round
robin). Only tiers with a job waiting take part in a pick, so a lone tier is served at once, whatever its
weight: no tier idles the GPU and no tier starves.

Credits. Every tier carries a credit; the credits of all tiers always sum to zero. A pick adds each
waiting tier's weight to its credit, starts the tier with the highest credit and takes the waiting tiers'
total weight off it. A tier with nothing waiting neither gains nor loses credit by picks.

Idle tiers (the catch-up rule). When a tier is found empty at a pick, its credit is capped at zero:

* positive credit (share it was owed but never used) is forfeited and handed to the waiting tiers, so a
  tier coming back after a quiet spell starts at best level with the others: no burst of catch-up picks;
* negative credit (it was served ahead of its share) is kept. Resetting it to zero instead would let a
  tier whose queue keeps draining wipe its debt at every empty moment and take more than its weight
  while others are backlogged (1 job every 8 picks gets 12.5% at weight 1 of 10, not 10%).

Handing the forfeited credit to the waiting tiers keeps the sum at zero, which is what keeps every
credit bounded: dropping it instead would lower the waiting tiers' level each time and give every later
returner a head start. All arithmetic is exact (fractions), so picks are deterministic for any weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from fractions import Fraction

DEFAULT_TIER_WEIGHTS: dict[str, float] = {"premium": 6.0, "standard": 3.0, "free": 1.0}


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Check tier weights (non-empty names, positive finite numbers, at least one tier); return a copy."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"tier weights must be a mapping of tier name to weight, got {type(weights).__name__}")
    if not weights:
        raise ValueError("tier weights must name at least one tier")
    checked: dict[str, float] = {}
    for tier, weight in weights.items():
        if not isinstance(tier, str) or not tier.strip():
            raise ValueError(f"tier names must be non-empty strings, got {tier!r}")
        # bool is an int subclass; weight=True is a bug upstream, not weight 1.
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"weight of tier {tier!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of tier {tier!r} must be positive and finite, got {weight}")
        checked[tier] = float(weight)
    return checked


def parse_weights(spec: str) -> dict[str, float]:
    """Parse "premium=6,standard=3,free=1" (the config form) into validated weights."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tier, sep, value = (text.strip() for text in item.partition("="))
        if not sep or not tier or not value:
            raise ValueError(f"tier weight {item!r} is not tier=weight")
        if tier in weights:
            raise ValueError(f"tier {tier!r} is given more than one weight in {spec!r}")
        try:
            weights[tier] = float(value)
        except ValueError:
            raise ValueError(f"weight of tier {tier!r} must be a number, got {value!r}") from None
    return validate_weights(weights)


class WeightedTierScheduler:
    """Picks the tier whose waiting job starts next; deterministic, not thread-safe (one per queue policy)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self._weights = validate_weights(DEFAULT_TIER_WEIGHTS if weights is None else weights)
        # Exact arithmetic: float credits would drift and break ties differently after many picks.
        self._exact_weights = {tier: Fraction(weight) for tier, weight in self._weights.items()}
        self._credits = {tier: Fraction(0) for tier in self._weights}
        # Ties go to the heavier tier, then to the tier named first.
        self._tie_order = {tier: index for index, tier in enumerate(self._weights)}

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def credits(self) -> dict[str, float]:
        """Current credit of every tier (for metrics and tests)."""
        return {tier: float(credit) for tier, credit in self._credits.items()}

    def pick(self, waiting: Iterable[str]) -> str | None:
        """The tier to start a job from, given the tiers with at least one job waiting; None if none waits.

        Duplicates in `waiting` are ignored. An empty `waiting` changes nothing (an idle GPU is not a pick).
        """
        ready = self._ready_tiers(waiting)
        if not ready:
            return None
        self._cap_idle_tiers(ready)

        total_weight = sum(self._exact_weights[tier] for tier in ready)
        for tier in ready:
            self._credits[tier] += self._exact_weights[tier]
        chosen = max(ready, key=lambda tier: (self._credits[tier], self._weights[tier], -self._tie_order[tier]))
        self._credits[chosen] -= total_weight
        return chosen

    def _ready_tiers(self, waiting: Iterable[str]) -> list[str]:
        if isinstance(waiting, str):
            raise TypeError("waiting must be a collection of tier names, not a single string")
        ready = set(waiting)
        unknown = sorted(ready - self._weights.keys())
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}; configured tiers: {', '.join(self._weights)}")
        return [tier for tier in self._weights if tier in ready]

    def _cap_idle_tiers(self, ready: list[str]) -> None:
        """Forfeit the positive credit of tiers with nothing waiting to the waiting ones (see module doc)."""
        forfeited = Fraction(0)
        for tier, credit in self._credits.items():
            if credit > 0 and tier not in ready:
                forfeited += credit
                self._credits[tier] = Fraction(0)
        if forfeited:
            ready_weight = sum(self._exact_weights[tier] for tier in ready)
            for tier in ready:
                self._credits[tier] += forfeited * self._exact_weights[tier] / ready_weight

"""WeightedTierScheduler: weighted shares under backlog, no starvation, no idling, no catch-up bursts."""

import math
import random
from collections import Counter

import pytest

from streams.scheduling import DEFAULT_TIER_WEIGHTS, WeightedTierScheduler, parse_weights, validate_weights

ALL_TIERS = tuple(DEFAULT_TIER_WEIGHTS)


def _backlogged_picks(scheduler: WeightedTierScheduler, count: int) -> list[str]:
    tiers = list(scheduler.weights)
    return [scheduler.pick(tiers) for _ in range(count)]


def _max_gap(picks: list[str], tier: str) -> int:
    positions = [index for index, picked in enumerate(picks) if picked == tier]
    return max(later - earlier for earlier, later in zip(positions, positions[1:]))


def test_default_weights():
    assert WeightedTierScheduler().weights == {"premium": 6.0, "standard": 3.0, "free": 1.0}


def test_backlogged_shares_match_the_weights():
    picks = _backlogged_picks(WeightedTierScheduler(), 1000)
    counts = Counter(picks)
    for tier, weight in DEFAULT_TIER_WEIGHTS.items():
        assert abs(counts[tier] / 1000 - weight / 10) <= 0.02, counts
    # Stronger: every cycle of sum(weights) picks holds each tier's weight exactly, interleaved.
    for start in range(0, 1000, 10):
        assert Counter(picks[start : start + 10]) == {"premium": 6, "standard": 3, "free": 1}
    assert "".join(tier[0] for tier in picks[:10]) == "psppspfpsp"


@pytest.mark.parametrize("tier", ALL_TIERS)
def test_a_lone_tier_is_picked_at_once(tier):
    assert WeightedTierScheduler().pick({tier}) == tier


def test_a_lone_free_job_is_picked_even_in_debt():
    scheduler = WeightedTierScheduler()
    # Free was just served ahead of its share, so it carries debt...
    assert _backlogged_picks(scheduler, 7)[-1] == "free"
    assert scheduler.credits["free"] < 0
    # ...yet alone it still runs: the GPU never idles while anything waits.
    for _ in range(5):
        assert scheduler.pick(["free", "free"]) == "free"


def test_nothing_waiting_gives_none_and_changes_nothing():
    scheduler = WeightedTierScheduler()
    _backlogged_picks(scheduler, 7)
    credits = scheduler.credits
    assert scheduler.pick([]) is None
    assert scheduler.pick(set()) is None
    assert scheduler.credits == credits


@pytest.mark.parametrize("idle_tier", ALL_TIERS)
@pytest.mark.parametrize("idle_picks", [1, 9, 1000])
@pytest.mark.parametrize("warmup_picks", [0, 4, 13])
def test_no_catch_up_burst_after_a_tier_idles(idle_tier, idle_picks, warmup_picks):
    """The bound: a tier that was found empty gets, in every first N picks after it returns, at most
    N * weight / total + 1 of them, i.e. no more than a fresh start gives it, however long it idled."""
    scheduler = WeightedTierScheduler()
    _backlogged_picks(scheduler, warmup_picks)
    others = [tier for tier in ALL_TIERS if tier != idle_tier]
    for _ in range(idle_picks):
        assert scheduler.pick(others) in others

    share = DEFAULT_TIER_WEIGHTS[idle_tier] / sum(DEFAULT_TIER_WEIGHTS.values())
    picked = 0
    first_pick = None
    for n, tier in enumerate(_backlogged_picks(scheduler, 200), start=1):
        if tier == idle_tier:
            picked += 1
            first_pick = first_pick or n
        assert picked <= n * share + 1, f"{idle_tier} got {picked} of the first {n} picks after idling"
    # Nor is it starved on its return: at most twice its normal spacing (it may come back in debt).
    assert first_pick is not None and first_pick <= 2 / share


def test_idle_tiers_forfeit_unused_credit_to_the_waiting_ones():
    scheduler = WeightedTierScheduler()
    scheduler.pick(ALL_TIERS)  # premium picked; standard and free now hold positive credit
    assert scheduler.credits["free"] > 0
    scheduler.pick(["premium", "standard"])
    assert scheduler.credits["free"] == 0
    assert sum(scheduler.credits.values()) == 0


def test_an_emptying_queue_does_not_wipe_debt():
    """Why idle credit is capped at zero rather than reset: a trickle of free jobs (one every 8 picks,
    more than its 10%) must still get 10% while the others are backlogged, not all it asks for."""
    scheduler = WeightedTierScheduler()
    free_queue = 0
    free_picks = 0
    for pick_number in range(8000):
        if pick_number % 8 == 0:
            free_queue += 1
        waiting = ["premium", "standard"] + (["free"] if free_queue else [])
        if scheduler.pick(waiting) == "free":
            free_queue -= 1
            free_picks += 1
    assert free_picks == 800


def test_custom_weights():
    scheduler = WeightedTierScheduler({"gold": 3, "bronze": 1})
    assert Counter(_backlogged_picks(scheduler, 400)) == {"gold": 300, "bronze": 100}

    fractional = WeightedTierScheduler({"a": 0.5, "b": 1.5, "c": 0.25})
    assert Counter(_backlogged_picks(fractional, 900)) == {"a": 200, "b": 600, "c": 100}


def test_single_tier_configuration():
    scheduler = WeightedTierScheduler({"only": 2.5})
    assert _backlogged_picks(scheduler, 5) == ["only"] * 5
    assert scheduler.pick([]) is None


@pytest.mark.parametrize(
    "weights",
    [
        DEFAULT_TIER_WEIGHTS,
        {"premium": 10, "standard": 5, "free": 1},
        {"premium": 8, "standard": 1, "free": 1},
        {"a": 2, "b": 7},
        {"a": 1, "b": 1, "c": 1, "d": 1},
    ],
)
def test_gap_between_picks_of_the_lightest_tier_is_bounded(weights):
    """Holds for any two tiers and for integer weights whose lightest is 1. Not for every weight set:
    smooth WRR lets e.g. {2, 3, 6} wait 7 picks where sum/min + 1 = 6.5."""
    scheduler = WeightedTierScheduler(weights)
    lightest = min(weights, key=weights.get)
    gap = _max_gap(_backlogged_picks(scheduler, 2000), lightest)
    assert gap <= sum(weights.values()) / weights[lightest] + 1


def test_picks_are_deterministic():
    rng = random.Random(7)
    patterns = [[tier for tier in ALL_TIERS if rng.random() < 0.6] for _ in range(500)]
    first, second = WeightedTierScheduler(), WeightedTierScheduler()
    assert [first.pick(waiting) for waiting in patterns] == [second.pick(set(waiting)) for waiting in patterns]


def test_credits_stay_bounded_under_arbitrary_arrivals():
    rng = random.Random(3)
    scheduler = WeightedTierScheduler({"a": 7, "b": 2.5, "c": 1, "d": 0.5})
    total = sum(scheduler.weights.values())
    for _ in range(5000):
        waiting = [tier for tier in scheduler.weights if rng.random() < rng.random()]
        picked = scheduler.pick(waiting)
        assert (picked is None) == (not waiting) and (picked is None or picked in waiting)
        credits = scheduler.credits
        assert math.isclose(sum(credits.values()), 0, abs_tol=1e-9)
        assert max(abs(credit) for credit in credits.values()) <= total


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "at least one tier"),
        ({"free": 0}, "positive"),
        ({"free": -1}, "positive"),
        ({"free": math.inf}, "finite"),
        ({"free": math.nan}, "finite"),
        ({"free": True}, "must be a number"),
        ({"free": "3"}, "must be a number"),
        ({"": 1}, "non-empty"),
        ({3: 1}, "non-empty strings"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(ValueError, match=message):
        WeightedTierScheduler(weights)


def test_weights_must_be_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        validate_weights([("free", 1)])


def test_parse_weights():
    assert parse_weights("premium=6,standard=3,free=1") == {"premium": 6.0, "standard": 3.0, "free": 1.0}
    assert parse_weights(" gold = 2.5 , bronze=1, ") == {"gold": 2.5, "bronze": 1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "at least one tier"),
        ("premium", "not tier=weight"),
        ("=3", "not tier=weight"),
        ("premium=", "not tier=weight"),
        ("premium=six", "must be a number"),
        ("premium=6,premium=3", "more than one weight"),
        ("premium=0", "positive"),
        ("premium=inf", "finite"),
    ],
)
def test_parse_weights_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_weights(spec)


def test_unknown_tiers_and_bare_strings_are_refused():
    scheduler = WeightedTierScheduler()
    with pytest.raises(ValueError, match="unknown tier.*'gold'"):
        scheduler.pick(["premium", "gold"])
    with pytest.raises(TypeError, match="single string"):
        scheduler.pick("free")

"""virt_balloon_stats.advice: reclaim advice from a guest's history, figures in, advice out.

Every history here is synthetic and built in the test from :func:`stretch`:
consecutive 5-minute points (the resolution the history store downsamples
to) at a fixed distance before :data:`NOW`. Ages are in seconds before NOW,
so "the last 6 hours" is ``stretch(6 * HOUR, 0, ...)``. The expected
figures follow the formula in the module's docstring and the README; where
a test restates part of it (the confidence, the bump), it says so.

The property tests at the end draw histories of points 5 minutes to 2 hours
long, whole or partly ok, with or without pressure, and policies with a
2-day window (so that most drawn histories are long enough) and any
percentile, half-life, aggregation interval and last-hour rule.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from typing import Any, List, Optional, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.unit.conftest import counted
from virt_balloon_stats.advice import (
    COUNTERS,
    Advice,
    Limits,
    Point,
    Policy,
    _needed,
    pressure_kinds,
    _scan,
    advise,
    deltas,
    host_total,
    merge,
)
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.stats import STATS_BY_QEMU_NAME

MiB = 2**20
GiB = 2**30
HOUR = 3600.0
DAY = 24 * HOUR
NOW = 1_800_000_000.0
STEP = 300.0
DEFAULT = Policy()
#: A guest of 2 GiB that may grow to 4 GiB, with no <min_guarantee>.
ROOMY = Limits(actual=2 * GiB, maximum=4 * GiB, min_guarantee=None)


def stretch(older: float, younger: float, used: Optional[int], *, step: float = STEP,
            actual: Optional[int] = 2 * GiB, **counters: Any) -> List[Point]:
    """Points from ``older`` to ``younger`` seconds before NOW, each peaking at ``used``; ``None``: gaps."""
    return [
        Point(
            start=NOW - older + i * step,
            seconds=step,
            ok_seconds=0.0 if used is None else step,
            used_peak=used,
            actual=actual,
            **counters,
        )
        for i in range(int((older - younger) // step))
    ]


def coverage(days: float, policy: Policy = DEFAULT) -> float:
    """The module's coverage of ``days`` of complete, recent history, in closed form."""
    h, w = policy.half_life_seconds, policy.window_seconds
    return (1 - 2 ** (-days * DAY / h)) / (1 - 2 ** (-w / h))


def widened(demand: int, confidence: float, policy: Policy = DEFAULT) -> int:
    """demand + margin, widened for confidence, rounded up to a MiB: the formula restated."""
    margin = max(policy.margin_fraction * demand, policy.margin_min_bytes)
    return math.ceil((demand + margin) * (1 + policy.confidence_widening * (1 - confidence)) / MiB) * MiB


def bumped(used: int, policy: Policy = DEFAULT) -> int:
    """What an interval with pressure at ``used`` bytes needs: the bump restated."""
    return max(used + policy.bump_min_bytes, math.ceil(used * (1 + policy.bump_fraction)))


# -- the scenarios the issue names -----------------------------------------------------------


def test_an_idle_guest_can_give_memory_back():
    advice = advise(stretch(3 * DAY, 0, 100 * MiB), ROOMY, DEFAULT, NOW)
    confidence = coverage(3)
    assert advice.confidence == pytest.approx(confidence)
    assert advice.demand == 100 * MiB
    assert advice.recommended == widened(100 * MiB, confidence) == 174 * MiB
    assert advice.reclaimable == 2 * GiB - 174 * MiB
    assert advice.history_seconds == pytest.approx(3 * DAY)
    assert advice.pressure_events == 0
    assert advice.reason == (
        "p95 of the 24 h peaks of used memory over 72.0 h of history (100 % complete): 100 MiB; "
        "+ margin 64 MiB; + 6 % for confidence 0.88"
    )


def _daily_peak(days: int, peak: int = 900 * MiB, base: int = 300 * MiB) -> List[Point]:
    """``base`` all day, and ``peak`` for one hour each day, 10 hours before NOW's time of day."""
    points: List[Point] = []
    for day in range(days):
        top = day * DAY
        points += stretch(top + DAY, top + 11 * HOUR, base)
        points += stretch(top + 11 * HOUR, top + 10 * HOUR, peak)
        points += stretch(top + 10 * HOUR, top, base)
    return sorted(points, key=lambda p: p.start)


def test_a_daily_peak_is_covered_not_the_idle_level():
    advice = advise(_daily_peak(4), ROOMY, DEFAULT, NOW)
    assert advice.demand == 900 * MiB
    assert advice.recommended == widened(900 * MiB, coverage(4))
    assert advice.recommended >= 900 * MiB * 1.15
    assert advice.reclaimable > 0


def test_the_daily_peak_needs_daily_intervals():
    """With 1-hour intervals the peak is 1/24 of the weight, under 5 %: p95 would miss it."""
    hourly = advise(_daily_peak(4), ROOMY, Policy(aggregation_seconds=HOUR), NOW)
    assert hourly.demand == 300 * MiB


def _shrunk(**counters: Any) -> List[Point]:
    """600 MiB used at 2 GiB for 3 days, then shrunk to 700 MiB for the last 6 h, using 680 MiB."""
    return (
        stretch(3 * DAY, 6 * HOUR, 600 * MiB)
        + stretch(6 * HOUR, 2 * HOUR, 680 * MiB, actual=700 * MiB)
        + stretch(2 * HOUR, 0, 680 * MiB, actual=700 * MiB, **counters)
    )


def test_a_guest_that_swaps_after_a_shrink_is_given_memory_back():
    calm = advise(_shrunk(), Limits(700 * MiB, 4 * GiB, None), DEFAULT, NOW)
    swapping = advise(_shrunk(swap_in=100 * MiB), Limits(700 * MiB, 4 * GiB, None), DEFAULT, NOW)
    assert calm.demand == 680 * MiB
    assert calm.pressure_events == 0
    assert swapping.pressure_events == 24
    assert swapping.demand == bumped(680 * MiB) > calm.demand
    assert swapping.recommended > calm.recommended
    assert swapping.recommended > 700 * MiB and swapping.reclaimable == 0
    assert "raised to 816 MiB by pressure in 24 intervals (swap-in burst x24)" in swapping.reason


@pytest.mark.parametrize(
    "seconds, swap_in, major_faults, burst",
    [
        (5.0, 5 * MiB, 0, True),  # 1 MiB/s over a raw interval
        (5.0, 5 * MiB - 1, 0, False),
        (300.0, 5 * MiB, 0, False),  # the same amount over 5 minutes is a trickle
        (300.0, 60 * MiB, 0, True),  # a minute's worth at 1 MiB/s
        (3600.0, 60 * MiB, 0, True),  # still there once downsampled to an hour
        (3600.0, 60 * MiB - 1, 0, False),
        (5.0, 0, 5 * 256, True),  # 256 faults/s: 1 MiB/s of 4 KiB pages
        (5.0, 0, 5 * 256 - 1, False),
        (3600.0, 0, 60 * 256, True),
    ],
)
def test_a_burst_is_a_rate_over_the_interval_or_over_a_minute(seconds, swap_in, major_faults, burst):
    last = Point(NOW - seconds, seconds, seconds, 300 * MiB, 2 * GiB,
                 swap_in=swap_in, major_faults=major_faults)
    advice = advise(stretch(2 * DAY, seconds, 300 * MiB) + [last], ROOMY, DEFAULT, NOW)
    assert advice.pressure_events == int(burst)
    assert (advice.demand == bumped(300 * MiB)) is burst


def test_downsampling_keeps_a_burst_of_a_minute():
    raw = [Point(NOW - HOUR + 5 * i, 5.0, 5.0, 300 * MiB, 2 * GiB, swap_in=5 * MiB if i < 12 else 0)
           for i in range(720)]
    history = stretch(2 * DAY, HOUR, 300 * MiB)
    assert advise(history + raw, ROOMY, DEFAULT, NOW).pressure_events == 12
    assert advise(history + [merge(raw)], ROOMY, DEFAULT, NOW).pressure_events == 1


def test_gaps_and_stale_periods_carry_no_demand_and_lower_confidence():
    """Every other 6 hours stale (ok 0, no figures): half the history, less confidence, a wider advice."""
    complete = stretch(4 * DAY, 0, 300 * MiB)
    stale = {"ok_seconds": 0.0, "used_peak": None}
    gappy = [p if int((NOW - p.start - 1) // (6 * HOUR)) % 2 else dataclasses.replace(p, **stale)
             for p in complete]
    whole = advise(complete, ROOMY, DEFAULT, NOW)
    holed = advise(gappy, ROOMY, DEFAULT, NOW)
    assert holed.history_seconds == pytest.approx(2 * DAY)
    assert holed.demand == whole.demand == 300 * MiB
    assert holed.confidence < whole.confidence / 2
    assert holed.recommended > whole.recommended
    assert "over 48.0 h of history (50 % complete)" in holed.reason
    # A recorded gap costs more than no record: the guest may have stopped answering in trouble.
    unrecorded = advise([p for p in gappy if p.used_peak is not None], ROOMY, DEFAULT, NOW)
    assert unrecorded.history_seconds == pytest.approx(holed.history_seconds)
    assert holed.confidence == pytest.approx(unrecorded.confidence * 0.5)


def test_a_history_of_gaps_is_no_history():
    advice = advise(stretch(4 * DAY, 0, None), ROOMY, DEFAULT, NOW)
    assert (advice.recommended, advice.reclaimable, advice.demand) == (None, None, None)
    assert advice.history_seconds == 0 and advice.confidence == 0
    assert advice.reason == "insufficient history: 0 s of the 24.0 h needed"


def test_partly_ok_points_weigh_by_their_ok_seconds():
    """p50 of hourly peaks, no decay: 24 h at 200 MiB against 36 h at 400 MiB, whole or half ok."""
    policy = Policy(percentile=0.5, aggregation_seconds=HOUR, half_life_seconds=1e12, window_seconds=3 * DAY,
                    min_history_seconds=HOUR, recent_seconds=0)
    low = stretch(60 * HOUR, 36 * HOUR, 200 * MiB)
    high = stretch(36 * HOUR, 0, 400 * MiB)
    half = [dataclasses.replace(p, ok_seconds=p.seconds / 2) for p in high]
    assert advise(low + high, ROOMY, policy, NOW).demand == 400 * MiB
    partly = advise(low + half, ROOMY, policy, NOW)
    assert partly.demand == 200 * MiB
    assert partly.history_seconds == pytest.approx(42 * HOUR)


def test_a_6_12_guest_with_oom_kills_is_bumped_from_its_size():
    """An OOM kill proves the guest was full: the bump starts from its size, not from what it used."""
    quiet = stretch(2 * DAY, 0, 400 * MiB, actual=512 * MiB)
    killed = list(quiet)
    at = len(killed) - 36  # 3 hours ago
    killed[at] = dataclasses.replace(killed[at], used_peak=500 * MiB, oom_kills=1)
    limits = Limits(512 * MiB, 1 * GiB, None)
    calm = advise(quiet, limits, DEFAULT, NOW)
    advice = advise(killed, limits, DEFAULT, NOW)
    assert calm.demand == 400 * MiB
    assert advice.demand == bumped(512 * MiB)
    assert advice.pressure_events == 1
    assert advice.recommended > 512 * MiB and advice.reclaimable == 0
    assert "by pressure in 1 interval (OOM kill x1)" in advice.reason
    # An OOM kill in a stale stretch, with no figures of its own, still raises its day by the guest's size.
    killed[at] = dataclasses.replace(killed[at], ok_seconds=0.0, used_peak=None)
    assert advise(killed, limits, DEFAULT, NOW).demand == bumped(512 * MiB)


def test_an_interval_with_several_kinds_of_pressure_is_one_event():
    history = stretch(2 * DAY, 0, 400 * MiB, actual=1 * GiB)
    history[-1] = dataclasses.replace(history[-1], swap_in=GiB, major_faults=10**6, oom_kills=2)
    history[-2] = dataclasses.replace(history[-2], swap_in=GiB)
    advice = advise(history, ROOMY, DEFAULT, NOW)
    assert advice.pressure_events == 2
    assert "by pressure in 2 intervals (swap-in burst x2, major-fault burst x1, OOM kill x1)" in advice.reason


@pytest.mark.parametrize(
    "field, kind", [("alloc_stalls", "allocation stall"), ("direct_reclaims", "direct reclaim")]
)
def test_any_stall_or_direct_reclaim_is_pressure_bumped_from_use(field, kind):
    history = stretch(2 * DAY, 0, 400 * MiB, actual=1 * GiB)
    history[-12] = dataclasses.replace(history[-12], used_peak=500 * MiB, **{field: 1})
    advice = advise(history, Limits(1 * GiB, 1 * GiB, None), DEFAULT, NOW)
    assert advice.demand == bumped(500 * MiB)
    assert f"({kind} x1)" in advice.reason


def test_old_pressure_fades_with_its_interval():
    """A swap-in burst over 7 days ago weighs under 1 %: p95 no longer sees it, and the reason says so."""
    history = stretch(8 * DAY, 0, 300 * MiB)
    history[100] = dataclasses.replace(history[100], swap_in=GiB)
    advice = advise(history, ROOMY, DEFAULT, NOW)
    assert advice.pressure_events == 1
    assert advice.demand == 300 * MiB
    assert "pressure in 1 interval (swap-in burst x1) left it as is" in advice.reason


def test_insufficient_history_gives_no_figures_and_says_how_much():
    advice = advise(stretch(10 * HOUR, 0, 100 * MiB), ROOMY, DEFAULT, NOW)
    assert advice.to_dict() == {
        "actual": 2 * GiB,
        "recommended": None,
        "reclaimable": None,
        "demand": None,
        "confidence": pytest.approx(coverage(10 / 24)),
        "history_seconds": pytest.approx(10 * HOUR),
        "pressure_events": 0,
        "reason": "insufficient history: 10.0 h of the 24.0 h needed",
    }


def test_the_last_hour_peak_is_never_advised_away():
    """p50 of hourly peaks would say 300 MiB; the guest holds 800 MiB now."""
    policy = Policy(percentile=0.5, aggregation_seconds=HOUR)
    history = stretch(2 * DAY, HOUR / 2, 300 * MiB) + stretch(HOUR / 2, 0, 800 * MiB)
    advice = advise(history, ROOMY, policy, NOW)
    assert advice.demand == 800 * MiB
    assert "raised to the last 1 h's peak, 800 MiB" in advice.reason
    assert advise(history, ROOMY, dataclasses.replace(policy, recent_seconds=0), NOW).demand == 300 * MiB


# -- the bounds ------------------------------------------------------------------------------


def test_never_below_the_floor():
    advice = advise(stretch(3 * DAY, 0, 20 * MiB), ROOMY, DEFAULT, NOW)
    assert widened(20 * MiB, coverage(3)) < DEFAULT.floor_bytes
    assert advice.recommended == DEFAULT.floor_bytes == 128 * MiB
    assert advice.reason.endswith("raised to the floor, 128 MiB")


def test_never_below_min_guarantee():
    advice = advise(stretch(3 * DAY, 0, 100 * MiB), Limits(2 * GiB, 4 * GiB, 1 * GiB), DEFAULT, NOW)
    assert advice.recommended == 1 * GiB
    assert advice.reclaimable == 1 * GiB
    assert advice.reason.endswith("raised to <min_guarantee>, 1024 MiB")


def test_never_above_memory():
    advice = advise(stretch(3 * DAY, 0, 1900 * MiB), Limits(2 * GiB, 2 * GiB, None), DEFAULT, NOW)
    assert advice.demand == 1900 * MiB
    assert advice.recommended == 2 * GiB and advice.reclaimable == 0
    assert advice.reason.endswith("capped at <memory>, 2048 MiB")


def test_memory_wins_over_a_floor_above_it():
    """A guest smaller than the floor is advised its full size: nothing to take back."""
    advice = advise(stretch(3 * DAY, 0, 20 * MiB), Limits(96 * MiB, 96 * MiB, None), DEFAULT, NOW)
    assert advice.recommended == 96 * MiB and advice.reclaimable == 0
    assert advice.reason.endswith("capped at <memory>, 96 MiB")


# -- time: half-life and window --------------------------------------------------------------


def _peak_at(age: float, days: float = 8) -> List[Point]:
    """300 MiB over ``days`` with one hour at 900 MiB ``age`` seconds ago."""
    return [dataclasses.replace(p, used_peak=900 * MiB) if age - HOUR <= NOW - p.start - STEP < age else p
            for p in stretch(days * DAY, 0, 300 * MiB)]


def test_an_old_peak_weighs_less_than_a_recent_one():
    assert advise(_peak_at(1 * DAY), ROOMY, DEFAULT, NOW).demand == 900 * MiB
    assert advise(_peak_at(6 * DAY), ROOMY, DEFAULT, NOW).demand == 300 * MiB
    # without decay the day 6 days ago is 1/8 of the weight, and p95 keeps it
    undecayed = Policy(half_life_seconds=1e12)
    assert advise(_peak_at(6 * DAY), ROOMY, undecayed, NOW).demand == 900 * MiB


def test_a_peak_older_than_the_window_is_ignored():
    undecayed = Policy(half_life_seconds=1e12)
    assert advise(_peak_at(7.5 * DAY, days=9), ROOMY, undecayed, NOW).demand == 900 * MiB
    ignored = advise(_peak_at(8.5 * DAY, days=9), ROOMY, undecayed, NOW)
    assert ignored.demand == 300 * MiB
    assert ignored.history_seconds == pytest.approx(8 * DAY)


def test_a_point_across_the_window_start_counts_by_its_part_inside():
    """A 2-day downsampled point, half of it older than the window: half its ok seconds, all of its peak."""
    undecayed = Policy(half_life_seconds=1e12)
    history = [Point(NOW - 9 * DAY, 2 * DAY, 2 * DAY, 900 * MiB, 2 * GiB)] + stretch(7 * DAY, 0, 300 * MiB)
    advice = advise(history, ROOMY, undecayed, NOW)
    assert advice.history_seconds == pytest.approx(8 * DAY)
    assert advice.demand == 900 * MiB
    assert "over 192.0 h of history (100 % complete)" in advice.reason


def test_a_point_across_intervals_lends_each_its_part():
    """A day-long downsampled point, 23 h of it in the interval 2 to 3 days back, beside an hour at 1200 MiB.

    Without decay each day is a fifth of the weight, so p95 keeps the 1200 MiB day: unless the long point
    were counted in the interval of its end only, which would leave that day one hour of weight (0.8 %).
    """
    undecayed = Policy(half_life_seconds=1e12)
    before = stretch(5 * DAY, 3 * DAY, 300 * MiB) + [Point(NOW - 3 * DAY, HOUR, HOUR, 1200 * MiB, 2 * GiB)]
    after = stretch(DAY + 23 * HOUR, 0, 300 * MiB)
    merged = advise(before + [Point(NOW - 2 * DAY - 23 * HOUR, DAY, DAY, 300 * MiB, 2 * GiB)] + after,
                    ROOMY, undecayed, NOW)
    raw = advise(before + stretch(2 * DAY + 23 * HOUR, DAY + 23 * HOUR, 300 * MiB) + after,
                 ROOMY, undecayed, NOW)
    assert merged.demand == raw.demand == 1200 * MiB
    assert merged.confidence == pytest.approx(raw.confidence)


def test_confidence_is_decayed_coverage_times_completeness():
    assert advise(stretch(1 * DAY, 0, GiB), ROOMY, DEFAULT, NOW).confidence == pytest.approx(coverage(1))
    assert coverage(1) == pytest.approx(0.502, abs=1e-3)
    assert advise(stretch(8 * DAY, 0, GiB), ROOMY, DEFAULT, NOW).confidence == pytest.approx(1.0)
    # the same day six days older weighs 2^-6 as much
    old = [dataclasses.replace(p, start=p.start - 6 * DAY) for p in stretch(1 * DAY, 0, GiB)]
    assert advise(old, ROOMY, DEFAULT, NOW).confidence == pytest.approx(coverage(1) / 64)


def test_a_history_that_ended_long_ago_still_weighs_its_youngest_day_most():
    """With a half-life of a minute, weights counted from now would all underflow (2^-1440 a day later).

    Then every interval would weigh 0 and p95 would pick the lowest peak;
    counted from the end of the history, its last day weighs the most.
    """
    policy = Policy(half_life_seconds=60.0, min_history_seconds=HOUR)
    history = stretch(3 * DAY, 2 * DAY, GiB) + stretch(2 * DAY, DAY, 2 * GiB)
    advice = advise(history, ROOMY, policy, NOW)
    assert advice.demand == 2 * GiB
    assert advice.confidence == 0.0, "a day without history is 1440 half-lives"


# -- values, helpers, validation -------------------------------------------------------------


def test_to_dict_has_the_issue_keys_but_domain_and_uuid():
    advice = advise(stretch(3 * DAY, 0, 100 * MiB), ROOMY, DEFAULT, NOW)
    document = advice.to_dict()
    assert list(document) == [
        "actual", "recommended", "reclaimable", "demand", "confidence", "history_seconds", "pressure_events",
        "reason",
    ]
    assert document["recommended"] == advice.recommended and document["reason"] == advice.reason


def test_host_total_sums_what_can_be_reclaimed():
    def advice(reclaimable: Optional[int]) -> Advice:
        recommended = None if reclaimable is None else GiB - reclaimable
        return Advice(GiB, recommended, reclaimable, None, 0.5, DAY, 0, "")

    assert host_total([advice(100 * MiB), advice(None), advice(0), advice(50 * MiB)]) == 150 * MiB
    assert host_total([]) == 0


def test_the_counters_are_cumulative_stats_of_the_table():
    assert {field: spec.qemu for field, spec in COUNTERS.items()} == {
        "swap_in": "stat-swap-in",
        "major_faults": "stat-major-faults",
        "oom_kills": "stat-oom-kills",
        "alloc_stalls": "stat-alloc-stalls",
        "direct_reclaims": "stat-direct-reclaims",
    }
    assert all(STATS_BY_QEMU_NAME[spec.qemu] is spec and spec.cumulative for spec in COUNTERS.values())


def test_deltas_are_increases_and_a_reset_or_an_unknown_is_zero():
    previous = {"stat-swap-in": 4096, "stat-major-faults": 10, "stat-oom-kills": 2, "stat-alloc-stalls": None,
                "stat-direct-reclaims": 8192, "stat-free-memory": 5}
    current = {"stat-swap-in": 12288, "stat-major-faults": 3, "stat-oom-kills": 3, "stat-alloc-stalls": 7,
               "stat-free-memory": 1}
    assert deltas(previous, current) == {
        "swap_in": 8192,  # grew
        "major_faults": 0,  # went down: a reboot or a reset
        "oom_kills": 1,
        "alloc_stalls": 0,  # unsupported before
        "direct_reclaims": 0,  # not reported now
    }
    assert deltas({}, current) == dict.fromkeys(COUNTERS, 0)
    assert Point(NOW, 5.0, 5.0, MiB, GiB, **deltas(previous, current)).swap_in == 8192


def test_merge_downsamples():
    points = [
        Point(0.0, 5.0, 5.0, 100, 1000, swap_in=1, major_faults=2),
        Point(5.0, 5.0, 0.0, None, None, oom_kills=1),
        Point(10.0, 5.0, 2.5, 300, 900, alloc_stalls=3, direct_reclaims=4),
        Point(15.0, 5.0, 5.0, 200, None, swap_in=10),
    ]
    assert merge(points) == Point(0.0, 20.0, 12.5, 300, 900, swap_in=11, major_faults=2, oom_kills=1,
                                  alloc_stalls=3, direct_reclaims=4)
    assert merge(points[1:2]) == points[1]
    assert merge(points).end == points[-1].end == 20.0


@pytest.mark.parametrize("points", [[], [Point(5.0, 5.0, 5.0, 1, 1), Point(0.0, 5.0, 5.0, 1, 1)]])
def test_merge_refuses_nothing_and_disorder(points):
    with pytest.raises(InvalidArgument):
        merge(points)


@pytest.mark.parametrize(
    "changes",
    [
        {"seconds": 0.0}, {"seconds": math.inf}, {"start": math.nan}, {"ok_seconds": 6.0},
        {"ok_seconds": -1.0}, {"ok_seconds": math.nan}, {"ok_seconds": 0.0}, {"used_peak": -1},
        {"actual": -1}, {"swap_in": -1}, {"major_faults": -1}, {"oom_kills": -5}, {"alloc_stalls": -1},
        {"direct_reclaims": -1},
    ],
)
def test_a_bad_point_is_refused(changes):
    fields = {"start": NOW, "seconds": 5.0, "ok_seconds": 5.0, "used_peak": MiB, "actual": GiB, **changes}
    with pytest.raises(InvalidArgument):
        Point(**fields)


@pytest.mark.parametrize(
    "changes",
    [
        {"percentile": 0.0}, {"percentile": 1.5}, {"half_life_seconds": 0.0}, {"window_seconds": -1.0},
        {"aggregation_seconds": 0.0}, {"margin_fraction": -0.1}, {"floor_bytes": -1},
        {"min_history_seconds": 9 * DAY}, {"burst_seconds": math.nan}, {"confidence_widening": math.inf},
    ],
)
def test_a_bad_policy_is_refused(changes):
    with pytest.raises(InvalidArgument):
        Policy(**changes)


def test_bad_limits_are_refused():
    with pytest.raises(InvalidArgument):
        Limits(actual=-1, maximum=GiB, min_guarantee=None)


# -- properties --------------------------------------------------------------------------------

#: Policies with a window short enough for drawn histories to fill, and every other knob that shapes demand.
policies = st.builds(
    Policy,
    percentile=st.sampled_from([0.5, 0.9, 0.95, 1.0]),
    half_life_seconds=st.sampled_from([6 * HOUR, 12 * HOUR, 1e12]),
    window_seconds=st.just(2 * DAY),
    min_history_seconds=st.just(HOUR),
    aggregation_seconds=st.sampled_from([HOUR, 6 * HOUR, DAY]),
    recent_seconds=st.sampled_from([0.0, HOUR]),
)
MAXIMUM = 8 * GiB


@st.composite
def points(draw: Any, count: int = 40) -> List[Point]:
    """Consecutive points ending at NOW: 5 min to 2 h long, whole, half, quarter or not ok, some pressed."""
    drawn = draw(st.lists(st.tuples(
        st.sampled_from([300.0, 1800.0, 3600.0, 7200.0]),
        st.sampled_from([1.0, 0.0, 0.25, 0.5, 1.0]),
        st.integers(0, 2 * GiB),
        st.one_of(st.none(), st.integers(0, MAXIMUM)),
        st.sampled_from([False, False, False, True]),
        st.lists(st.integers(0, 2**40), min_size=5, max_size=5),
    ), min_size=4, max_size=count))
    out: List[Point] = []
    start = NOW - sum(seconds for seconds, *_ in drawn)
    for seconds, ok, used, actual, pressed, counters in drawn:
        out.append(Point(start, seconds, ok * seconds, used if ok else None, actual,
                         **dict(zip(COUNTERS, counters if pressed else [0] * 5))))
        start += seconds
    return out


limits = st.builds(
    lambda maximum, actual, guarantee: Limits(actual * maximum // 100, maximum,
                                              None if guarantee is None else guarantee * maximum // 100),
    st.integers(256 * MiB, MAXIMUM), st.integers(0, 100), st.one_of(st.none(), st.integers(0, 100)),
)


@given(points(), limits, policies)
@counted
def test_recommended_stays_within_its_bounds(history, limits, policy):
    advice = advise(history, limits, policy, NOW)
    assert 0 <= advice.confidence <= 1
    assert advice.history_seconds <= policy.window_seconds
    if advice.recommended is None:
        assert advice.reclaimable is None and advice.demand is None
        assert advice.reason.startswith("insufficient history: ")
    else:
        assert max(policy.floor_bytes, limits.min_guarantee or 0) <= advice.recommended <= limits.maximum
        assert advice.reclaimable == max(0, limits.actual - advice.recommended) >= 0


@given(
    points(),
    limits,
    policies,
    st.lists(st.tuples(st.integers(0, 39), st.sampled_from(sorted(COUNTERS)), st.integers(1, 2**30)),
             min_size=1, max_size=5),
)
@example(  # pressure at 100 MiB beside a 1 GiB peak in the same interval: the interval keeps its peak
    history=[Point(NOW - 2 * HOUR, HOUR, HOUR, GiB, 2 * GiB),
             Point(NOW - HOUR, HOUR, HOUR, 100 * MiB, 2 * GiB)],
    limits=ROOMY,
    policy=Policy(window_seconds=2 * DAY, min_history_seconds=HOUR, aggregation_seconds=6 * HOUR,
                  recent_seconds=0),
    increases=[(1, "alloc_stalls", 1)],
)
@counted
def test_pressure_never_lowers_the_recommendation(history, limits, policy, increases):
    """More of any counter in some intervals: as many pressure events or more, never a lower advice."""
    pressed = list(history)
    for at, field, more in increases:
        at %= len(history)
        pressed[at] = dataclasses.replace(pressed[at], **{field: getattr(pressed[at], field) + more})
    before, after = advise(history, limits, policy, NOW), advise(pressed, limits, policy, NOW)
    assert after.pressure_events >= before.pressure_events
    assert (before.recommended is None) == (after.recommended is None)
    if before.recommended is not None:
        assert after.demand >= before.demand
        assert after.recommended >= before.recommended


@given(points(), limits, policies, st.data())
@counted
def test_more_use_never_lowers_the_recommendation(history, limits, policy, data):
    more = [
        p if p.used_peak is None
        else dataclasses.replace(p, used_peak=p.used_peak + data.draw(st.integers(0, 2 * GiB), label="more"))
        for p in history
    ]
    before, after = advise(history, limits, policy, NOW), advise(more, limits, policy, NOW)
    if before.recommended is not None:
        assert after.demand >= before.demand
        assert after.recommended >= before.recommended


@given(st.integers(1, 4), st.integers(1, 4))
@counted
def test_scaling_use_up_scales_demand_up(numerator, extra):
    """Every peak times (n + e) / n: the demand at least as much, whatever the history's shape."""
    history = _daily_peak(3)
    scaled = [dataclasses.replace(p, used_peak=p.used_peak * (numerator + extra) // numerator)
              for p in history]
    before, after = advise(history, ROOMY, DEFAULT, NOW), advise(scaled, ROOMY, DEFAULT, NOW)
    assert after.demand == 900 * MiB * (numerator + extra) // numerator > before.demand
    assert after.recommended >= before.recommended


@given(points(count=30), st.data())
@counted
def test_merge_is_associative(history, data):
    """Merged in any grouping, consecutive points give the same point (lengths are dyadic: exact sums)."""
    first, second = sorted(data.draw(st.lists(st.integers(0, len(history)), min_size=2, max_size=2)))
    groups = [g for g in (history[:first], history[first:second], history[second:]) if g]
    assert merge([merge(g) for g in groups]) == merge(history)
    if len(groups) == 3:
        a, b, c = groups
        a_b_then_c = merge([merge([merge(a), merge(b)]), merge(c)])
        assert a_b_then_c == merge([merge(a), merge([merge(b), merge(c)])])


def plain_scan(points: Sequence[Point], policy: Policy, now: float, reference: float) -> Any:
    """What ``_scan`` gathers, the plain way: one point at a time, defaultdicts, ``max()``, ``min()``.

    The weight of a stretch is the one ``_scan`` documents, from ``reference``.
    """
    window_start, recent_start = now - policy.window_seconds, now - policy.recent_seconds
    size, rate = policy.aggregation_seconds, math.log(2) / policy.half_life_seconds
    peaks: Any = collections.defaultdict(int)
    needs: Any = collections.defaultdict(int)
    weights: Any = collections.defaultdict(float)
    events: Any = collections.Counter()
    pressure_events, usable, covered, recent_peak = 0, 0.0, 0.0, 0
    inside = [p for p in points if p.start < now and p.end > window_start]
    youngest = min(now, max((p.end for p in inside if p.used_peak is not None), default=now))
    for point in inside:
        low, high = max(point.start, window_start), min(point.end, now)
        covered += high - low
        kinds = pressure_kinds(point, policy)
        needed = _needed(point, kinds, policy) if kinds else None
        pressure_events += bool(kinds)
        events.update(kinds)
        used = point.used_peak
        ok_fraction = point.ok_seconds / point.seconds
        if used is not None:
            usable += ok_fraction * (high - low)
            if high > recent_start:
                recent_peak = max(recent_peak, used)
        elif needed is None:
            continue
        number = (now - high) // size
        while high > low:
            part_low = max(low, now - (number + 1) * size)
            if part_low < high:
                if used is not None:
                    peaks[number] = max(peaks[number], used)
                    weights[number] += ok_fraction * (
                        math.exp(-rate * (reference - high)) * -math.expm1(-rate * (high - part_low)))
                if needed is not None:
                    needs[number] = max(needs[number], needed)
                high = part_low
            number += 1
    return (covered, usable, youngest, reference, recent_peak, pressure_events, events, peaks, needs, weights)


@st.composite
def scattered(draw: Any, count: int = 40) -> List[Point]:
    """Points in any order over the last 3 days and past NOW, 5 s to 2 days long, apart or overlapping.

    Half have no counter's increase; the others one, near the thresholds
    :data:`burst_policies` give or far above them.
    """
    out: List[Point] = []
    for _ in range(draw(st.integers(8, count))):
        seconds = draw(st.sampled_from([5.0, 60.0, STEP, HOUR, 4 * HOUR, DAY, 2 * DAY]))
        ok = draw(st.sampled_from([0.0, 0.25, 1.0]))
        counters = dict.fromkeys(COUNTERS, 0)
        if draw(st.booleans()):
            field = draw(st.sampled_from(sorted(COUNTERS)))
            counters[field] = draw(st.one_of(st.sampled_from(NEAR_THRESHOLDS), st.integers(1, 2**40)))
        out.append(Point(NOW - draw(st.integers(-2 * 3600, 3 * 86400)), seconds, ok * seconds,
                         draw(st.integers(0, 2 * GiB)) if ok else None,
                         draw(st.one_of(st.none(), st.integers(0, MAXIMUM))), **counters))
    return out


#: Burst rates, per second, for :data:`burst_policies`.
BURST_RATES = (0.5, 1.0, 256.0)

#: Counters at the burst thresholds those rates give over the lengths :func:`scattered` draws, and beside.
NEAR_THRESHOLDS = sorted({max(1, math.ceil(rate * seconds) + d) for rate in BURST_RATES
                          for seconds in (5.0, 60.0, STEP, 900.0) for d in (-1, 0, 1)})

#: Policies whose burst thresholds differ from one point to the next (bursts over up to 4 h).
burst_policies = st.builds(
    lambda policy, burst, swap_in, faults: dataclasses.replace(
        policy, burst_seconds=burst, swap_in_burst_bytes_per_second=swap_in,
        major_fault_burst_per_second=faults),
    policies, st.sampled_from([60.0, 900.0, 4 * HOUR]), st.sampled_from(BURST_RATES),
    st.sampled_from(BURST_RATES),
)


@settings(max_examples=300)
@given(st.one_of(scattered(), points()), burst_policies, st.randoms(use_true_random=False),
       st.sampled_from([0.0, 1800.0, 5 * HOUR]), st.sampled_from([0.0, 3 * HOUR]))
@example(  # bursts just at the shortest point's thresholds (1 MiB/s, 256 faults/s over 5 s)
    history=[Point(NOW - HOUR, 5.0, 5.0, GiB, None, swap_in=5 * MiB),
             Point(NOW - 2 * HOUR, STEP, STEP, GiB, None),
             Point(NOW - 3 * HOUR, 5.0, 5.0, GiB, None, major_faults=1280)],
    policy=DEFAULT, shuffler=random.Random(0), cut=0.0, older=0.0,
)
@counted
def test_one_pass_gathers_what_the_plain_loop_does(history, policy, shuffler, cut, older):
    """``_scan``'s locals, spelled-out ``max()`` and skipped pressure checks change no figure.

    Points come in any order, some twice, some past ``now``, some across
    the window's start and the intervals' boundaries; the weights match to
    the last bit, since each interval's are added up in the same order.
    """
    shuffled = history + shuffler.sample(history, len(history) // 4)
    shuffler.shuffle(shuffled)
    now = NOW - cut
    assert tuple(_scan(shuffled, policy, now, now - older)) == plain_scan(shuffled, policy, now, now - older)


#: Readings as GuestStats.values holds them: any of the table's stats, a uint64 figure or unsupported.
readings = st.dictionaries(
    st.sampled_from(sorted(STATS_BY_QEMU_NAME)), st.one_of(st.none(), st.integers(0, 2**64 - 1))
)


@given(readings, readings)
@counted
def test_deltas_are_never_negative(previous, current):
    increases = deltas(previous, current)
    assert set(increases) == set(COUNTERS)
    for field, spec in COUNTERS.items():
        before, after = previous.get(spec.qemu), current.get(spec.qemu)
        grew = before is not None and after is not None and after >= before
        assert increases[field] == (after - before if grew else 0) >= 0

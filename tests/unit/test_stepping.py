"""virt_balloon_stats.stepping: each rule of the balloon steps, over synthetic guests and feedback.

Pure: a :class:`Guest` view and a :class:`Memory` in, a :class:`Decision`
out. A guest that follows its steps is simulated by setting ``actual`` to
the last target; the counters and available memory are synthetic feedback.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_balloon_stats.advice import Policy
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.stepping import (
    Action,
    Decision,
    Guest,
    Memory,
    StepPolicy,
    decide,
    floor_of,
    memory_from_dict,
    memory_to_dict,
    plan,
)

MiB = 2**20
GiB = 1024 * MiB
NOW = 1_800_000_000.0
POLICY = StepPolicy()
QUIET = {"stat-swap-in": 0, "stat-major-faults": 100, "stat-oom-kills": 0, "stat-alloc-stalls": 0,
         "stat-direct-reclaims": 0}


def guest(actual: int = 1 * GiB, recommended: Optional[int] = 600 * MiB, **changes: object) -> Guest:
    base = Guest(uuid="u1", name="web1", fresh=True, paused=False, migrating=False, actual=actual,
                 ceiling=actual, recommended=recommended, confidence=0.9, total=actual - 40 * MiB,
                 available=actual // 2, counters=dict(QUIET))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def follow(g: Guest, decision: Decision, **changes: object) -> Guest:
    """The guest after its balloon reached the decision's target."""
    assert decision.target is not None
    return dataclasses.replace(g, actual=decision.target, **changes)  # type: ignore[arg-type]


# -- when nothing is done ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, says",
    [({"fresh": False}, "figures not fresh"), ({"paused": True}, "paused"),
     ({"migrating": True}, "a job runs"), ({"recommended": None}, "no advice yet")],
)
def test_a_guest_that_cannot_be_trusted_or_judged_is_left_alone(changes, says):
    d = decide(guest(**changes), Memory(), POLICY, NOW)
    assert d.action is Action.NONE and d.target is None and d.reason.startswith(says)
    assert d.memory == Memory()


def test_low_confidence_shrinks_nothing_but_may_grow():
    assert decide(guest(confidence=0.49), Memory(), POLICY, NOW).action is Action.NONE
    grow = decide(guest(actual=500 * MiB, recommended=600 * MiB, ceiling=1 * GiB, confidence=0.1), Memory(),
                  POLICY, NOW)
    assert grow.action is Action.GROW


# -- bounded steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "actual, step",
    [(8 * GiB, 128 * MiB), (2 * GiB, 102 * MiB), (1 * GiB, 51 * MiB), (384 * MiB, 19 * MiB)],
)
def test_a_step_is_5_percent_or_128_mib_whichever_is_smaller_in_whole_mib(actual, step):
    d = decide(guest(actual=actual, recommended=128 * MiB), Memory(), POLICY, NOW)
    assert d.action is Action.SHRINK and actual - d.target == step
    assert d.memory.last is not None and d.memory.last.before == actual and not d.memory.settled


def test_an_idle_guest_is_shrunk_step_by_step_to_its_recommendation_and_no_further():
    g, memory, now, targets = guest(), Memory(), NOW, []
    for _ in range(40):
        d = decide(g, memory, POLICY, now)
        if d.action is Action.NONE:
            break
        targets.append(d.target)
        g, memory, now = follow(g, d), d.memory, now + 10
    assert d.reason == "at its goal, 600 MiB"
    assert targets[-1] == 600 * MiB and targets == sorted(targets, reverse=True)
    steps = [a - b for a, b in zip([1 * GiB] + targets, targets)]
    assert all(0 < s <= 0.05 * a for s, a in zip(steps, [1 * GiB] + targets))


def test_never_below_the_floor_nor_above_the_ceiling():
    low = decide(guest(actual=140 * MiB, recommended=50 * MiB), Memory(), POLICY, NOW)
    assert low.target == 133 * MiB  # a 7 MiB step...
    lower = decide(guest(actual=133 * MiB, recommended=50 * MiB), low.memory, POLICY, NOW + 10)
    assert lower.target == POLICY.floor_bytes and "the floor" in lower.reason  # ...then to the floor
    floor = decide(guest(actual=128 * MiB, recommended=50 * MiB), lower.memory, POLICY, NOW + 20)
    assert floor.action is Action.NONE
    under = decide(guest(actual=100 * MiB, recommended=50 * MiB, ceiling=90 * MiB), Memory(), POLICY, NOW)
    assert under.action is Action.NONE, "a guest under the floor is never shrunk, whatever its ceiling"
    high = decide(guest(actual=900 * MiB, recommended=2 * GiB, ceiling=1 * GiB), Memory(), POLICY, NOW)
    assert high.action is Action.GROW and high.target == 900 * MiB + 45 * MiB
    at_ceiling = decide(guest(actual=1 * GiB, recommended=2 * GiB), Memory(), POLICY, NOW)
    assert at_ceiling.action is Action.NONE


# -- settling -----------------------------------------------------------------------------------------


def test_the_next_step_waits_until_the_last_one_settled_or_timed_out():
    g = guest()
    first = decide(g, Memory(), POLICY, NOW)
    waiting = decide(g, first.memory, POLICY, NOW + 10)  # actual has not moved yet
    assert waiting.action is Action.NONE and waiting.reason.startswith("settling")
    moved = decide(follow(g, first), first.memory, POLICY, NOW + 10)
    assert moved.action is Action.SHRINK
    stuck = decide(g, first.memory, POLICY, NOW + POLICY.settle_seconds + 1)
    assert stuck.action is Action.NONE and stuck.reason.startswith("did not reach")
    assert stuck.memory.hold_until == NOW + POLICY.settle_seconds + 1 + POLICY.cooldown_seconds
    assert decide(g, stuck.memory, POLICY, NOW + 600).reason.startswith("held for")


# -- pressure feedback -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "feedback, kind",
    [
        ({"counters": {**QUIET, "stat-swap-in": 20 * MiB}}, "swap-in burst"),
        ({"counters": {**QUIET, "stat-major-faults": 100 + 256 * 10}}, "major-fault burst"),
        ({"counters": {**QUIET, "stat-oom-kills": 1}}, "OOM kill"),
        ({"counters": {**QUIET, "stat-alloc-stalls": 3}}, "allocation stall"),
        ({"counters": {**QUIET, "stat-direct-reclaims": 4096}}, "direct reclaim"),
        ({"available": 20 * MiB}, "available 20 MiB under 5 %"),
    ],
)
def test_a_guest_that_thrashes_after_a_shrink_gets_the_step_back_at_once(feedback, kind):
    g = guest()
    shrink = decide(g, Memory(), POLICY, NOW)
    back = decide(follow(g, shrink, **feedback), shrink.memory, POLICY, NOW + 10)
    assert back.action is Action.RETURN and back.target == 1 * GiB, back.reason
    assert kind in back.reason
    assert back.memory.raised_floor == (1 * GiB, NOW + 10)
    assert back.memory.hold_until == NOW + 10 + POLICY.cooldown_seconds
    # Held through the cooldown, then never below the raised floor, which decays over days.
    settled = follow(g, shrink, **feedback)
    settled = dataclasses.replace(settled, actual=1 * GiB, counters=dict(settled.counters))
    assert decide(settled, back.memory, POLICY, NOW + 600).reason.startswith("held for")
    after = NOW + 10 + POLICY.cooldown_seconds
    later = decide(settled, back.memory, POLICY, after)
    assert later.action is Action.SHRINK and later.target == floor_of(back.memory, POLICY, after)
    assert 1 * GiB - later.target < 5 * MiB, "half an hour decays the raised floor by under 5 MiB"
    assert floor_of(back.memory, POLICY, NOW + 10) == 1 * GiB
    decayed = floor_of(back.memory, POLICY, NOW + 10 + POLICY.floor_half_life_seconds)
    assert decayed == POLICY.floor_bytes + (1 * GiB - POLICY.floor_bytes) // 2


def test_pressure_that_goes_on_grows_the_guest_through_the_hold_up_to_its_ceiling():
    """A hold stops shrinks, never a guest short of memory: each settled step under pressure grows it."""
    g = guest(actual=1 * GiB)
    shrink = decide(g, Memory(), POLICY, NOW)
    g = follow(g, shrink, available=10 * MiB)
    back = decide(g, shrink.memory, POLICY, NOW + 10)
    assert back.action is Action.RETURN and back.target == 1 * GiB
    # Still short once back at its ceiling: nothing above it.
    at_top = decide(follow(g, back), back.memory, POLICY, NOW + 20)
    assert at_top.action is Action.NONE and at_top.reason.startswith("held for")
    assert at_top.memory.settled, "a step found settled stays so, whatever else is decided"
    # A guest shrunk over several runs and short again after a return grows on, inside the hold.
    low = guest(actual=600 * MiB, ceiling=1 * GiB, available=10 * MiB, total=590 * MiB)
    grow = decide(low, at_top.memory, POLICY, NOW + 30)
    short = math.ceil(0.05 * 590 * MiB) - 10 * MiB
    assert grow.action is Action.GROW and NOW + 30 < back.memory.hold_until
    assert grow.target == 600 * MiB + 30 * MiB + math.ceil(short / MiB) * MiB, grow.reason
    assert grow.memory.raised_floor == (grow.target, NOW + 30)
    assert "pressure goes on (available 10 MiB under 5 %)" in grow.reason


def test_a_deep_shortage_returns_more_than_the_last_step():
    g = guest(actual=1 * GiB, ceiling=2 * GiB)
    shrink = decide(g, Memory(), POLICY, NOW)
    starved = follow(g, shrink, available=0, total=shrink.target)
    back = decide(starved, shrink.memory, POLICY, NOW + 10)
    assert back.action is Action.RETURN and back.target is not None
    assert back.target >= starved.actual + math.ceil(0.05 * starved.total / MiB) * MiB
    assert back.target > 1 * GiB, "the last step alone would leave it short"


def test_counters_are_judged_within_a_cooldown_of_the_step_only():
    """Over a week a healthy guest's faults add up to a 'burst': later pressure is the advice's to see."""
    g = guest()
    shrink = decide(g, Memory(), POLICY, NOW)
    later = NOW + POLICY.cooldown_seconds + 1
    faults = follow(g, shrink, counters={**QUIET, "stat-major-faults": 10**6})
    assert decide(faults, shrink.memory, POLICY, later).action is Action.SHRINK
    low = follow(g, shrink, available=1 * MiB)
    assert decide(low, shrink.memory, POLICY, later).action is Action.RETURN


def test_the_ceiling_of_the_first_step_is_remembered():
    g = guest(actual=1 * GiB)
    first = decide(g, Memory(), POLICY, NOW)
    assert first.memory.ceiling == 1 * GiB
    second = decide(follow(g, first, ceiling=900 * MiB), first.memory, POLICY, NOW + 10)
    assert second.memory.ceiling == 1 * GiB, "the apply layer reads it back as the guest's ceiling"


def test_quiet_counters_and_unsupported_ones_are_no_pressure():
    g = guest(counters={**QUIET, "stat-oom-kills": None})
    shrink = decide(g, Memory(), POLICY, NOW)
    quiet = follow(g, shrink, counters={**QUIET, "stat-major-faults": 150, "stat-oom-kills": None})
    assert decide(quiet, shrink.memory, POLICY, NOW + 10).action is Action.SHRINK


def test_a_counter_that_went_back_is_no_pressure():
    """A reboot resets the counters: not a burst (as the advice counts them)."""
    g = guest(counters={**QUIET, "stat-swap-in": 50 * MiB})
    shrink = decide(g, Memory(), POLICY, NOW)
    rebooted = follow(g, shrink, counters=dict(QUIET))
    assert decide(rebooted, shrink.memory, POLICY, NOW + 10).action is Action.SHRINK


# -- no flapping -----------------------------------------------------------------------------------------


def test_at_most_one_change_of_direction_per_cooldown():
    g = guest()
    shrink = decide(g, Memory(), POLICY, NOW)
    g = follow(g, shrink)
    # The advice rose: grow back (the one turn)...
    grow = decide(dataclasses.replace(g, recommended=1 * GiB), shrink.memory, POLICY, NOW + 10)
    assert grow.action is Action.GROW and grow.memory.turned_at == NOW + 10
    g = follow(g, grow)
    # ...and it fell again at once: no second turn inside the cooldown.
    again = decide(dataclasses.replace(g, recommended=600 * MiB), grow.memory, POLICY, NOW + 20)
    assert again.action is Action.NONE and again.reason.startswith("turned once")
    after = decide(dataclasses.replace(g, recommended=600 * MiB), grow.memory, POLICY,
                   NOW + 10 + POLICY.cooldown_seconds)
    assert after.action is Action.SHRINK


# -- the host's budget ---------------------------------------------------------------------------------


def guests() -> List[Guest]:
    return [
        guest(uuid="a", name="a", actual=2 * GiB, recommended=1 * GiB),  # 1 GiB over
        guest(uuid="b", name="b", actual=4 * GiB, recommended=1 * GiB),  # 3 GiB over: first
        guest(uuid="c", name="c", actual=512 * MiB, recommended=800 * MiB, ceiling=1 * GiB),  # under
    ]


def test_without_a_host_target_every_guest_steps_toward_its_recommendation():
    by = {d.uuid: d for d in plan(guests(), {}, POLICY, NOW)}
    assert [by[u].action for u in "abc"] == [Action.SHRINK, Action.SHRINK, Action.GROW]


def test_a_host_short_of_memory_shrinks_the_most_over_provisioned_first_and_grows_none():
    decisions = plan(guests(), {}, POLICY, NOW, host_available=1 * GiB,
                     target_host_available=1 * GiB + 100 * MiB)
    by = {d.uuid: d for d in decisions}
    assert [d.uuid for d in decisions] == ["a", "b", "c"], "in the order given"
    assert by["b"].action is Action.SHRINK and by["b"].target == 4 * GiB - 128 * MiB
    assert by["a"].action is Action.NONE, "b's step covers the 100 MiB short"
    assert by["c"].action is Action.NONE and "short of memory" in by["c"].reason


def test_a_host_with_memory_to_spare_lets_guests_grow_back_and_shrinks_none():
    decisions = plan(guests(), {}, POLICY, NOW, host_available=8 * GiB, target_host_available=1 * GiB)
    by = {d.uuid: d for d in decisions}
    assert by["c"].action is Action.GROW
    assert by["a"].action is by["b"].action is Action.NONE


def test_max_total_bounds_what_a_run_takes():
    by = {d.uuid: d for d in plan(guests(), {}, POLICY, NOW, max_total=150 * MiB)}
    assert by["b"].target == 4 * GiB - 128 * MiB
    assert by["a"].target == 2 * GiB - 22 * MiB and "cut to 22 MiB by --max-total" in by["a"].reason
    assert by["a"].memory.last is not None and by["a"].memory.last.target == by["a"].target
    done = {d.uuid: d for d in plan(guests(), {}, POLICY, NOW, max_total=150 * MiB, taken=150 * MiB)}
    assert done["a"].action is done["b"].action is Action.NONE
    assert done["c"].action is Action.GROW


def test_a_host_target_needs_the_hosts_figure():
    with pytest.raises(InvalidArgument):
        plan(guests(), {}, POLICY, NOW, target_host_available=GiB)


@pytest.mark.parametrize(
    "changes",
    [{"step_fraction": 0}, {"step_fraction": 1.5}, {"step_max_bytes": 0}, {"min_confidence": 2},
     {"cooldown_seconds": -1}, {"settle_seconds": float("nan")}, {"floor_half_life_seconds": 0}],
)
def test_a_bad_policy_is_refused(changes):
    with pytest.raises(InvalidArgument):
        StepPolicy(**changes)


# -- properties -----------------------------------------------------------------------------------------


sizes = st.integers(min_value=64 * MiB, max_value=64 * GiB)


@settings(max_examples=300, deadline=None)
@given(actual=sizes, ceiling=sizes, recommended=st.one_of(st.none(), sizes),
       confidence=st.floats(0, 1), raised=st.one_of(st.none(), sizes), age=st.floats(0, 30 * 86400))
def test_a_step_stays_within_its_bounds(actual, ceiling, recommended, confidence, raised, age):
    g = guest(actual=actual, ceiling=ceiling, recommended=recommended, confidence=confidence)
    memory = Memory(raised_floor=None if raised is None else (raised, NOW - age))
    d = decide(g, memory, POLICY, NOW, Policy())
    if d.action is Action.NONE:
        assert d.target is None
        return
    assert d.target is not None
    room = min(0.05 * actual, 128 * MiB)
    assert 0 < abs(d.target - actual) <= max(room, MiB)
    if d.action is Action.SHRINK:
        assert d.target >= floor_of(memory, POLICY, NOW) and d.target < actual and confidence >= 0.5
    else:
        assert d.action is Action.GROW and actual < d.target <= ceiling
    assert d.size == d.target - actual


# -- the memory kept between runs ---------------------------------------------------------------------


def test_memory_round_trips_through_json():
    g = guest(counters={**QUIET, "stat-oom-kills": None})
    shrink = decide(g, Memory(), POLICY, NOW)
    back = decide(follow(g, shrink, counters={**QUIET, "stat-oom-kills": None, "stat-swap-in": 99 * MiB}),
                  shrink.memory, POLICY, NOW + 10)
    for memory in (Memory(), shrink.memory, back.memory):
        assert memory_from_dict(json.loads(json.dumps(memory_to_dict(memory)))) == memory
    assert back.memory.raised_floor is not None and back.memory.last is not None


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("settled"),
        lambda d: d.update(settled="yes"),
        lambda d: d.update(hold_until=float("nan")),
        lambda d: d.update(raised_floor=[1, 2, 3]),
        lambda d: d.update(raised_floor=[-1, 2.0]),
        lambda d: d["last"].update(action="explode"),
        lambda d: d["last"].update(target=True),
        lambda d: d["last"].update(counters=[1]),
        lambda d: d.update(last="x"),
        lambda d: d.update(ceiling=-5),
        lambda d: d.pop("ceiling"),
    ],
)
def test_a_damaged_record_is_refused_not_half_read(damage):
    g = guest()
    shrink = decide(g, Memory(), POLICY, NOW)
    back = decide(follow(g, shrink, counters={**QUIET, "stat-oom-kills": 1}), shrink.memory, POLICY, NOW + 10)
    data = memory_to_dict(back.memory)
    damage(data)
    with pytest.raises(InvalidArgument) as caught:
        memory_from_dict(data)
    assert str(caught.value).startswith("not a balloon step record: ")

"""Acting on reclaim advice: the next balloon step of each guest, decided from figures alone.

Figures in, decisions out: no I/O, no clock, no libvirt. The ``balloon``
mode (and ``advise --apply``, one step) gives :func:`decide` each guest's
:class:`Guest` view (its status, balloon size, advice, counters), the
guest's :class:`Memory` of earlier steps, and the time; it gets a
:class:`Decision` (what to ask ``setMemoryFlags`` for, and why) and the
memory to keep. :func:`plan` does it for a host, within a budget.

The rules, each there because a balloon tool in the field went without it:

1. **Only on fresh figures** (status ``ok``), never on a paused or migrating
   domain, and never while the last step has not settled (``actual`` has not
   reached its target) unless it timed out, which holds the guest.
2. **Bounded steps**: at most 5 % of the current size or 128 MiB, whichever
   is smaller, toward the recommended size; never below the floor (the
   advice's 128 MiB, or one raised by pressure), never above the size the
   guest had when stepping began (or ``--max``).
3. **Pressure returns the last shrink at once.** After a shrink, a swap-in
   or major-fault burst, any OOM kill, allocation stall or direct reclaim,
   or available memory under 5 % of the total gives the last step back in
   one step (more if available memory is that much short of its floor),
   raises the guest's floor to the new size (the raise decays with a
   half-life of 3 days), and holds the guest for the cooldown: no shrink in
   it. Pressure that goes on after a return or a grow grows the guest again
   by a step each time it has settled, up to its ceiling, whatever the hold,
   the host budget or the last change of direction: a hold is there to stop
   shrinking, never to keep a guest short.
4. **No flapping**: at most one change of direction per cooldown.
5. **Confidence**: no shrink below the advice's ``--min-confidence``
   (0.5: one full day of history, as the advice counts it).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from virt_balloon_stats.advice import MiB, Point, Policy, deltas, pressure_kinds
from virt_balloon_stats.errors import InvalidArgument

__all__ = [
    "Action", "StepPolicy", "Guest", "Step", "Memory", "Decision", "floor_of", "decide", "plan",
    "memory_to_dict", "memory_from_dict",
]


class Action(str, enum.Enum):
    """What a decision does to a guest."""

    SHRINK = "shrink"
    GROW = "grow"
    RETURN = "return"  # give the last shrink back, after pressure
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """The stepping knobs; the README says why each default was chosen.

    :ivar step_fraction: A step moves at most this share of the current size...
    :ivar step_max_bytes: ...and at most this much.
    :ivar min_confidence: No shrink on advice less confident than this.
    :ivar cooldown_seconds: Hold after pressure; at most one change of direction in it.
    :ivar settle_seconds: How long a step may take to reach its target.
    :ivar settle_tolerance_bytes: How close ``actual`` must come to the target.
    :ivar available_floor_fraction: Available memory under this share of the
        total is pressure.
    :ivar floor_half_life_seconds: A floor raised by pressure decays back
        toward the advice's floor with this half-life.
    :ivar floor_bytes: Never below this (the advice's floor).
    """

    step_fraction: float = 0.05
    step_max_bytes: int = 128 * MiB
    min_confidence: float = 0.5
    cooldown_seconds: float = 1800.0
    settle_seconds: float = 120.0
    settle_tolerance_bytes: int = 2 * MiB
    available_floor_fraction: float = 0.05
    floor_half_life_seconds: float = 3 * 86400.0
    floor_bytes: int = Policy().floor_bytes

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"the stepping policy's {field.name} must be 0 or more, not {value!r}")
        if not 0 < self.step_fraction <= 1 or self.step_max_bytes <= 0:
            raise InvalidArgument(
                "a step must be able to move: give a step fraction in (0, 1] and a size over 0"
            )
        if self.min_confidence > 1 or self.available_floor_fraction >= 1 or self.floor_half_life_seconds == 0:
            raise InvalidArgument(
                "min confidence and the available floor are fractions, and the half-life is over 0"
            )


@dataclasses.dataclass(frozen=True)
class Guest:
    """One guest as the stepper sees it, read just now.

    :ivar uuid: Its UUID (the memory's key).
    :ivar name: Its name, for the reason and the log.
    :ivar fresh: Whether its figures' status is ``ok``.
    :ivar paused: Whether libvirt says it is paused.
    :ivar migrating: Whether a job (a migration) runs on it.
    :ivar actual: Bytes: the balloon size now.
    :ivar ceiling: Bytes: never above this (its size when stepping began, or ``--max``).
    :ivar recommended: Bytes the advice recommends; ``None`` without enough history.
    :ivar confidence: The advice's confidence.
    :ivar total: Bytes, ``stat-total-memory``; ``None`` if unknown.
    :ivar available: Bytes, ``stat-available-memory``; ``None`` if unknown.
    :ivar counters: The cumulative stats of :data:`~virt_balloon_stats.advice.COUNTERS`,
        by QEMU name (``None``: unsupported).
    """

    uuid: str
    name: str
    fresh: bool
    paused: bool
    migrating: bool
    actual: int
    ceiling: int
    recommended: Optional[int]
    confidence: float
    total: Optional[int] = None
    available: Optional[int] = None
    counters: Mapping[str, Optional[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Step:
    """A ``setMemory`` the stepper asked for.

    :ivar at: Epoch seconds it was asked.
    :ivar action: What it was.
    :ivar before: Bytes, the balloon size before it.
    :ivar target: Bytes asked for.
    :ivar counters: The guest's counters when it was asked, for the feedback.
    """

    at: float
    action: Action
    before: int
    target: int
    counters: Mapping[str, Optional[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Memory:
    """What the stepper remembers of a guest between steps (kept in the history file).

    :ivar last: The last step asked, if any.
    :ivar settled: Whether ``actual`` reached the last step's target.
    :ivar raised_floor: Bytes: the floor pressure raised, and when (decaying).
    :ivar hold_until: Epoch seconds before which the guest is left as it is.
    :ivar turned_at: Epoch seconds of the last change of direction.
    :ivar ceiling: Bytes: the guest's ceiling when its first step was made
        (its balloon size then, or ``--max``). Kept so that a guest shrunk by
        earlier runs can grow back to where it was, not to where it is.
    """

    last: Optional[Step] = None
    settled: bool = True
    raised_floor: Optional[Tuple[int, float]] = None
    hold_until: float = 0.0
    turned_at: Optional[float] = None
    ceiling: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with one guest now, why, and what to remember.

    :ivar uuid: The guest's UUID.
    :ivar name: Its name.
    :ivar action: :attr:`Action.NONE` leaves it as it is.
    :ivar target: Bytes to ask ``setMemoryFlags`` for; ``None`` with no action.
    :ivar reason: One line for the log.
    :ivar memory: The guest's memory after this decision (with the step, if one is made).
    :ivar pressed: Whether pressure made it (a return, or a grow under pressure).
    """

    uuid: str
    name: str
    action: Action
    target: Optional[int]
    reason: str
    memory: Memory
    pressed: bool = False

    @property
    def size(self) -> int:
        """Bytes the step moves: positive for a grow or a return, negative for a shrink, 0 for none."""
        if self.target is None or self.memory.last is None:
            return 0
        return self.target - self.memory.last.before


def _mib(value: float) -> str:
    return f"{value / MiB:.0f} MiB"


def floor_of(memory: Memory, policy: StepPolicy, now: float) -> int:
    """The guest's floor now: the policy's, or a floor raised by pressure as it decays back to it."""
    if memory.raised_floor is None:
        return policy.floor_bytes
    raised, at = memory.raised_floor
    decay = math.pow(0.5, max(0.0, now - at) / policy.floor_half_life_seconds)
    return max(policy.floor_bytes, policy.floor_bytes + math.ceil((raised - policy.floor_bytes) * decay))


def _short(guest: Guest, policy: StepPolicy) -> int:
    """Bytes available memory is short of its floor (0 when it is not, or unknown)."""
    if guest.available is None or guest.total is None:
        return 0
    return max(0, math.ceil(policy.available_floor_fraction * guest.total) - guest.available)


def _pressure(guest: Guest, step: Step, now: float, advice: Policy, policy: StepPolicy) -> List[str]:
    """The signs of pressure since ``step``: the advice's, over the counters' increases, and low available.

    The counters are judged only within a cooldown of the step: over longer,
    a healthy guest's faults add up to a "burst", and pressure long after a
    step is the advice's to see, from the history.
    """
    kinds: List[str] = []
    if now - step.at < policy.cooldown_seconds:
        since = Point(start=step.at, seconds=max(1.0, now - step.at), ok_seconds=0.0, used_peak=None,
                      actual=None, **deltas(step.counters, guest.counters))
        kinds = pressure_kinds(since, advice)
    if _short(guest, policy):
        assert guest.available is not None
        kinds.append(f"available {_mib(guest.available)} under {policy.available_floor_fraction * 100:g} %")
    return kinds


def decide(guest: Guest, memory: Memory, policy: StepPolicy, now: float,
           advice: Optional[Policy] = None, *, shrink: bool = True, grow: bool = True) -> Decision:
    """The next step for one guest; see the module's docstring for the rules.

    :param advice: The advice's policy, for its burst thresholds (default: its defaults).
    :param shrink: Whether shrinking is allowed now (the host budget may forbid it)...
    :param grow: ...and growing.
    """
    advice = advice or Policy()

    def none(reason: str, kept: Optional[Memory] = None) -> Decision:
        # The memory as it stands when the decision is made: settled, if this call found it so.
        return Decision(guest.uuid, guest.name, Action.NONE, None, reason, kept or memory)

    def step(action: Action, target: int, reason: str, pressed: bool = False) -> Decision:
        last = memory.last
        turned = memory.turned_at
        if last is not None and (last.action is Action.SHRINK) != (action is Action.SHRINK):
            turned = now  # a change of direction: a grow or a return after a shrink, or the other way
        kept = dataclasses.replace(
            memory, last=Step(now, action, guest.actual, target, dict(guest.counters)), settled=False,
            turned_at=turned, ceiling=guest.ceiling if memory.ceiling is None else memory.ceiling,
        )
        if pressed:
            hold = now + policy.cooldown_seconds
            kept = dataclasses.replace(kept, raised_floor=(target, now), hold_until=hold)
        return Decision(guest.uuid, guest.name, action, target, reason, kept, pressed)

    if not guest.fresh:
        return none("figures not fresh: left alone")
    if guest.paused:
        return none("paused: left alone")
    if guest.migrating:
        return none("a job runs on it (migration): left alone")

    last = memory.last
    if last is not None and not memory.settled:
        if abs(guest.actual - last.target) <= policy.settle_tolerance_bytes:
            memory = dataclasses.replace(memory, settled=True)
        elif now - last.at < policy.settle_seconds:
            return none(f"settling: {_mib(guest.actual)} on the way to {_mib(last.target)}")
        else:
            held = dataclasses.replace(memory, settled=True, hold_until=now + policy.cooldown_seconds)
            return none(f"did not reach {_mib(last.target)} within {policy.settle_seconds:g} s "
                        f"(at {_mib(guest.actual)}): held for {policy.cooldown_seconds:g} s", held)

    room = min(policy.step_fraction * guest.actual, policy.step_max_bytes)
    size = max(MiB, math.floor(room / MiB) * MiB)
    if last is not None:
        kinds = _pressure(guest, last, now, advice, policy)
        # Beyond a step, what available memory lacks, in whole MiB: one step must end the shortage.
        need = guest.actual + size + math.ceil(_short(guest, policy) / MiB) * MiB
        holding = f"floor raised to it, held for {policy.cooldown_seconds:g} s"
        if kinds and last.action is Action.SHRINK:
            target = min(max(last.before, need), max(last.before, guest.ceiling))
            return step(Action.RETURN, target,
                        f"pressure after the shrink to {_mib(last.target)} ({', '.join(kinds)}): back to "
                        f"{_mib(target)}, {holding}", pressed=True)
        if kinds and guest.actual < guest.ceiling - policy.settle_tolerance_bytes:
            target = min(need, guest.ceiling)
            return step(Action.GROW, target,
                        f"pressure goes on ({', '.join(kinds)}): grow to {_mib(target)}, {holding}",
                        pressed=True)

    if now < memory.hold_until:
        return none(f"held for {memory.hold_until - now:.0f} s more")
    if guest.recommended is None:
        return none("no advice yet (insufficient history)")

    floor = floor_of(memory, policy, now)
    goal = min(max(guest.recommended, floor), guest.ceiling)
    turned_recently = memory.turned_at is not None and now - memory.turned_at < policy.cooldown_seconds
    if goal < guest.actual - policy.settle_tolerance_bytes:
        if not shrink:
            return none("the host has memory to spare: no shrink")
        if guest.confidence < policy.min_confidence:
            return none(f"confidence {guest.confidence:.2f} under {policy.min_confidence:g}: no shrink")
        if last is not None and last.action is not Action.SHRINK and turned_recently:
            return none("turned once in this cooldown already: no shrink")
        target = max(goal, guest.actual - size, floor)  # the floor wins over a ceiling below it
        if target >= guest.actual - policy.settle_tolerance_bytes:
            return none(f"at its floor, {_mib(floor)}")
        bound = "the floor" if target == floor and floor > guest.recommended else "recommended"
        return step(Action.SHRINK, target,
                    f"shrink toward {bound} {_mib(goal)} by {_mib(guest.actual - target)}")
    if goal > guest.actual + policy.settle_tolerance_bytes:
        if not grow:
            return none("the host is short of memory: no grow")
        if last is not None and last.action is Action.SHRINK and turned_recently:
            return none("turned once in this cooldown already: no grow")
        target = min(goal, guest.actual + size)
        return step(Action.GROW, target, f"grow toward {_mib(goal)} by {_mib(target - guest.actual)}")
    return none(f"at its goal, {_mib(goal)}")


def plan(guests: Sequence[Guest], memories: Mapping[str, Memory], policy: StepPolicy, now: float, *,
         host_available: Optional[int] = None, target_host_available: Optional[int] = None,
         max_total: Optional[int] = None, taken: int = 0, advice: Optional[Policy] = None) -> List[Decision]:
    """Every guest's decision on one host, within its budget.

    Without ``target_host_available``, guests step toward their recommended
    size, both ways. With it, a host with at least that much available lets
    guests grow back and shrinks none; a host with less shrinks the most
    over-provisioned guests first (balloon size above recommended, largest
    first), until their steps cover the shortfall, and grows none. Returns
    after pressure always go ahead. ``max_total`` bounds what a run takes
    (``taken`` is what it took so far): a shrink that would pass it is cut
    to what is left, or not made.
    """
    short: Optional[int] = None
    if target_host_available is not None:
        if host_available is None:
            raise InvalidArgument("a host target needs the host's available memory")
        short = max(0, target_host_available - host_available)

    def over(guest: Guest) -> int:
        return guest.actual - (guest.recommended if guest.recommended is not None else guest.actual)

    decisions: Dict[str, Decision] = {}
    freed = 0
    for guest in sorted(guests, key=over, reverse=True):
        memory = memories.get(guest.uuid, Memory())
        decision = decide(guest, memory, policy, now, advice,
                          shrink=short is None or freed < short, grow=short is None or short == 0)
        if decision.action is Action.SHRINK and decision.target is not None:
            left = None if max_total is None else max_total - taken
            if left is not None and guest.actual - decision.target > left:
                decision = _cut(decision, guest, memory, left)
            moved = guest.actual - decision.target if decision.target is not None else 0
            taken += moved
            freed += moved
        decisions[guest.uuid] = decision
    return [decisions[g.uuid] for g in guests]


def _cut(decision: Decision, guest: Guest, memory: Memory, left: int) -> Decision:
    """A shrink cut to the whole MiB ``--max-total`` leaves, or none when less than one is left."""
    whole = math.floor(max(0, left) / MiB) * MiB
    if whole <= 0:
        return Decision(guest.uuid, guest.name, Action.NONE, None, "--max-total reached: no shrink", memory)
    target = guest.actual - whole
    assert decision.memory.last is not None
    last = dataclasses.replace(decision.memory.last, target=target)
    return dataclasses.replace(
        decision, target=target, memory=dataclasses.replace(decision.memory, last=last),
        reason=f"{decision.reason}; cut to {_mib(whole)} by --max-total",
    )


def memory_to_dict(memory: Memory) -> Dict[str, Any]:
    """A guest's memory as JSON-ready data, to keep between runs (the history file holds it)."""
    return {
        "last": None if memory.last is None else {
            "at": memory.last.at, "action": memory.last.action.value, "before": memory.last.before,
            "target": memory.last.target, "counters": dict(memory.last.counters),
        },
        "settled": memory.settled,
        "raised_floor": None if memory.raised_floor is None else list(memory.raised_floor),
        "hold_until": memory.hold_until,
        "turned_at": memory.turned_at,
        "ceiling": memory.ceiling,
    }


def memory_from_dict(data: Any) -> Memory:
    """The memory :func:`memory_to_dict` made, read back; anything else is refused.

    A restarted ``balloon`` resumes from it, so a damaged record must not be
    half understood: it would undo or repeat a step.

    :raise InvalidArgument: When ``data`` is not such a record.
    """
    try:
        last = data["last"]
        step = None if last is None else Step(
            at=_time(last["at"]), action=Action(last["action"]), before=_size(last["before"]),
            target=_size(last["target"]),
            counters={str(k): (None if v is None else _size(v)) for k, v in last["counters"].items()},
        )
        raised = data["raised_floor"]
        memory = Memory(
            last=step,
            settled=_flag(data["settled"]),
            raised_floor=None if raised is None else _pair(raised),
            hold_until=_time(data["hold_until"]),
            turned_at=None if data["turned_at"] is None else _time(data["turned_at"]),
            ceiling=None if data["ceiling"] is None else _size(data["ceiling"]),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise InvalidArgument(f"not a balloon step record: {data!r:.200}") from err
    return memory


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a size in bytes: {value!r}")
    return value


def _pair(value: Any) -> Tuple[int, float]:
    size, at = value  # exactly two, or ValueError
    return _size(size), _time(at)


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"not true or false: {value!r}")
    return value

"""Reclaim advice: how much memory a guest could give back, judged from its own history.

Figures in, advice out: no I/O, no clock, no libvirt, no SQLite. The history
store hands :func:`advise` a domain's :class:`Point` list, the caller reads
the :class:`Limits` from libvirt and passes the time, and gets an
:class:`Advice` with the reason spelled out.

The estimator follows Kubernetes' VPA recommender, which right-sizes memory
from usage history better than the balloon tools do:

1. The window (8 days) is cut into aggregation intervals (24 h) counted back
   from ``now``, and each keeps its *peak* of used memory: memory has to
   cover the peak, and a percentile over raw time would cut a daily peak
   shorter than 5 % of a day (72 minutes) as noise.
2. Each interval weighs as much usable history as it holds (ok seconds),
   decaying by age with a half-life (24 h): last week counts, yesterday
   counts more.
3. Pressure (swap-in or major-fault bursts; OOM kills, allocation stalls and
   direct reclaims on guests that report them) raises its interval's peak to
   the memory the guest was seen to need, plus a bump (20 %, at least
   100 MiB), as VPA does after an OOM kill. It decays with its interval.
4. Demand is the weighted percentile (p95) of those peaks, and never less
   than the peak of the last hour: history may say use went down, but the
   guest holds what it holds now.
5. Recommended is demand plus a margin (15 %, at least 64 MiB), widened
   while confidence is short of 1, rounded up to a MiB, then held between
   ``max(floor, <min_guarantee>)`` and ``<memory>``.

The README section "Reclaim advice" gives the formula and why each default
was chosen.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from operator import attrgetter
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.stats import STATS_BY_QEMU_NAME, StatSpec

__all__ = [
    "Point",
    "COUNTERS",
    "merge",
    "deltas",
    "Limits",
    "Policy",
    "Advice",
    "advise",
    "host_total",
    "pressure_kinds",
]

MiB = 2**20
_HOUR = 3600.0
_DAY = 24 * _HOUR
_LN2 = math.log(2)

#: The cumulative guest stats a :class:`Point` keeps the increase of, by field.
COUNTERS: Mapping[str, StatSpec] = {
    "swap_in": STATS_BY_QEMU_NAME["stat-swap-in"],
    "major_faults": STATS_BY_QEMU_NAME["stat-major-faults"],
    "oom_kills": STATS_BY_QEMU_NAME["stat-oom-kills"],
    "alloc_stalls": STATS_BY_QEMU_NAME["stat-alloc-stalls"],
    "direct_reclaims": STATS_BY_QEMU_NAME["stat-direct-reclaims"],
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One interval of one domain's history (a raw collector interval, or a downsampled one).

    :ivar start: Epoch seconds at the interval's start.
    :ivar seconds: Its length (more than 0).
    :ivar ok_seconds: How much of it had figures whose status was ``ok``;
        0 is a gap (stale, never updated, unresponsive, paused...).
    :ivar used_peak: Bytes: the highest ``stat-total-memory -
        stat-available-memory`` seen in it; ``None`` in a gap, or when the
        guest did not report both.
    :ivar actual: Bytes: the balloon size (``query-balloon`` ``actual``) at
        its end, ``None`` if unknown.
    :ivar swap_in: Bytes swapped in during the interval.
    :ivar major_faults: Increase of ``stat-major-faults``.
    :ivar oom_kills: Increase of ``stat-oom-kills`` (QEMU 9.2 and Linux
        6.12 guests; 0 when not reported).
    :ivar alloc_stalls: Increase of ``stat-alloc-stalls``.
    :ivar direct_reclaims: Increase of ``stat-direct-reclaims`` (bytes).

    The counters are increases, never negative: :func:`deltas` makes them.
    """

    start: float
    seconds: float
    ok_seconds: float
    used_peak: Optional[int]
    actual: Optional[int]
    swap_in: int = 0
    major_faults: int = 0
    oom_kills: int = 0
    alloc_stalls: int = 0
    direct_reclaims: int = 0

    def __post_init__(self) -> None:
        # A bad point would skew every advice made from the file it sits in: refuse it here. One
        # chained test, since every point recorded goes through it.
        if not (
            -math.inf < self.start < math.inf
            and 0 < self.seconds < math.inf
            and 0 <= self.ok_seconds <= self.seconds
            and (self.used_peak is None or (self.used_peak >= 0 and self.ok_seconds > 0))
            and (self.actual is None or self.actual >= 0)
            and self.swap_in >= 0 and self.major_faults >= 0 and self.oom_kills >= 0
            and self.alloc_stalls >= 0 and self.direct_reclaims >= 0
        ):
            raise InvalidArgument(
                f"a history point needs a finite start and length, ok seconds within it, used memory only "
                f"with ok seconds, and no negative size or increase: {self!r}"
            )

    @property
    def end(self) -> float:
        """Epoch seconds at the interval's end."""
        return self.start + self.seconds

    @classmethod
    def _collector(cls, into: List[Point]) -> Callable[..., None]:
        """For the history store only: a function appending to ``into`` the point of its arguments, unchecked.

        Its arguments are the constructor's, all ten, positionally: the
        figures of a point the store checked when it recorded it (this
        class's checks, and those of SQLite's range), read back. Checking
        them again, and setting each field through ``object.__setattr__`` as
        a frozen dataclass's constructor does, costs 1.6 µs a point: 1.2 s
        for the 743,000 points of 100 domains' 8 days, which ``advise --all``
        reads. Setting the instance's ``__dict__`` at once costs under a
        third of that; the points are equal to, hash and print as those the
        constructor makes. A new field must be added here as well
        (``test_history.py`` compares the two).
        """
        new, set_attribute, append = object.__new__, object.__setattr__, into.append

        def collect(start: float, seconds: float, ok_seconds: float, used_peak: Optional[int],
                    actual: Optional[int], swap_in: int, major_faults: int, oom_kills: int, alloc_stalls: int,
                    direct_reclaims: int) -> None:
            point = new(cls)
            set_attribute(point, "__dict__", {
                "start": start, "seconds": seconds, "ok_seconds": ok_seconds, "used_peak": used_peak,
                "actual": actual, "swap_in": swap_in, "major_faults": major_faults, "oom_kills": oom_kills,
                "alloc_stalls": alloc_stalls, "direct_reclaims": direct_reclaims,
            })
            append(point)

        return collect


def merge(points: Sequence[Point]) -> Point:
    """One point covering consecutive ``points``: how the history store downsamples.

    Lengths, ok seconds and increases add up; the peak is the highest one
    seen, and the balloon size the last one known. Merging is associative,
    so a store can merge what it already merged; lengths are float sums,
    exact for whole (or dyadic) seconds and within rounding otherwise.

    :raise InvalidArgument: When ``points`` is empty or not in time order.
    """
    if not points:
        raise InvalidArgument("there are no history points to merge")
    for before, after in zip(points, points[1:]):
        if after.start < before.start:
            raise InvalidArgument(f"history points to merge are out of order: {after!r} after {before!r}")
    peaks = [p.used_peak for p in points if p.used_peak is not None]
    actuals = [p.actual for p in points if p.actual is not None]
    return Point(
        start=points[0].start,
        seconds=sum(p.seconds for p in points),
        ok_seconds=sum(p.ok_seconds for p in points),
        used_peak=max(peaks) if peaks else None,
        actual=actuals[-1] if actuals else None,
        **{field: sum(getattr(p, field) for p in points) for field in COUNTERS},
    )


def deltas(previous: Mapping[str, Optional[int]], current: Mapping[str, Optional[int]]) -> Dict[str, int]:
    """The increases of :data:`COUNTERS` between two successive readings, as :class:`Point` arguments.

    ``previous`` and ``current`` map QEMU stat names to figures, ``None``
    for unsupported, as :attr:`GuestStats.values
    <virt_balloon_stats.stats.GuestStats.values>` does; pass ``{}`` for
    ``previous`` on the first reading. A counter unknown on either side
    gives 0, and so does one that went down: the guest rebooted, or (QEMU
    10.0 and later) the machine was reset. What it counted since then is
    lost rather than mistaken for a burst, since boot-time faults are not
    memory pressure.
    """
    out: Dict[str, int] = {}
    for field, spec in COUNTERS.items():
        before, after = previous.get(spec.qemu), current.get(spec.qemu)
        out[field] = after - before if before is not None and after is not None and after >= before else 0
    return out


@dataclasses.dataclass(frozen=True)
class Limits:
    """What libvirt says about the domain, read at advise time.

    :ivar actual: Bytes, the current balloon size.
    :ivar maximum: Bytes, ``<memory>``: the most the guest can be given.
    :ivar min_guarantee: Bytes, ``<memtune><min_guarantee>``; ``None`` if unset.
    """

    actual: int
    maximum: int
    min_guarantee: Optional[int]

    def __post_init__(self) -> None:
        if self.actual < 0 or self.maximum < 0 or (self.min_guarantee or 0) < 0:
            raise InvalidArgument(f"memory sizes cannot be negative: {self!r}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The advice's knobs. The defaults are the README's, which says why each was chosen.

    :ivar percentile: Of the aggregation intervals' peaks (VPA's upper bound).
    :ivar half_life_seconds: Age at which a peak weighs half as much (VPA's).
    :ivar window_seconds: History older than this is ignored (VPA's 8 days).
    :ivar min_history_seconds: Usable seconds needed before advising at all.
    :ivar aggregation_seconds: Length of the intervals whose peaks are kept
        (VPA's 24 h: a daily peak is always covered).
    :ivar recent_seconds: Demand is never below the peak of this last stretch.
    :ivar margin_fraction: Margin above demand (VPA's 15 %)...
    :ivar margin_min_bytes: ...and at least this much.
    :ivar floor_bytes: Never recommend less: a small Linux guest's own need.
    :ivar swap_in_burst_bytes_per_second: Swap-in at this rate is pressure...
    :ivar major_fault_burst_per_second: ...and so are major faults at this
        rate (1 MiB/s of 4 KiB pages, the same paging as the swap-in rate).
    :ivar burst_seconds: A burst is the rate over the interval, or over this
        many seconds of a longer one: downsampling keeps a minute-long burst.
    :ivar bump_fraction: After pressure, the need is the peak seen plus this
        fraction (VPA's OOM bump, 20 %)...
    :ivar bump_min_bytes: ...and at least this much (VPA's 100 MiB).
    :ivar confidence_widening: With confidence ``c``, the recommendation is
        multiplied by ``1 + confidence_widening * (1 - c)``.
    """

    percentile: float = 0.95
    half_life_seconds: float = _DAY
    window_seconds: float = 8 * _DAY
    min_history_seconds: float = _DAY
    aggregation_seconds: float = _DAY
    recent_seconds: float = _HOUR
    margin_fraction: float = 0.15
    margin_min_bytes: int = 64 * MiB
    floor_bytes: int = 128 * MiB
    swap_in_burst_bytes_per_second: float = 1.0 * MiB
    major_fault_burst_per_second: float = 256.0
    burst_seconds: float = 60.0
    bump_fraction: float = 0.2
    bump_min_bytes: int = 100 * MiB
    confidence_widening: float = 0.5

    def __post_init__(self) -> None:
        positive = ("half_life_seconds", "window_seconds", "aggregation_seconds", "burst_seconds",
                    "swap_in_burst_bytes_per_second", "major_fault_burst_per_second")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0 or (field.name in positive and value == 0):
                needed = "more than 0" if field.name in positive else "0 or more"
                raise InvalidArgument(f"the advice policy's {field.name} must be {needed}, not {value!r}")
        if not 0 < self.percentile <= 1:
            raise InvalidArgument(
                f"the advice policy's percentile must be in (0, 1], not {self.percentile!r}"
            )
        if self.min_history_seconds > self.window_seconds:
            raise InvalidArgument(
                f"the advice policy needs {self.min_history_seconds:g} s of history "
                f"but looks back only {self.window_seconds:g} s: no guest could ever have enough"
            )


@dataclasses.dataclass(frozen=True)
class Advice:
    """How much memory one guest needs and could give back, and why.

    :ivar actual: Bytes, the balloon size now.
    :ivar recommended: Bytes the guest should have; ``None`` when the
        history is too short to say.
    :ivar reclaimable: ``max(0, actual - recommended)``; ``None`` likewise.
    :ivar demand: Bytes the guest was seen to need, before the margin.
    :ivar confidence: 0 to 1: how much of the decaying window is covered
        by usable history, times how complete the recorded history is.
    :ivar history_seconds: Usable (ok) seconds inside the window.
    :ivar pressure_events: Intervals in the window with signs of pressure.
    :ivar reason: One line for people: which percentile over how many hours,
        which pressure events, which bound applied.
    """

    actual: int
    recommended: Optional[int]
    reclaimable: Optional[int]
    demand: Optional[int]
    confidence: float
    history_seconds: float
    pressure_events: int
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document's keys but ``domain`` and ``uuid``, which the caller adds."""
        return dataclasses.asdict(self)


def host_total(advices: Iterable[Advice]) -> int:
    """Bytes the host could take back: the sum of every reclaimable figure there is."""
    return sum(a.reclaimable for a in advices if a.reclaimable is not None)


#: Kinds of pressure, in the order the reason lists them.
_SWAP_IN, _MAJOR_FAULTS, _OOM, _STALL, _DIRECT = (
    "swap-in burst", "major-fault burst", "OOM kill", "allocation stall", "direct reclaim",
)
_KINDS = (_SWAP_IN, _MAJOR_FAULTS, _OOM, _STALL, _DIRECT)


def pressure_kinds(point: Point, policy: Policy) -> List[str]:
    """The kinds of pressure one interval shows.

    Swap-in and major faults happen on healthy guests too (a daemon waking,
    a program starting), so only a burst counts: at least the policy's rate
    over the interval, or over ``burst_seconds`` of a longer (downsampled)
    one. The 6.12 counters stay 0 where the guest does not report them,
    and any increase of theirs counts: each means the guest ran short.
    """
    span = min(point.seconds, policy.burst_seconds)
    kinds = []
    if point.swap_in >= policy.swap_in_burst_bytes_per_second * span:
        kinds.append(_SWAP_IN)
    if point.major_faults >= policy.major_fault_burst_per_second * span:
        kinds.append(_MAJOR_FAULTS)
    if point.oom_kills:
        kinds.append(_OOM)
    if point.alloc_stalls:
        kinds.append(_STALL)
    if point.direct_reclaims:
        kinds.append(_DIRECT)
    return kinds


def _needed(point: Point, kinds: List[str], policy: Policy) -> Optional[int]:
    """What the guest needed in an interval with pressure: what it used, plus the bump.

    Used memory is the basis: when the pressure is real, little is left
    available and it is near the guest's size; when it is not (swap-in of
    long-idle pages with memory to spare), the bump stays small. An OOM
    kill proves the guest was full, so its size at the time counts too.
    """
    basis = [point.used_peak] if point.used_peak is not None else []
    if _OOM in kinds and point.actual is not None:
        basis.append(point.actual)
    if not basis:
        return None
    used = max(basis)
    return max(used + policy.bump_min_bytes, math.ceil(used * (1 + policy.bump_fraction)))


#: Weights count from ``now``, which spares a pass to find where the history ends, unless the
#: last usable point ended more than this many e-folds of the decay before it: then they count
#: from that end, so that they do not all underflow (the percentile needs only their ratios).
#: e^-64 leaves the youngest weights far from underflow.
_REBASE = 64.0


class _Scan(NamedTuple):
    """What one pass over a guest's points gathers for :func:`advise`.

    Aggregation intervals are numbered back from ``now``: 0 is the last one.
    A weight is, for each stretch of usable history in the interval, its ok
    fraction times ``rate * integral of e^-(rate * (reference - t)) dt``
    over the stretch: the constant factor ``rate`` cancels in the
    percentile (ratios of weights) and in the coverage (divided by the full
    window's weight, made the same way).
    """

    covered: float
    usable: float
    youngest: float
    reference: float
    recent_peak: int
    pressure_events: int
    events: collections.Counter[str]
    peaks: Dict[float, int]
    needs: Dict[float, int]
    weights: Dict[float, float]


def _scan(points: Sequence[Point], policy: Policy, now: float, reference: float) -> _Scan:
    """Gather, in one pass over ``points``, what :func:`advise` judges from; weights count from ``reference``.

    This is the loop over every point of the README's formula, written for
    speed: ``advise --all`` runs it over some 7,400 points for each of 100
    domains, and a plain loop (``test_advice.py`` keeps one to compare)
    took 1.2 s for them. Each point's fields are read once, into locals;
    ``max()``, ``min()`` and ``Point.end`` are spelled out, without their
    calls (ties keep the point's own time, as ``max()`` and ``min()`` do).
    The interval being filled is kept in locals too, and put back in the
    dicts only when a stretch falls in another one, so points in any order
    add up in the same order as in the plain loop. Pressure is judged by
    helpers only for the few points with a counter high enough for it.
    """
    now, reference = float(now), float(reference)  # an int would be converted at every use below
    window_start = now - policy.window_seconds
    recent_start = now - policy.recent_seconds
    size = policy.aggregation_seconds
    decay = -_LN2 / policy.half_life_seconds
    exp, expm1 = math.exp, math.expm1
    # A burst's threshold grows with the point's length, so a point under the shortest point's
    # thresholds, with none of the other counters, shows no pressure: pressure_kinds() is not asked.
    shortest = min(min(map(attrgetter("seconds"), points), default=1.0), policy.burst_seconds)
    swap_floor = policy.swap_in_burst_bytes_per_second * shortest
    fault_floor = policy.major_fault_burst_per_second * shortest
    peaks: Dict[float, int] = {}
    needs: Dict[float, int] = {}
    weights: Dict[float, float] = {}
    events: collections.Counter[str] = collections.Counter()
    pressure_events = 0
    usable = covered = 0.0
    latest = -math.inf
    recent_peak = 0
    # The interval being filled: its number, its lower boundary and its figures so far; a peak
    # or need of -1 is none yet (an interval counts once it has a usable stretch).
    current, bound, peak, weight, need = math.nan, math.inf, -1, 0.0, -1
    for point in points:
        start = point.start
        seconds = point.seconds
        end = start + seconds
        if start >= now or end <= window_start:
            continue
        low = start if start >= window_start else window_start
        high = end if end <= now else now
        length = high - low
        covered += length
        used = point.used_peak
        needed = None
        if (point.swap_in >= swap_floor or point.major_faults >= fault_floor or point.oom_kills
                or point.alloc_stalls or point.direct_reclaims):
            kinds = pressure_kinds(point, policy)
            if kinds:
                pressure_events += 1
                for kind in kinds:
                    events[kind] += 1
                needed = _needed(point, kinds, policy)
        if used is not None:
            ok_fraction = point.ok_seconds / seconds
            usable += ok_fraction * length
            if end > latest:
                latest = end
            if high > recent_start and used > recent_peak:
                recent_peak = used
        elif needed is None:
            continue
        # Most points fall in one aggregation interval; a long one is cut at the boundaries.
        number = (now - high) // size
        while True:
            if number != current:
                if peak >= 0:
                    peaks[current], weights[current] = peak, weight
                if need >= 0:
                    needs[current] = need
                current, bound = number, now - (number + 1) * size
                peak, weight, need = peaks.get(number, -1), weights.get(number, 0.0), needs.get(number, -1)
            part_low = low if low >= bound else bound
            if part_low < high:  # not always so: float rounding can put a boundary on a point's end
                if used is not None:
                    if used > peak:
                        peak = used
                    weight -= ok_fraction * exp(decay * (reference - high)) * expm1(decay * (high - part_low))
                if needed is not None and needed > need:
                    need = needed
                if part_low == low:  # the point's start: its last stretch
                    break
                high = part_low
            number += 1
    if peak >= 0:
        peaks[current], weights[current] = peak, weight
    if need >= 0:
        needs[current] = need
    youngest = now if latest == -math.inf else min(now, latest)
    return _Scan(covered, usable, youngest, reference, recent_peak, pressure_events, events, peaks, needs,
                 weights)


def _percentile(samples: List[Tuple[int, float]], q: float) -> int:
    """The weighted percentile: the least value that, with the ones below it, holds ``q`` of the weight.

    Exact over the few interval peaks, where VPA approximates with a
    histogram of 5 %-wide buckets that it keeps for every container.
    """
    ordered = sorted(samples)
    threshold = q * sum(weight for _, weight in ordered)
    running = 0.0
    for value, weight in ordered:
        running += weight
        if running >= threshold:
            break
    return value


def _span(seconds: float) -> str:
    """A length of history for the reason line: seconds and minutes while short, then hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * _HOUR:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / _HOUR:.1f} h"


def _mib(value: float) -> str:
    return f"{value / MiB:.0f} MiB"


def advise(points: Sequence[Point], limits: Limits, policy: Policy, now: float) -> Advice:
    """Advise one guest from its history: see the module's docstring and the README.

    :param points: The domain's history, in any order; only the parts of
        points inside ``[now - window, now]`` count, and gaps carry no demand.
    :param limits: The domain's balloon size, ``<memory>`` and ``<min_guarantee>``.
    :param policy: The knobs.
    :param now: Epoch seconds the advice is for.
    """
    decay = -_LN2 / policy.half_life_seconds
    scan = _scan(points, policy, now, now)
    if decay * (now - scan.youngest) < -_REBASE:
        scan = _scan(points, policy, now, scan.youngest)
    usable, peaks, needs, weights = scan.usable, scan.peaks, scan.needs, scan.weights
    pressure_events, events, recent_peak = scan.pressure_events, scan.events, scan.recent_peak
    completeness = usable / scan.covered if scan.covered else 0.0
    full_window = -math.expm1(decay * policy.window_seconds)
    coverage = math.exp(decay * (now - scan.reference)) * sum(weights.values()) / full_window
    confidence = min(1.0, coverage) * completeness

    if usable <= 0 or usable < policy.min_history_seconds:
        return Advice(
            actual=limits.actual, recommended=None, reclaimable=None, demand=None,
            confidence=confidence, history_seconds=usable, pressure_events=pressure_events,
            reason=f"insufficient history: {_span(usable)} of the {_span(policy.min_history_seconds)} needed",
        )

    calm = _percentile([(peaks[n], w) for n, w in weights.items()], policy.percentile)
    pressed = _percentile([(max(peaks[n], needs.get(n, 0)), w) for n, w in weights.items()],
                          policy.percentile)
    demand = max(pressed, recent_peak)
    margin = max(policy.margin_fraction * demand, policy.margin_min_bytes)
    widening = policy.confidence_widening * (1 - confidence)
    wide = math.ceil((demand + margin) * (1 + widening) / MiB) * MiB
    lower = max(policy.floor_bytes, limits.min_guarantee or 0)
    recommended = min(max(wide, lower), limits.maximum)

    reason = [
        f"p{policy.percentile * 100:g} of the {policy.aggregation_seconds / _HOUR:g} h peaks of used memory "
        f"over {_span(usable)} of history ({completeness * 100:.0f} % complete): {_mib(calm)}"
    ]
    if pressure_events:
        said = ", ".join(f"{kind} x{events[kind]}" for kind in _KINDS if events[kind])
        where = f"pressure in {pressure_events} interval{'s' if pressure_events > 1 else ''} ({said})"
        reason.append(f"raised to {_mib(pressed)} by {where}" if pressed > calm else f"{where} left it as is")
    if recent_peak > pressed:
        reason.append(f"raised to the last {policy.recent_seconds / _HOUR:g} h's peak, {_mib(recent_peak)}")
    reason.append(f"+ margin {_mib(margin)}")
    if widening >= 0.005:  # what rounds to 0 % would only puzzle
        reason.append(f"+ {widening * 100:.0f} % for confidence {confidence:.2f}")
    if max(wide, lower) > limits.maximum:
        reason.append(f"capped at <memory>, {_mib(limits.maximum)}")
    elif lower > wide:
        bound = "<min_guarantee>" if lower == limits.min_guarantee else "the floor"
        reason.append(f"raised to {bound}, {_mib(recommended)}")
    return Advice(
        actual=limits.actual,
        recommended=recommended,
        reclaimable=max(0, limits.actual - recommended),
        demand=demand,
        confidence=confidence,
        history_seconds=usable,
        pressure_events=pressure_events,
        reason="; ".join(reason),
    )

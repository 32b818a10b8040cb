"""The ``watch`` view: rates and trends between successive samples. Pure.

Rates are computed over the guest's own clock (the change of ``last-update``
between two samples), not over our sampling interval: the figures only move
when the guest answers, so dividing by our interval would show bursts and
zeros. A counter that falls means the guest's counters started again
(a reboot, or a machine reset): that interval shows no rate. A trend is a
small sparkline of the last few values.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Deque, Dict, Iterable, Optional, Sequence, Tuple

from virt_balloon_stats.formats import format_age, human_bytes, render_table
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import STATS

if TYPE_CHECKING:
    from virt_balloon_stats.collector import HostState

__all__ = ["TREND_LENGTH", "sparkline", "Tracker", "render_frame"]

TREND_LENGTH = 12
_BARS = "▁▂▃▄▅▆▇█"

_RATES = (
    ("stat-major-faults", "MAJFLT/s"),
    ("stat-minor-faults", "MINFLT/s"),
    ("stat-swap-in", "SWAPIN/s"),
    ("stat-swap-out", "SWAPOUT/s"),
)


def sparkline(values: Sequence[Optional[int]]) -> str:
    """Eight-level bars, scaled between the lowest and highest value shown."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(_BARS[0 if span == 0 else round((v - low) / span * (len(_BARS) - 1))])
    return "".join(out)


def _restarted(before: Sample, after: Sample) -> bool:
    """Whether any cumulative figure fell between two answers: the guest's counters started again.

    A reboot restarts them all at once, so one that fell means the others'
    differences span two boots as well, even those that happen to have grown.
    """
    for spec in STATS:
        if spec.cumulative:
            old, new = before.get(spec.qemu), after.get(spec.qemu)
            if old is not None and new is not None and new < old:
                return True
    return False


class Tracker:
    """Remembers the previous sample and a short history per domain (by UUID)."""

    def __init__(self, length: int = TREND_LENGTH) -> None:
        self._previous: Dict[str, Sample] = {}
        self._rates: Dict[str, Dict[str, float]] = {}
        self._trends: Dict[str, Dict[str, Deque[Optional[int]]]] = {}
        self._length = length

    def update(self, sample: Sample) -> None:
        """Take in a new sample of a domain.

        A rate divides the change between two answers of the same guest
        boot. Counters start again from 0 when the guest reboots (on any
        QEMU), and a machine reset on QEMU 10.0 or later also sets
        ``last-update`` back to 0 with every figure unsupported until the
        driver answers again. A pair that straddles such a restart says
        nothing about the traffic in between: clamping it to 0 would show
        an idle guest, and dividing it a negative one. So that interval has
        no rate, and rates resume from the next pair of answers.
        """
        key = sample.uuid
        prev = self._previous.get(key)
        self._previous[key] = sample
        trends = self._trends.setdefault(key, {})
        for name in ("stat-free-memory", "stat-available-memory"):
            trends.setdefault(name, collections.deque(maxlen=self._length)).append(sample.get(name))
        if sample.last_update is None:
            # No answer from this boot of the guest (yet): any rate shown would be the last boot's.
            self._rates.pop(key, None)
            return
        if prev is None or prev.last_update is None:
            return
        elapsed = sample.last_update - prev.last_update
        if elapsed == 0:
            return  # the guest has not answered again: the last rate still holds
        if elapsed < 0 or _restarted(prev, sample):
            self._rates.pop(key, None)
            return
        rates = {}
        for name, _ in _RATES:
            old, new = prev.get(name), sample.get(name)
            if old is not None and new is not None:
                rates[name] = (new - old) / elapsed
        self._rates[key] = rates

    def rate(self, sample: Sample, name: str) -> Optional[float]:
        """Per-second rate of a cumulative figure, once two answers of the same boot were seen.

        ``None`` for a sample without figures (unreachable, unresponsive):
        a rate there would be a guess.
        """
        if sample.stats is None:
            return None
        return self._rates.get(sample.uuid, {}).get(name)

    def trend(self, sample: Sample, name: str) -> str:
        """Sparkline of the last values of a figure."""
        return sparkline(list(self._trends.get(sample.uuid, {}).get(name, ())))


def _rate(value: Optional[float], is_bytes: bool) -> str:
    if value is None:
        return "-"
    return human_bytes(int(value)) if is_bytes else f"{value:.1f}"


def render_frame(
    samples: Sequence[Sample],
    tracker: Tracker,
    now: float,
    *,
    show_uri: bool = False,
    hosts: Iterable[HostState] = (),
) -> str:
    """One screenful: a header line, a line per connection that is down, and a row per domain."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    header: Tuple[str, ...] = (
        ("DOMAIN", "STATUS", "AGE", "TOTAL", "FREE", "AVAIL")
        + tuple(label for _, label in _RATES)
        + ("FREE TREND", "AVAIL TREND")
    )
    rows = []
    for s in samples:
        name = f"{s.domain}@{s.uri}" if show_uri else s.domain
        rows.append(
            (
                name,
                s.status.value,
                format_age(s.age_seconds),
                human_bytes(s.get("stat-total-memory")),
                human_bytes(s.get("stat-free-memory")),
                human_bytes(s.get("stat-available-memory")),
            )
            + tuple(_rate(tracker.rate(s, n), n.startswith("stat-swap")) for n, _ in _RATES)
            + (tracker.trend(s, "stat-free-memory"), tracker.trend(s, "stat-available-memory"))
        )
    down = "".join(
        f"{h.uri}: {h.message}"
        + (f" (next try in {h.retry_in:.0f} s)" if h.retry_in is not None else "")
        + "\n"
        for h in hosts
        if not h.up
    )
    return f"virt-balloon-stats watch - {stamp} - Ctrl-C to quit\n{down}\n" + render_table(header, rows)

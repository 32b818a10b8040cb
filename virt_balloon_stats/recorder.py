"""Recording: every collector cycle becomes one history point per domain.

The ``record`` command (and the exporter, when it keeps history) hands each
cycle to a :class:`Recorder`, which turns each domain's sample into an
:class:`~virt_balloon_stats.advice.Point` and writes it through the history
store, each point in a transaction of its own (a killed recorder loses at
most the cycle it was writing). It is stateful, as the other consumers
of a long-running collector are: the increases of the cumulative counters
are taken against the domain's previous ``ok`` reading.

:func:`point_of` is the pure half: a sample (and the one before it) in, a
point out. Only ``ok`` figures carry demand; any other status is a gap, so
stale, never-updated, unresponsive and paused intervals are recorded as
such and never as figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from virt_balloon_stats.advice import Point, deltas
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import Status

if TYPE_CHECKING:
    from virt_balloon_stats.collector import Cycle
    from virt_balloon_stats.history import History

__all__ = ["point_of", "Recorder"]


def _usable(sample: Optional[Sample]) -> bool:
    return sample is not None and sample.status is Status.OK and sample.stats is not None


def point_of(previous: Optional[Sample], sample: Sample, start: float, seconds: float) -> Point:
    """The history point of one domain for the interval ``[start, start + seconds)``.

    ``previous`` is the domain's last ``ok`` sample before this one (``None``
    for the first): the counters' increases are taken against it, and a
    counter that went down (a reboot, a QEMU 10 machine reset) counts 0.
    """
    if not _usable(sample):
        return Point(start=start, seconds=seconds, ok_seconds=0.0, used_peak=None, actual=sample.actual_bytes)
    assert sample.stats is not None
    before = previous.stats.values if previous is not None and _usable(previous) and previous.stats else {}
    used = sample.stats.used_bytes
    return Point(
        start=start,
        seconds=seconds,
        ok_seconds=seconds,
        # A guest reporting more available than total memory says nothing usable about its use.
        used_peak=used if used is not None and used >= 0 else None,
        actual=sample.actual_bytes,
        **deltas(before, sample.stats.values),
    )


class Recorder:
    """Write each cycle's samples to a history store, one point per domain.

    :param history: A store opened as the writer.
    :param interval: The collector's interval in seconds: the length of a
        domain's first point, which has no cycle before it.
    """

    def __init__(self, history: "History", interval: float) -> None:
        if not interval > 0:
            raise InvalidArgument(f"the recording interval must be positive, not {interval!r}")
        self._history = history
        self._interval = interval
        #: Per domain UUID: the start of the last cycle it was in, and its last ok sample.
        self._seen: Dict[str, float] = {}
        self._last_ok: Dict[str, Sample] = {}
        self.points = 0

    def record(self, cycle: "Cycle") -> int:
        """Record one cycle; return the number of points written.

        A point runs from the domain's previous cycle to this one, so the
        points of a domain tile time without overlap; a domain seen again
        after an absence starts afresh with one interval's point.
        """
        now = cycle.started_at
        points = []
        for sample in cycle.samples:
            last = self._seen.get(sample.uuid)
            # A domain missing for long (or a clock step) starts afresh with one interval's point.
            follows = last is not None and 0 < now - last <= 3 * self._interval
            start = last if follows and last is not None else now - self._interval
            point = point_of(self._last_ok.get(sample.uuid), sample, start, now - start)
            points.append((sample.uuid, sample.domain, point))
        try:
            # One transaction for the cycle (a point the history cannot hold
            # is refused alone, after the others are stored).
            self._history.record_many(points)
        finally:
            for sample in cycle.samples:
                self._seen[sample.uuid] = now
                if _usable(sample):
                    self._last_ok[sample.uuid] = sample
            gone = set(self._seen) - {sample.uuid for sample in cycle.samples}
            for uuid in gone:
                # A domain that left (shut off, undefined) starts afresh if it comes back.
                self._seen.pop(uuid, None)
                self._last_ok.pop(uuid, None)
        self.points += len(points)
        return len(points)

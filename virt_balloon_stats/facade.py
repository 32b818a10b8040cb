"""The scripts' :class:`BalloonStats`: one connection's API, and reading many of its domains at once.

:class:`virt_balloon_stats.client.BalloonStats` reads one domain at a time;
reading many at once, with deadlines and bulk calls, is the collector's job,
one layer up. This module sits above both, so that a script keeps one object
for both (``from virt_balloon_stats import BalloonStats`` gives this one)
while the client never imports the collector. Loading it loads no more than
the client: the collector is imported on the first :func:`sample_many`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from virt_balloon_stats import client
from virt_balloon_stats.client import DEFAULT_WORKERS, GuestRef
from virt_balloon_stats.errors import DomainNotFound
from virt_balloon_stats.sample import Sample

__all__ = ["BalloonStats", "sample_many"]


def sample_many(
    reader: client.BalloonStats,
    refs: Optional[Sequence[GuestRef]] = None,
    source: str = "both",
    *,
    workers: int = DEFAULT_WORKERS,
    timeout: Optional[float] = None,
) -> List[Sample]:
    """Sample several domains of one connection (every running one when ``refs`` is ``None``), in parallel.

    One collector cycle (:class:`~virt_balloon_stats.collector.Collector`)
    over ``reader``'s connection, which stays open: libvirt's figures and
    states for all domains come from bulk calls with ``NOWAIT``, and a domain
    whose QEMU has not answered within ``timeout`` seconds is reported
    ``unresponsive`` instead of holding up the others. Results come back in
    the order asked (by name for every running domain).

    :raise InvalidArgument: For a bad source, ``workers`` or ``timeout``.
    :raise DomainNotFound: When a domain named in ``refs`` does not exist.
    :raise BalloonStatsError: When listing every running domain fails.
    """
    from virt_balloon_stats.collector import Collector  # a one-domain script does not pay for it

    collector = Collector(
        clients=[reader], domains=refs, source=source, workers=workers, timeout=timeout, events=False
    )
    try:
        cycle = collector.collect()
    finally:
        collector.stop(close=False)
    for problem in cycle.problems:
        if isinstance(problem.error, DomainNotFound) or refs is None:
            raise problem.error
    return list(cycle.samples)


class BalloonStats(client.BalloonStats):
    """Balloon statistics of the domains behind one libvirt connection, one or many at a time.

    Everything of :class:`virt_balloon_stats.client.BalloonStats`, plus
    :meth:`sample_many`.
    """

    def sample_many(
        self,
        refs: Optional[Sequence[GuestRef]] = None,
        source: str = "both",
        *,
        workers: int = DEFAULT_WORKERS,
        timeout: Optional[float] = None,
    ) -> List[Sample]:
        """Sample several domains (every running one when ``refs`` is ``None``); see :func:`sample_many`.

        :raise InvalidArgument: For a bad source, ``workers`` or ``timeout``.
        :raise DomainNotFound: When a domain named in ``refs`` does not exist.
        :raise BalloonStatsError: When listing every running domain fails.
        """
        return sample_many(self, refs, source, workers=workers, timeout=timeout)

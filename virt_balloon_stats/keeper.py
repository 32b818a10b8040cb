"""History kept by a long-running collector: each cycle recorded, the advice refreshed and served.

The exporter keeps history when asked (``exporter --history``): every cycle
goes to the history file through a :class:`~virt_balloon_stats.recorder.Recorder`,
as ``record`` writes it, and every hour (``--advise-every``) the domains of
the last cycle are advised from that file, as ``advise`` would advise them,
and the answers are served beside the figures
(:func:`~virt_balloon_stats.advising.advice_families`).

Why every hour, not every cycle: advice moves with daily peaks, and judging
a domain reads its whole window (up to 7,400 points), some 13 ms of CPU a
domain with 8 days of history (``tox -e bench``, B14), where a cycle
costs the exporter about 0.6 ms a domain (B6). Collecting every 15 s, a
refresh every 5 minutes would double the exporter's CPU; every hour adds
about 9 %, as much as recording each cycle (B13). ``advise`` gives the
advice of the moment. Both run in the collector's thread, between cycles,
so the history has one writer thread and the advice reads the domains the
collector already holds
(:meth:`Collector.guest <virt_balloon_stats.collector.Collector.guest>`: no
lookup, one ``XMLDesc`` each); a scrape only reads the last answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Tuple

from virt_balloon_stats.advice import Policy
from virt_balloon_stats.advising import DomainAdvice, advice_families, advise_guest
from virt_balloon_stats.errors import BalloonStatsError, HistoryError, InvalidArgument
from virt_balloon_stats.recorder import Recorder
from virt_balloon_stats.stats import Status

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from virt_balloon_stats.collector import Collector, Cycle
    from virt_balloon_stats.history import History

__all__ = ["DEFAULT_ADVISE_EVERY_SECONDS", "HistoryKeeper"]

LOG = logging.getLogger(__name__)

#: How often the served advice is made again (the README says why).
DEFAULT_ADVISE_EVERY_SECONDS = 3600.0


class HistoryKeeper:
    """Record a collector's cycles in a history and serve advice made from it.

    :param collector: The collector whose cycles are kept; its domains are
        advised through it.
    :param history: The history, opened as its writer.
    :param interval: The collector's interval (the length of a domain's first point).
    :param policy: The advice's knobs.
    :param advise_every: Seconds between two refreshes of the advice.
    :param clock: Epoch seconds, for the advice's ``now`` and the refreshes.
    """

    def __init__(
        self,
        collector: "Collector",
        history: "History",
        interval: float,
        policy: Policy,
        *,
        advise_every: float = DEFAULT_ADVISE_EVERY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not advise_every > 0:
            raise InvalidArgument(f"advice must be refreshed every more than 0 seconds, not {advise_every!r}")
        self.recorder = Recorder(history, interval)
        self._collector = collector
        self._history = history
        self._policy = policy
        self._every = advise_every
        self._clock = clock
        self._advised_at: Optional[float] = None
        self._lock = threading.Lock()
        self._served: Tuple[List[DomainAdvice], List[str]] = ([], [])

    def on_cycle(self, cycle: "Cycle") -> None:
        """Record the cycle, then refresh the advice when it is due; for ``Collector.start``.

        A failing history is logged, not raised: the exporter goes on serving
        the figures, and tries again next cycle.
        """
        try:
            self.recorder.record(cycle)
        except BalloonStatsError as err:
            LOG.error("cannot record this cycle: %s", err)
        now = self._clock()
        if self._advised_at is None or not 0 <= now - self._advised_at < self._every:
            self._advised_at = now
            self.refresh(cycle, now)

    def refresh(self, cycle: "Cycle", now: float) -> None:
        """Advise every domain of ``cycle`` that its collector still holds; serve the answers.

        A domain libvirt cannot describe now (it just stopped) is left out
        until the next refresh; when the history cannot be read, the last
        answers stay served.
        """
        advices: List[DomainAdvice] = []
        hosts = [uri for uri, host in cycle.hosts.items() if host.up]
        for sample in cycle.samples:
            guest = self._collector.guest(sample.uri, sample.uuid)
            if guest is None or sample.uri not in hosts or sample.status is Status.UNREACHABLE:
                continue
            try:
                advices.append(advise_guest(guest, sample.uri, self._history.points, self._policy, now))
            except HistoryError as err:
                LOG.error("cannot advise from the history: %s", err)
                return
            except BalloonStatsError as err:
                LOG.debug("%s: no advice this time: %s", sample.domain, err)
        with self._lock:
            self._served = (advices, hosts)

    @property
    def advices(self) -> List[DomainAdvice]:
        """The advice served now (none before the first refresh)."""
        with self._lock:
            return list(self._served[0])

    def collect(self) -> Iterator["Metric"]:
        """The advice gauges, for the exporter's registry (``prometheus_client``'s collector protocol)."""
        with self._lock:
            advices, hosts = self._served
        yield from advice_families(advices, hosts)

    def describe(self) -> List["Metric"]:
        """Nothing up front: the series depend on the domains running."""
        return []

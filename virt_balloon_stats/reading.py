"""One domain's reading, as data: what a reader remembers, and the halves a sample is made of.

A reading reads QEMU first (:class:`Reading` holds what it learnt), then
libvirt's side (:class:`LibvirtSide`: the collector's bulk record, or calls
of the domain's own), cross-checks the two until they saw the same update
(:func:`crosscheck_same_update`), and makes a
:class:`~virt_balloon_stats.sample.Sample` (:class:`Identity`). The
:class:`~virt_balloon_stats.client.BalloonStats` methods ``begin_sample``
and ``finish_sample`` drive it; this module makes no call of its own but
those it is handed.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, List, Mapping, Optional, Tuple, TypeVar, Union

from virt_balloon_stats.crosscheck import CrossCheck, Result, crosscheck, skipped
from virt_balloon_stats.domxml import BalloonDevice
from virt_balloon_stats.errors import BalloonStatsError, QMPBadReply
from virt_balloon_stats.host import DomainRecord, Guest
from virt_balloon_stats.polling import PollingState
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.qompath import QOMPath
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import (
    LAST_UPDATE,
    RSS,
    GuestStats,
    Status,
    has_libvirt_name,
    memory_stats_from_domstats,
)

__all__ = [
    "CROSSCHECK_ATTEMPTS",
    "NOT_THIS_TURN",
    "DomainMemo",
    "Reading",
    "LibvirtSide",
    "Identity",
    "crosscheck_same_update",
    "interval_seconds",
    "shortened",
    "within",
]

#: How many times to re-read both sides when the guest answered in between.
CROSSCHECK_ATTEMPTS = 3

#: Why a reading of a domain not due for its cross-check has none.
NOT_THIS_TURN = "not compared this cycle: the domains take turns"

_T = TypeVar("_T")


@dataclasses.dataclass
class DomainMemo:
    """What a reader remembers about one incarnation (UUID and id) of a domain.

    A one-shot reading starts with an empty memo; a long-running one keeps a
    memo per domain, so that a steady reading costs one QMP call
    (``guest-stats``), or none between a settled domain's turns
    (:attr:`settled`). The cached interval is re-read every
    :data:`~virt_balloon_stats.client.DEFAULT_REFRESH_SECONDS`, and at once when the figures disagree
    with it: the status would change (a disabled or lengthened interval
    makes fresh figures look stale), or ``last-update`` moved faster than
    the interval allows (it was shortened).
    """

    device: Optional[BalloonDevice] = None
    interval: Optional[int] = None
    refresh_due: float = 0.0
    status: Optional[Status] = None
    last_update: Optional[int] = None
    #: libvirt's balloon size in KiB as last learnt: from a bulk record or
    #: ``query-balloon``, and between them from libvirt's ``BALLOON_CHANGE``
    #: events (the collector hands them on), which is how libvirt itself
    #: keeps it.
    actual_kib: Optional[int] = None
    #: The last conclusive cross-check, shown beside a reading not compared.
    last_check: Optional[CrossCheck] = None
    #: Readings to go before the next comparison; 0: the next one compares.
    compare_in: int = 0
    #: Where QEMU's figures were last read.
    path: Optional[QOMPath] = None
    #: Whether QEMU's last figures named one libvirt has no name for (QEMU
    #: 10 names six): then QEMU is read every time, since only it can say
    #: whether the guest fills them in (a guest whose driver comes back
    #: after a reset does, at once).
    qemu_only: bool = True

    @property
    def settled(self) -> bool:
        """Whether libvirt's figures may stand in for QEMU's in a reading that is not the domain's turn.

        libvirt reads the same ``guest-stats`` through its own monitor; the
        passthrough costs libvirtd about twice what a domain's share of a
        bulk call does. So between its turns a domain whose last comparison
        agreed, whose last reading was read (``status``: a failure clears
        it), whose polling interval and balloon size are known, and whose
        QEMU names no figure libvirt has no name for, is read from libvirt's
        figures alone. When they say something changed (another status,
        updates closer than the interval), QEMU's interval is read again
        first, as in a reading of QEMU; a failed reading clears ``status``,
        so the next one reads QEMU whatever its turn.
        """
        return (
            self.device is not None
            and self.device.present
            and self.interval is not None
            and self.path is not None
            and self.actual_kib is not None
            and self.status is not None
            and not self.qemu_only
            and self.last_check is not None
            and self.last_check.result is Result.AGREE
        )

    def read_qemu(self, path: QOMPath, stats: GuestStats) -> None:
        """Remember where QEMU was read, and whether it names figures libvirt cannot say."""
        self.path = path
        self.qemu_only = not all(has_libvirt_name(name) for name in stats.values)

    def due(self, every: int, phase: int) -> bool:
        """Whether this reading is the domain's turn to be cross-checked (one in ``every``).

        The first reading of an incarnation always compares. The next turn
        comes ``phase % every`` readings later, then one in ``every``: with
        ``phase`` the domain's place on its host, each cycle compares about
        1/``every`` of the domains rather than all of them every
        ``every`` cycles. A reading that was not conclusive (or found a
        mismatch) makes the next one due at once (:meth:`compared`).
        """
        if every <= 1 or self.compare_in <= 0 or self.last_check is None:
            self.compare_in = (phase % every) if self.last_check is None else every - 1
            return True
        self.compare_in -= 1
        return False

    def compared(self, check: CrossCheck) -> None:
        """Remember a comparison: kept if conclusive; anything but agreement is compared again next time."""
        if check.conclusive:
            self.last_check = check
        if check.result is not Result.AGREE:
            self.compare_in = 0


def shortened(before: Optional[int], after: Optional[int], interval: Optional[int]) -> bool:
    """Whether two successive ``last-update`` values came closer than the interval allows."""
    return bool(before and after and interval and 0 < after - before < interval)


def interval_seconds(value: object, guest: Guest) -> int:
    """QEMU's ``guest-stats-polling-interval``, checked: an integer of 0 or more."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QMPBadReply(f"{POLLING_PROPERTY} is not a number of seconds: {value!r}", domain=guest.name)
    return value


@dataclasses.dataclass
class Reading:
    """A sample half made: what :meth:`~virt_balloon_stats.client.BalloonStats.begin_sample` learnt from QEMU.

    Opaque to callers; hand it to :meth:`~virt_balloon_stats.client.BalloonStats.finish_sample`.
    """

    guest: Guest
    source: str
    memo: DomainMemo
    #: Whether libvirt's figures are read and compared (``both``), or the
    #: domain is not due this cycle and libvirt gives only its state.
    compare: bool = True
    refreshed: bool = False
    path: Optional[QOMPath] = None
    stats: Optional[GuestStats] = None
    error: Optional[BalloonStatsError] = None
    #: ``both``, between the domain's turns: QEMU was not read, libvirt's
    #: figures stand in for its own (:attr:`DomainMemo.settled`).
    from_libvirt: bool = False

    @property
    def libvirt_figures(self) -> bool:
        """Whether this reading needs libvirt's balloon figures (else only the state)."""
        return self.source == "libvirt" or (self.source == "both" and (self.compare or self.from_libvirt))


class LibvirtSide:
    """libvirt's view of one domain for one reading, fetched once and only when needed.

    From the collector's bulk record, or else a call of this domain's own
    (``state()``, ``memoryStats()``).
    """

    def __init__(self, guest: Guest, record: Optional[DomainRecord]) -> None:
        self._guest = guest
        self._state: Optional[str] = None
        self._stats: Optional[Mapping[str, int]] = None
        self._record = record

    @property
    def known_state(self) -> str:
        """The state if it was learnt, without asking for it."""
        return self._state or "unknown"

    def state(self) -> str:
        """libvirt's state word."""
        if self._state is None:
            record = self._record
            if record is not None and record.state != "unknown":
                self._state = record.state
            else:
                self._state = self._guest.state()
        return self._state

    def stats(self) -> Mapping[str, int]:
        """``memoryStats()``-shaped figures."""
        if self._stats is None:
            self._stats = self._recorded_stats()
            if self._stats is None:
                self._stats = self._guest.memory_stats()
        return self._stats

    def answers_alone(self, figures: bool) -> bool:
        """Whether :meth:`state` (and :meth:`stats`, with ``figures``) answer from the record alone."""
        record = self._record
        if record is None or record.state == "unknown":
            return False
        if figures and self._stats is None:
            self._stats = self._recorded_stats()
        return not figures or self._stats is not None

    def _recorded_stats(self) -> Optional[Mapping[str, int]]:
        """The record's figures, or ``None`` when it has not all of them."""
        if self._record is None:
            return None
        converted = memory_stats_from_domstats(self._record.balloon)
        # NOWAIT leaves a busy QEMU's domain with only balloon.current and
        # balloon.maximum (from libvirt's definition): then this domain
        # asks on its own. libvirt reports rss, and last-update when there
        # is a balloon, only when it could ask QEMU.
        complete = LAST_UPDATE.libvirt in converted or RSS.libvirt in converted
        return converted if complete else None


class Identity:
    """Who a sample is about: the fields every :class:`Sample` starts with."""

    def __init__(self, uri: str, guest: Guest, source: str) -> None:
        self.uri = uri
        self.guest = guest
        self.source = source

    def sample(
        self,
        *,
        state: str,
        sampled_at: float,
        status: Status,
        message: str,
        polling: PollingState,
        crosscheck: CrossCheck,
        qom_path: Optional[QOMPath] = None,
        stats: Optional[GuestStats] = None,
        actual_bytes: Optional[int] = None,
        libvirt: Optional[Mapping[str, int]] = None,
        error: Optional[BalloonStatsError] = None,
    ) -> Sample:
        return Sample(
            uri=self.uri,
            domain=self.guest.name,
            uuid=self.guest.uuid,
            id=self.guest.id,
            source=self.source,
            state=state,
            sampled_at=sampled_at,
            status=status,
            message=message,
            polling=polling,
            crosscheck=crosscheck,
            qom_path=qom_path,
            stats=stats,
            actual_bytes=actual_bytes,
            libvirt=libvirt,
            error=error,
        )


def crosscheck_same_update(
    path: QOMPath,
    stats: GuestStats,
    actual: Optional[int],
    libvirt_stats: Optional[Mapping[str, int]],
    *,
    reread: Callable[[], Tuple[QOMPath, GuestStats]],
    libvirt: Callable[[], Mapping[str, int]],
) -> Tuple[QOMPath, GuestStats, Mapping[str, int], CrossCheck]:
    """Cross-check QEMU's figures against libvirt's, re-reading both until they saw the same update.

    The guest may answer between the two reads: then ``last-update`` differs
    and the comparison is inconclusive, so libvirt is asked again (and QEMU
    too, after the first attempt), :data:`CROSSCHECK_ATTEMPTS` times at most.

    :param reread: Reads QEMU's ``guest-stats`` again.
    :param libvirt: Reads ``memoryStats()``.
    """
    check = skipped("not attempted")
    for attempt in range(CROSSCHECK_ATTEMPTS):
        if (
            attempt
            or libvirt_stats is None
            or (libvirt_stats.get(LAST_UPDATE.libvirt or "") or None) != stats.last_update
        ):
            if attempt:
                path, stats = reread()
            libvirt_stats = libvirt()
        check = crosscheck(stats, actual, libvirt_stats)
        if check.result is not Result.INCONCLUSIVE:
            break
    assert libvirt_stats is not None
    return path, stats, libvirt_stats, check


def within(timeout: float, name: str, read: Callable[[], _T]) -> Optional[_T]:
    """``read()`` in a daemon thread, waited for ``timeout`` seconds; ``None`` if it has not returned.

    libvirt has no reply timeout for a QEMU that does not answer: the
    thread goes on until it does, and does not keep the process from
    exiting. What ``read`` raises is raised here.
    """
    outcome: List[Union[_T, BaseException]] = []

    def run() -> None:
        try:
            outcome.append(read())
        except BaseException as err:  # raised again in the caller's thread
            outcome.append(err)

    reader = threading.Thread(target=run, name=name, daemon=True)
    reader.start()
    reader.join(timeout)
    if not outcome:
        return None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]

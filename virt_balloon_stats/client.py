"""The public, synchronous API: sample domains, read and set the polling interval.

:class:`BalloonStats` ties the layers together and holds the only state the
package keeps, per instance: the libvirt connection (:class:`Host`), the QMP
client, and the QOM path cache. It is safe to share between threads: libvirt
connections are, the cache locks itself, and nothing else is mutable.

Example, a sysadmin's script::

    from virt_balloon_stats import BalloonStats

    with BalloonStats.open() as client:
        sample = client.sample("web1", timeout=5)
        print(sample.domain, sample.get("stat-free-memory"), sample.status.value)

Many domains at once are the collector's, one layer up: the package's
``BalloonStats`` (:mod:`virt_balloon_stats.facade`) is this class plus
``sample_many()``, a collector cycle over its connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from virt_balloon_stats.crosscheck import skipped
from virt_balloon_stats.domxml import BalloonDevice, parse_balloon
from virt_balloon_stats.errors import (
    BalloonStatsError,
    ConnectionFailed,
    InvalidArgument,
    NoBalloonDevice,
    QMPExecuteError,
)
from virt_balloon_stats.host import DomainRecord, Guest, Host
from virt_balloon_stats.polling import PollingState, validate_interval
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.qompath import QOMPath, QOMPathCache, by_alias
from virt_balloon_stats.reading import NOT_THIS_TURN, DomainMemo, Identity, LibvirtSide, Reading
from virt_balloon_stats.reading import crosscheck_same_update
from virt_balloon_stats.reading import interval_seconds, shortened, within
from virt_balloon_stats.sample import SOURCES, Sample, not_read, unanswered
from virt_balloon_stats.stats import (
    ACTUAL,
    DEFAULT_GRACE_SECONDS,
    GuestStats,
    Status,
    classify,
    parse_guest_stats,
    stats_from_libvirt,
)
from virt_balloon_stats.transport import QMPClient

__all__ = ["BalloonStats", "DomainMemo", "Reading", "GuestRef", "DEFAULT_REFRESH_SECONDS"]

#: A domain given as a looked-up :class:`Guest` or as virsh names it.
GuestRef = Union[Guest, str]

#: :meth:`BalloonStats.open` and ``with`` give back the class they are called on.
_Self = TypeVar("_Self", bound="BalloonStats")

#: Worker threads of a collector: QMP calls to different domains run in
#: parallel inside libvirtd, each on a connection of its own (see
#: :mod:`~virt_balloon_stats.lanes`). On the testbed (2 cores, 30 domains) 8
#: threads made a steady cycle 2 to 3 % faster than 4, and 3 slower than 4 by 5 %.
DEFAULT_WORKERS = 8

#: Seconds a one-shot reading waits for a domain before calling it unresponsive.
DEFAULT_TIMEOUT = 10.0

#: Seconds between re-reads of QEMU's polling interval (and one query-balloon
#: to cross-check ``actual``) for a domain whose figures give no reason to.
#: The figures themselves trigger a re-read at once when a change behind our
#: back would matter (see :class:`DomainMemo`).
DEFAULT_REFRESH_SECONDS = 300.0


class _NeedsACall(Exception):
    """A second half begun without calls (:meth:`BalloonStats.finish_from_record`) needs one after all."""


def _compares(memo: DomainMemo, crosscheck: bool) -> bool:
    """Whether a reading compares: when asked to, and while nothing else knows libvirt's balloon size."""
    return crosscheck or memo.actual_kib is None


def _stands_in(source: str, memo: DomainMemo, compare: bool) -> bool:
    """Whether libvirt's figures stand in for QEMU's in this reading (``both``, not compared, settled)."""
    return source == "both" and not compare and memo.settled


class BalloonStats:
    """Balloon statistics of the domains behind one libvirt connection.

    :param host: The connection.
    :param qmp: The QMP client; defaults to the libvirt passthrough.
    :param grace: Seconds beyond ``2 x interval`` before figures are stale.
    :param refresh: Seconds between re-reads of a cached polling interval.
    :param clock: Returns epoch seconds; tests pin it.
    :param monotonic: Measures time between readings; tests pin it.
    """

    def __init__(
        self,
        host: Host,
        qmp: Optional[QMPClient] = None,
        *,
        grace: float = DEFAULT_GRACE_SECONDS,
        refresh: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(grace, (int, float)) and 0 <= grace < float("inf")):
            raise InvalidArgument(f"grace must be 0 or more seconds, not {grace}")
        self.host = host
        self.qmp = qmp or QMPClient()
        self.grace = grace
        self.refresh = refresh
        self.clock = clock
        self.monotonic = monotonic
        self.paths = QOMPathCache()

    @classmethod
    def open(
        cls: Type[_Self],
        uri: Optional[str] = None,
        *,
        readonly: bool = False,
        grace: float = DEFAULT_GRACE_SECONDS,
    ) -> _Self:
        """Connect as virsh would (``LIBVIRT_DEFAULT_URI``, else ``qemu:///system``).

        :raise ConnectionFailed: When libvirt cannot connect.
        """
        return cls(Host.open(uri, readonly=readonly), grace=grace)

    def close(self) -> None:
        """Close the libvirt connection."""
        self.host.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rpc_counts(self) -> Dict[str, int]:
        """libvirt round trips made so far, by call name."""
        return self.host.counter.snapshot()

    # -- domains -----------------------------------------------------------

    def guest(self, ref: GuestRef) -> Guest:
        """Look a domain up by name, UUID or id (as virsh does), or pass a Guest through.

        :raise DomainNotFound: When nothing matches.
        """
        return ref if isinstance(ref, Guest) else self.host.lookup(ref)

    def guests(self, refs: Optional[Sequence[GuestRef]] = None) -> List[Guest]:
        """The given domains, or every running domain when ``refs`` is ``None``.

        An empty sequence means no domain: a caller whose every name failed
        to resolve must not end up acting on the whole host.
        """
        if refs is None:
            return self.host.running_guests()
        return [self.guest(r) for r in refs]

    def balloon_device(self, ref: GuestRef, *, inactive: bool = False) -> BalloonDevice:
        """The balloon device as libvirt's live (or persistent) XML describes it."""
        return parse_balloon(self.guest(ref).xml(inactive=inactive))

    def qom_path(self, ref: GuestRef) -> QOMPath:
        """Where the balloon lives in QOM (cached per domain UUID and id).

        :raise NoBalloonDevice: When the domain has no balloon.
        :raise QOMPathNotFound: When it cannot be found.
        """
        guest = self.guest(ref)
        return self.paths.resolve(self.qmp, guest, self.balloon_device(guest))

    def _qom_get(self, guest: Guest, device: BalloonDevice, prop: str) -> Tuple[QOMPath, object]:
        """``qom-get`` on the balloon; re-resolves once if QEMU lost the cached path.

        Before the path is known, a device with an alias is tried at
        ``/machine/peripheral/<alias>`` straight away: the ``qom-get`` itself
        confirms it, and only when QEMU says no is the tree listed.
        """
        if self.paths.get(guest) is None:
            guess = by_alias(device)
            if guess is not None:
                try:
                    value = self.qmp.qom_get(guest, guess.path, prop)
                except QMPExecuteError as err:
                    # DeviceNotFound: not there; GenericError "Property ... not
                    # found": not a balloon. Either way, look properly.
                    if err.error_class not in ("DeviceNotFound", "GenericError"):
                        raise
                else:
                    self.paths.put(guest, guess)
                    return guess, value
        path = self.paths.resolve(self.qmp, guest, device)
        try:
            return path, self.qmp.qom_get(guest, path.path, prop)
        except QMPExecuteError as err:
            if err.error_class != "DeviceNotFound":
                raise
            self.paths.forget(guest)
            path = self.paths.resolve(self.qmp, guest, device)
            return path, self.qmp.qom_get(guest, path.path, prop)

    # -- polling interval ----------------------------------------------------

    def polling(self, ref: GuestRef) -> PollingState:
        """QEMU's live interval and libvirt's period, side by side.

        For a domain that is not running only libvirt's persistent period is known.
        """
        guest = self.guest(ref)
        if guest.id is None:
            device = self.balloon_device(guest, inactive=True)
            return PollingState(qemu_interval=None, libvirt_period=device.stats_period)
        return self._live_polling(guest, self.balloon_device(guest))

    def _live_polling(self, guest: Guest, device: BalloonDevice) -> PollingState:
        """:meth:`polling` of a running domain whose live XML is already parsed."""
        if not device.present:
            raise NoBalloonDevice("the domain has no balloon device, so no stats polling", domain=guest.name)
        _, value = self._qom_get(guest, device, POLLING_PROPERTY)
        return PollingState(qemu_interval=interval_seconds(value, guest), libvirt_period=device.stats_period)

    def set_polling_interval(
        self,
        ref: GuestRef,
        seconds: object,
        *,
        via: str = "libvirt",
        live: bool = True,
        config: bool = False,
    ) -> PollingState:
        """Set, change or disable (0) polling, then read QEMU's value back.

        :param via: ``libvirt`` (``setMemoryStatsPeriod``; keeps libvirt's XML
            true) or ``qmp`` (``qom-set``, as QEMU's doc describes; libvirt's
            XML then drifts, which the result reports).
        :param live: Change the running domain.
        :param config: Change the persistent definition (``libvirt`` route only).
        :raise InvalidArgument: For a bad value or combination; nothing was sent.
        """
        value = validate_interval(seconds, via=via)
        if not live and not config:
            raise InvalidArgument("nothing to change: ask for live, config, or both")
        if via == "qmp" and config:
            raise InvalidArgument(
                "a persistent (config) change needs the libvirt route; QMP only reaches the running QEMU"
            )
        guest = self.guest(ref)
        before = self._live_polling(guest, self.balloon_device(guest)) if live else None
        return self._set(guest, value, via=via, live=live, config=config, before=before)

    def _set(
        self, guest: Guest, value: int, *, via: str, live: bool, config: bool, before: Optional[PollingState]
    ) -> PollingState:
        """Apply a validated interval; ``before`` is the live state already read, if any."""
        if via == "libvirt":
            guest.set_memory_stats_period(value, live=live, config=config)
        else:
            device = self.balloon_device(guest)
            path = self.paths.resolve(self.qmp, guest, device)
            self.qmp.set_polling_interval(guest, path.path, value)
        after = self.polling(guest)
        if config and not live and guest.id is not None:
            after = PollingState(after.qemu_interval, self.balloon_device(guest, inactive=True).stats_period)
        changed_from = before.qemu_interval if before is not None else None
        return PollingState(after.qemu_interval, after.libvirt_period, changed_from=changed_from)

    def rearm(self, ref: GuestRef, *, via: str = "libvirt") -> PollingState:
        """Set QEMU's current interval again, which re-arms a stalled stats timer.

        QEMU re-arms its timer only when the guest answers; a guest that
        missed one request (driver reloaded, guest was stuck) stays silent
        until someone sets the interval again.

        :raise InvalidArgument: When polling is disabled (nothing to re-arm).
        """
        guest = self.guest(ref)
        before = self._live_polling(guest, self.balloon_device(guest))
        if not before.qemu_interval:
            raise InvalidArgument(
                "polling is disabled, so there is no timer to re-arm; enable it with a period",
                domain=guest.name,
            )
        value = validate_interval(before.qemu_interval, via=via)
        return self._set(guest, value, via=via, live=True, config=False, before=before)

    # -- sampling ------------------------------------------------------------

    def sample(
        self,
        ref: GuestRef,
        source: str = "both",
        *,
        memo: Optional[DomainMemo] = None,
        timeout: Optional[float] = None,
    ) -> Sample:
        """Read one domain's figures; failures become an ``unreachable`` sample.

        :param source: One of :data:`~virt_balloon_stats.sample.SOURCES`.
        :param memo: What an earlier reading of this incarnation of the
            domain learnt (parsed XML, polling interval); a long-running
            reader keeps one per domain so a steady reading is one QMP call.
        :param timeout: Seconds to wait; a domain not read by then (a QEMU
            stopped or hung: libvirt has no reply timeout for its monitor) is
            ``unresponsive``. The reading goes on in a daemon thread until
            QEMU answers, and does not keep the process from exiting. A reader
            that asks again and again should use a
            :class:`~virt_balloon_stats.collector.Collector`, which never has
            more than one call out to a domain. ``None`` waits as long as
            libvirt does.
        :raise InvalidArgument: For an unknown source or a bad timeout.
        :raise DomainNotFound: When a name does not match (a Guest never fails here).
        """
        if timeout is None:
            return self.finish_sample(self.begin_sample(ref, source, memo=memo))
        if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise InvalidArgument(f"timeout must be more than 0 seconds, not {timeout}")
        guest = self.guest(ref)  # a lookup in libvirtd: QEMU is not asked
        began = self.monotonic()
        sample = within(timeout, f"vbs-sample-{guest.name}", lambda: self.sample(guest, source, memo=memo))
        if sample is None:
            return not_read(
                self.host.uri,
                guest.name,
                guest.uuid,
                guest.id,
                source=source,
                sampled_at=self.clock(),
                status=Status.UNRESPONSIVE,
                message=unanswered(self.monotonic() - began),
            )
        return sample

    def begin_sample(
        self,
        ref: GuestRef,
        source: str = "both",
        *,
        memo: Optional[DomainMemo] = None,
        crosscheck: bool = True,
    ) -> Reading:
        """The first half of :meth:`sample`: everything asked of QEMU, nothing of libvirt's figures.

        A collector reads QEMU for every domain first, then libvirt's side of
        all those that answered in one bulk call, then finishes each with
        :meth:`finish_sample`. A domain whose QEMU hangs never gets past this
        half, so it is never part of the bulk call (which it would block).
        Never raises for a domain's failure: it is kept for :meth:`finish_sample`.

        :param crosscheck: With ``both``: ``False`` reads libvirt's state
            only, not its figures, and takes the balloon size from ``memo``
            (kept up to date by libvirt's events), so QEMU is asked once and
            libvirt's monitor not at all. Ignored while ``memo`` has no
            balloon size yet.
        :raise InvalidArgument: For an unknown source.
        :raise DomainNotFound: When a name does not match.
        """
        if source not in SOURCES:
            raise InvalidArgument(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
        guest = self.guest(ref)
        memo = memo if memo is not None else DomainMemo()
        reading = Reading(guest, source, memo, compare=_compares(memo, crosscheck))
        try:
            if memo.device is None:
                memo.device = self.balloon_device(guest)
            if _stands_in(source, memo, reading.compare):
                reading.from_libvirt = True  # between its turns: libvirt's figures, in finish_sample
            elif memo.device.present and source != "libvirt":
                # QEMU first; libvirt's side comes in finish_sample.
                reading.refreshed = memo.interval is None or self.monotonic() >= memo.refresh_due
                if reading.refreshed:
                    self._read_interval(guest, memo)
                reading.path, value = self._qom_get(guest, memo.device, "guest-stats")
                reading.stats = parse_guest_stats(value)
        except BalloonStatsError as err:
            reading.error = err
        return reading

    @staticmethod
    def begin_calls(source: str, memo: DomainMemo, crosscheck: bool = True) -> bool:
        """Whether :meth:`begin_sample` would make a call: not once the device is known and QEMU is not read.

        That is the ``libvirt`` source's steady reading, a domain without a
        balloon, and ``both`` between a settled domain's turns
        (``crosscheck`` false, :attr:`DomainMemo.settled`): everything it
        shows then comes in the collector's bulk call, so a collector needs
        no worker for its first half.
        """
        if memo.device is None:
            return True
        compare = _compares(memo, crosscheck)
        return memo.device.present and source != "libvirt" and not _stands_in(source, memo, compare)

    def finish_from_record(self, reading: Reading, record: DomainRecord) -> Optional[Sample]:
        """:meth:`finish_sample` when a bulk record is all it needs, without a call; else ``None``.

        A reading that did not read QEMU (``libvirt``, no balloon, or ``both``
        between a settled domain's turns) is made of the record's state and
        figures alone when the record has them all and nothing says QEMU's
        interval must be read again, so a collector finishes it where the
        record arrives instead of handing it to a worker. Anything else, a
        record that ``NOWAIT`` left short included, gives ``None``:
        :meth:`finish_sample` then makes its calls, in a worker.
        """
        memo = reading.memo
        if reading.error is not None or reading.stats is not None or memo.device is None:
            return None
        side = LibvirtSide(reading.guest, record)
        if not side.answers_alone(figures=reading.source in ("libvirt", "both")):
            return None
        try:
            return self._finish(reading, side, Identity(self.host.uri, reading.guest, reading.source), False)
        except (BalloonStatsError, _NeedsACall):
            return None  # finish_sample makes the call, or knows how to report the failure

    def finish_sample(self, reading: Reading, record: Optional[DomainRecord] = None) -> Sample:
        """The second half of :meth:`sample`: libvirt's side, the cross-check, the status.

        :param record: This domain's entry of a bulk call made after
            :meth:`begin_sample` (its state and libvirt's figures); without
            it, the state and figures are asked of libvirt for this domain.
        """
        guest, memo = reading.guest, reading.memo
        base = Identity(self.host.uri, guest, reading.source)
        side = LibvirtSide(guest, record)
        try:
            if reading.error is not None:
                raise reading.error
            return self._finish(reading, side, base)
        except BalloonStatsError as err:
            memo.status = None  # not read: QEMU is read next time, whatever the turn
            if side.known_state == "unknown" and not isinstance(err, ConnectionFailed):
                # Cheap (no job on QEMU), and says "shutoff" when that is why it failed.
                with contextlib.suppress(BalloonStatsError):
                    side.state()
            return base.sample(
                state=side.known_state,
                sampled_at=self.clock(),
                status=Status.UNREACHABLE,
                message=f"{err}",
                polling=PollingState(None, memo.device.stats_period if memo.device else None),
                crosscheck=skipped("the figures could not be read"),
                error=err,
            )

    def _finish(self, reading: Reading, side: LibvirtSide, base: Identity, may_call: bool = True) -> Sample:
        guest, memo, source = reading.guest, reading.memo, reading.source
        device = memo.device
        assert device is not None
        use_libvirt = source in ("libvirt", "both")
        if reading.from_libvirt:
            return self._finish_between_turns(reading, side, base, may_call)
        if reading.stats is None:  # no balloon, or the libvirt source: libvirt's side only
            figures = side.stats() if use_libvirt else None
            state = side.state()
            now = self.clock()
            stats: Optional[GuestStats] = None
            libvirt_actual: Optional[int] = None
            if not device.present:
                status, message = classify(
                    state=state, has_balloon=False, interval=None, last_update=None, now=now
                )
                why = "no balloon device"
            else:
                assert figures is not None
                stats, libvirt_actual = stats_from_libvirt(figures)
                status, message = self._classify(state, device.stats_period, stats, now)
                why = "source is libvirt; the cross-check needs both"
            return base.sample(
                state=state,
                sampled_at=now,
                status=status,
                message=message,
                polling=PollingState(None, device.stats_period),
                crosscheck=skipped(why),
                stats=stats,
                actual_bytes=libvirt_actual,
                libvirt=figures,
            )
        path, stats = reading.path, reading.stats
        assert path is not None
        compare = reading.libvirt_figures  # both, and this domain's turn (libvirt's reads take another path)
        maybe_stats = side.stats() if compare else None
        state = side.state()
        # libvirt's own balloon size (kept exact from QEMU's BALLOON_CHANGE
        # events) stands in for query-balloon between refreshes: from the
        # bulk record, or, in a turn without libvirt's figures, as the memo
        # last learnt it (the collector applies the same events to it).
        if maybe_stats:
            current = maybe_stats.get(ACTUAL.libvirt or "")
        else:
            current = memo.actual_kib if use_libvirt else None
        if reading.refreshed or current is None:
            actual: int = self.qmp.query_balloon(guest)
            checked_actual: Optional[int] = actual
            current = ACTUAL.to_libvirt(actual)
        else:
            actual, checked_actual = ACTUAL.from_libvirt(current), None
        if use_libvirt:
            memo.actual_kib = current
        check = skipped("source is qmp; the cross-check needs both")
        libvirt_stats: Optional[Mapping[str, int]] = None
        if compare:
            path, stats, libvirt_stats, check = crosscheck_same_update(
                path,
                stats,
                checked_actual,
                maybe_stats,
                reread=lambda: self._reread_stats(guest, device),
                libvirt=guest.memory_stats,
            )
        elif use_libvirt:
            check = skipped(NOT_THIS_TURN, previous=memo.last_check)
        now = self.clock()
        if compare:
            check = dataclasses.replace(check, at=now)
            memo.compared(check)
        status, message = self._status(reading, state, stats, now, confirm=not reading.refreshed)
        memo.read_qemu(path, stats)
        return base.sample(
            state=state,
            sampled_at=now,
            status=status,
            message=message,
            polling=PollingState(memo.interval, device.stats_period),
            crosscheck=check,
            qom_path=path,
            stats=stats,
            actual_bytes=actual,
            libvirt=libvirt_stats,
        )

    def _finish_between_turns(
        self, reading: Reading, side: LibvirtSide, base: Identity, may_call: bool = True
    ) -> Sample:
        """``both`` between a settled domain's turns: libvirt's figures stand in for QEMU's.

        They are the same ``guest-stats`` read through libvirt's monitor, as
        the domain's last comparison found, and libvirt names every one its
        QEMU does. The sample shows them as a reading of QEMU would (its
        path, its interval), and says it was not compared. When the figures say
        something changed (another status, updates closer than the
        interval), QEMU's live interval is read first, as in a reading of
        QEMU (``may_call`` false: :class:`_NeedsACall` instead).
        """
        memo, device = reading.memo, reading.memo.device
        assert device is not None and memo.path is not None
        figures = side.stats()
        state = side.state()
        stats, actual = stats_from_libvirt(figures)
        if actual is not None:
            memo.actual_kib = ACTUAL.to_libvirt(actual)
        now = self.clock()
        status, message = self._status(reading, state, stats, now, confirm=True, may_call=may_call)
        return base.sample(
            state=state,
            sampled_at=now,
            status=status,
            message=message,
            polling=PollingState(memo.interval, device.stats_period),
            crosscheck=skipped(NOT_THIS_TURN, previous=memo.last_check),
            qom_path=memo.path,
            stats=stats,
            actual_bytes=actual,
            libvirt=figures,
        )

    def _status(
        self, reading: Reading, state: str, stats: GuestStats, now: float, *, confirm: bool,
        may_call: bool = True,
    ) -> Tuple[Status, str]:
        """The reading's status, remembered; with ``confirm``, against QEMU's live interval when in doubt.

        When the figures say something changed (another status than the
        last, updates closer than the interval allows), the cached interval
        may have been changed behind our back: it is read again first. That
        is a call: without ``may_call`` (a second half finished where its
        record arrived) :class:`_NeedsACall` hands the reading to a worker.
        """
        memo = reading.memo
        status, message = self._classify(state, memo.interval, stats, now)
        if confirm and (
            status is not memo.status or shortened(memo.last_update, stats.last_update, memo.interval)
        ):
            if not may_call:
                raise _NeedsACall()
            self._read_interval(reading.guest, memo)
            status, message = self._classify(state, memo.interval, stats, now)
        memo.status, memo.last_update = status, stats.last_update
        return status, message

    def _read_interval(self, guest: Guest, memo: DomainMemo) -> None:
        """Read QEMU's live polling interval into ``memo`` and schedule the next read."""
        assert memo.device is not None
        _, value = self._qom_get(guest, memo.device, POLLING_PROPERTY)
        memo.interval = interval_seconds(value, guest)
        memo.refresh_due = self.monotonic() + self.refresh

    def _classify(
        self, state: str, interval: Optional[int], stats: GuestStats, now: float
    ) -> Tuple[Status, str]:
        return classify(
            state=state,
            has_balloon=True,
            interval=interval,
            last_update=stats.last_update,
            now=now,
            grace=self.grace,
        )

    def _reread_stats(self, guest: Guest, device: BalloonDevice) -> Tuple[QOMPath, GuestStats]:
        path, value = self._qom_get(guest, device, "guest-stats")
        return path, parse_guest_stats(value)

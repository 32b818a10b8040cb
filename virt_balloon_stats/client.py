"""The public, synchronous API: sample domains, read and set the polling interval.

:class:`BalloonStats` ties the layers together and holds the only state the
package keeps, per instance: the libvirt connection (:class:`Host`), the QMP
client, and the QOM path cache. It is safe to share between threads: libvirt
connections are, the cache locks itself, and nothing else is mutable.

Example, a sysadmin's script::

    from virt_balloon_stats import BalloonStats

    with BalloonStats.open() as client:
        for sample in client.sample_many():
            print(sample.domain, sample.get("stat-free-memory"), sample.status.value)
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from virt_balloon_stats.crosscheck import CrossCheck, Result, crosscheck, skipped
from virt_balloon_stats.domxml import BalloonDevice, parse_balloon
from virt_balloon_stats.errors import (
    BalloonStatsError,
    InvalidArgument,
    NoBalloonDevice,
    QMPBadReply,
    QMPExecuteError,
)
from virt_balloon_stats.host import Guest, Host
from virt_balloon_stats.polling import PollingState, validate_interval
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.qompath import QOMPath, QOMPathCache
from virt_balloon_stats.sample import SOURCES, Sample
from virt_balloon_stats.stats import (
    DEFAULT_GRACE_SECONDS,
    LAST_UPDATE,
    GuestStats,
    Status,
    classify,
    memory_stats_from_domstats,
    parse_guest_stats,
    stats_from_libvirt,
)
from virt_balloon_stats.transport import QMPClient

__all__ = ["BalloonStats", "GuestRef"]

#: A domain given as a looked-up :class:`Guest` or as virsh names it.
GuestRef = Union[Guest, str]

#: How many times to re-read both sides when the guest answered in between.
CROSSCHECK_ATTEMPTS = 3

#: Worker threads for :meth:`BalloonStats.sample_many`: QMP calls to different
#: domains run in parallel inside libvirtd; more threads than this only queue.
DEFAULT_WORKERS = 8


class BalloonStats:
    """Balloon statistics of the domains behind one libvirt connection.

    :param host: The connection.
    :param qmp: The QMP client; defaults to the libvirt passthrough.
    :param grace: Seconds beyond ``2 x interval`` before figures are stale.
    :param clock: Returns epoch seconds; tests pin it.
    """

    def __init__(
        self,
        host: Host,
        qmp: Optional[QMPClient] = None,
        *,
        grace: float = DEFAULT_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if grace < 0:
            raise InvalidArgument(f"grace must be 0 or more seconds, not {grace}")
        self.host = host
        self.qmp = qmp or QMPClient()
        self.grace = grace
        self.clock = clock
        self.paths = QOMPathCache()

    @classmethod
    def open(
        cls, uri: Optional[str] = None, *, readonly: bool = False, grace: float = DEFAULT_GRACE_SECONDS
    ) -> "BalloonStats":
        """Connect as virsh would (``LIBVIRT_DEFAULT_URI``, else ``qemu:///system``).

        :raise ConnectionFailed: When libvirt cannot connect.
        """
        return cls(Host.open(uri, readonly=readonly), grace=grace)

    def close(self) -> None:
        """Close the libvirt connection."""
        self.host.close()

    def __enter__(self) -> "BalloonStats":
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
        """``qom-get`` on the balloon; re-resolves once if QEMU lost the cached path."""
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
        return PollingState(qemu_interval=_interval(value, guest), libvirt_period=device.stats_period)

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
        self, ref: GuestRef, source: str = "both", *, prefetched: Optional[Mapping[str, int]] = None
    ) -> Sample:
        """Read one domain's figures; failures become an ``unreachable`` sample.

        :param source: One of :data:`~virt_balloon_stats.sample.SOURCES`.
        :param prefetched: libvirt's figures for this domain, already read in
            bulk (as :meth:`sample_many` does); skips one ``memoryStats()``.
        :raise InvalidArgument: For an unknown source.
        :raise DomainNotFound: When a name does not match (a Guest never fails here).
        """
        if source not in SOURCES:
            raise InvalidArgument(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
        guest = self.guest(ref)
        base = _Identity(self.host.uri, guest, source)
        state = "unknown"
        libvirt_period: Optional[int] = None
        try:
            state = guest.state()
            device = self.balloon_device(guest)
            libvirt_period = device.stats_period
            return self._sample(guest, device, state, source, base, prefetched)
        except BalloonStatsError as err:
            return base.sample(
                state=state,
                sampled_at=self.clock(),
                status=Status.UNREACHABLE,
                message=f"{err}",
                polling=PollingState(None, libvirt_period),
                crosscheck=skipped("the figures could not be read"),
                error=err,
            )

    def _sample(
        self,
        guest: Guest,
        device: BalloonDevice,
        state: str,
        source: str,
        base: "_Identity",
        prefetched: Optional[Mapping[str, int]],
    ) -> Sample:
        use_qmp = source in ("qmp", "both")
        use_libvirt = source in ("libvirt", "both")
        libvirt_stats: Optional[Mapping[str, int]] = None
        if use_libvirt:
            libvirt_stats = prefetched if prefetched is not None else guest.memory_stats()
        if not device.present:
            status, message = classify(
                state=state, has_balloon=False, interval=None, last_update=None, now=self.clock()
            )
            return base.sample(
                state=state,
                sampled_at=self.clock(),
                status=status,
                message=message,
                polling=PollingState(None, device.stats_period),
                libvirt=libvirt_stats,
                crosscheck=skipped("no balloon device"),
            )
        path: Optional[QOMPath] = None
        interval: Optional[int] = None
        actual: Optional[int] = None
        check = skipped(f"source is {source}; the cross-check needs both")
        if use_qmp:
            path, value = self._qom_get(guest, device, POLLING_PROPERTY)
            interval = _interval(value, guest)
            actual = self.qmp.query_balloon(guest)
            stats, libvirt_stats, check = self._read_guest_stats(
                guest, device, actual, libvirt_stats, use_libvirt
            )
        else:
            assert libvirt_stats is not None
            stats, actual = stats_from_libvirt(libvirt_stats)
        now = self.clock()
        status, message = classify(
            state=state,
            has_balloon=True,
            interval=interval if use_qmp else device.stats_period,
            last_update=stats.last_update,
            now=now,
            grace=self.grace,
        )
        return base.sample(
            state=state,
            sampled_at=now,
            status=status,
            message=message,
            polling=PollingState(interval, device.stats_period),
            crosscheck=check,
            qom_path=path,
            stats=stats,
            actual_bytes=actual,
            libvirt=libvirt_stats,
        )

    def _read_guest_stats(
        self,
        guest: Guest,
        device: BalloonDevice,
        actual: int,
        libvirt_stats: Optional[Mapping[str, int]],
        use_libvirt: bool,
    ) -> Tuple[GuestStats, Optional[Mapping[str, int]], CrossCheck]:
        """Read guest-stats, and cross-check against libvirt until both saw the same update."""
        _, value = self._qom_get(guest, device, "guest-stats")
        stats = parse_guest_stats(value)
        if not use_libvirt:
            return stats, None, skipped("source is qmp; the cross-check needs both")
        check = skipped("not attempted")
        for attempt in range(CROSSCHECK_ATTEMPTS):
            if (
                attempt
                or libvirt_stats is None
                or (libvirt_stats.get(LAST_UPDATE.libvirt or "") or None) != stats.last_update
            ):
                if attempt:
                    _, value = self._qom_get(guest, device, "guest-stats")
                    stats = parse_guest_stats(value)
                libvirt_stats = guest.memory_stats()
            check = crosscheck(stats, actual, libvirt_stats)
            if check.result is not Result.INCONCLUSIVE:
                break
        return stats, libvirt_stats, check

    def sample_many(
        self,
        refs: Optional[Sequence[GuestRef]] = None,
        source: str = "both",
        *,
        workers: int = DEFAULT_WORKERS,
    ) -> List[Sample]:
        """Sample several domains (every running one when ``refs`` is ``None``), in parallel.

        libvirt's figures for all of them come from one bulk call with
        ``NOWAIT``, so a hung QEMU costs its own sample, not everyone's.
        Results come back in the order asked.
        """
        if workers < 1:
            raise InvalidArgument(f"workers must be 1 or more, not {workers}")
        guests = self.guests(refs)
        if refs is None:
            self.paths.retain(guests)  # every running domain: forget the ones gone
        bulk: Dict[str, Mapping[str, int]] = {}
        if source in ("libvirt", "both") and guests:
            try:
                raw = self.host.balloon_stats(guests)
            except BalloonStatsError:
                raw = {}  # each domain falls back to its own memoryStats() call
            converted = {uuid: memory_stats_from_domstats(rec) for uuid, rec in raw.items()}
            # A domain whose QEMU was busy comes back without its guest figures
            # (NOWAIT): leave it out, so it gets its own memoryStats() call.
            bulk = {uuid: rec for uuid, rec in converted.items() if LAST_UPDATE.libvirt in rec}
        if len(guests) <= 1:
            return [self.sample(g, source, prefetched=bulk.get(g.uuid)) for g in guests]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(guests))) as pool:
            return list(pool.map(lambda g: self.sample(g, source, prefetched=bulk.get(g.uuid)), guests))


def _interval(value: object, guest: Guest) -> int:
    """QEMU's ``guest-stats-polling-interval``, checked: an integer of 0 or more."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QMPBadReply(f"{POLLING_PROPERTY} is not a number of seconds: {value!r}", domain=guest.name)
    return value


class _Identity:
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

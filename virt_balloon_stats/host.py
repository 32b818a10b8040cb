"""The libvirt edge: connections, domain look-up, and error translation.

This module, :mod:`virt_balloon_stats.events` (the event loop) and
:mod:`virt_balloon_stats.transport` (the passthrough) are the only ones that
touch libvirt. libvirt's camelCase stays here; the rest of the package sees
:class:`Host` and :class:`Guest`, snake_case methods and plain values.

Every libvirt call goes through :func:`libvirt_call`, which does two things
in one place: it counts the call on the connection's :class:`RPCCounter`
(so a collector or a benchmark can say exactly how many round trips a cycle
cost), and it turns ``libvirt.libvirtError`` into this package's exceptions
by error code. Nothing above this layer catches ``libvirtError``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import libvirt

from virt_balloon_stats.errors import (
    ConnectionFailed,
    DomainNotFound,
    DomainNotRunning,
    InvalidArgument,
    LibvirtFailure,
    OperationDenied,
    OperationTimedOut,
    UnsupportedHypervisor,
)
from virt_balloon_stats.lanes import Lanes

if TYPE_CHECKING:  # imported where used: a one-domain reading needs no events
    from virt_balloon_stats.events import HostEvent

__all__ = [
    "DEFAULT_URI",
    "default_uri",
    "RPCCounter",
    "libvirt_call",
    "translate_error",
    "Guest",
    "Host",
    "DomainRecord",
    "silence_libvirt_stderr",
]

#: The URI virsh uses when neither ``-c`` nor ``LIBVIRT_DEFAULT_URI`` is given
#: (as root; we do not guess ``qemu:///session`` for other users).
DEFAULT_URI = "qemu:///system"

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

_CONNECTION_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)


@dataclasses.dataclass(frozen=True)
class DomainRecord:
    """One domain's entry of a bulk ``virDomainListGetStats`` call.

    :ivar state: libvirt's state word (``running``, ``paused``...).
    :ivar balloon: The ``balloon.*`` members as libvirt gave them; empty when
        libvirt skipped a busy domain (``NOWAIT``).
    """

    state: str
    balloon: Mapping[str, int]


def default_uri() -> str:
    """Return the URI virsh would use: ``LIBVIRT_DEFAULT_URI``, else ``qemu:///system``."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


class RPCCounter:
    """Thread-safe count of libvirt round trips, by call name.

    One per :class:`Host`; shared by every thread using that connection.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, call: str) -> None:
        """Count one call named ``call``."""
        with self._lock:
            self._counts[call] += 1

    def snapshot(self) -> Dict[str, int]:
        """Return the counts so far, by call name."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        """Return the number of calls so far."""
        with self._lock:
            return sum(self._counts.values())


def translate_error(err: libvirt.libvirtError, *, call: str, domain: Optional[str]) -> LibvirtFailure:
    """Map one ``libvirtError`` to this package's exception, by error code.

    The message says what went wrong and what to do; libvirt's own text is
    kept in ``libvirt_message`` and appended in parentheses.
    """
    code = err.get_error_code()
    text = str(err)
    fields: Dict[str, Any] = {"domain": domain, "code": code, "libvirt_message": text}
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(
            f"domain not found; 'virsh list --all' shows the defined domains ({text})", **fields
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in text:
        return DomainNotRunning(
            f"domain is not running; start it, or pick a running one with 'virsh list' ({text})",
            **fields,
        )
    if code == libvirt.VIR_ERR_OPERATION_DENIED:
        if call == "qemuMonitorCommand":
            hint = (
                "the QMP passthrough needs a read-write, privileged connection (root, not "
                "--readonly); '--source libvirt' works on a read-only connection"
            )
        else:
            hint = f"{call} needs a read-write, privileged connection (root, not --readonly)"
        return OperationDenied(f"{hint} ({text})", **fields)
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return UnsupportedHypervisor(
            f"{call} is not supported by this connection's driver; balloon stats through QMP "
            f"need libvirt's QEMU driver, e.g. qemu:///system ({text})",
            **fields,
        )
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return OperationTimedOut(
            f"libvirt timed out; QEMU may be hung or busy, try again later ({text})", **fields
        )
    if code == libvirt.VIR_ERR_SYSTEM_ERROR and err.get_error_domain() == libvirt.VIR_FROM_QEMU:
        # QEMU's monitor went away during the call ("Unable to read from monitor:
        # Connection reset by peer", seen on the testbed when a domain is
        # destroyed mid-call): the domain stopped, libvirt's connection is fine.
        return DomainNotRunning(
            f"the domain stopped while it was being read; QEMU's monitor closed ({text})", **fields
        )
    if code in _CONNECTION_CODES or err.get_error_domain() in (
        libvirt.VIR_FROM_RPC,
        libvirt.VIR_FROM_REMOTE,
    ):
        return ConnectionFailed(
            f"lost or could not open the libvirt connection; is libvirtd running? ({text})",
            **fields,
        )
    return LibvirtFailure(f"{call} failed ({text})", **fields)


class libvirt_call:  # noqa: N801 - used as a function: ``with libvirt_call(...):``
    """Count one libvirt call and translate its ``libvirtError``.

    A class rather than a generator: it wraps every call a collector makes,
    and a generator-based context manager costs several times as much.

    :raise LibvirtFailure: (or a subclass) When the call raises ``libvirtError``.
    """

    __slots__ = ("_call", "_domain")

    def __init__(self, counter: RPCCounter, call: str, domain: Optional[str] = None) -> None:
        counter.add(call)
        self._call = call
        self._domain = domain

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Optional[type], err: Optional[BaseException], _tb: object) -> None:
        if isinstance(err, libvirt.libvirtError):
            raise translate_error(err, call=self._call, domain=self._domain) from err


class Guest:
    """One libvirt domain, as this package needs it.

    Identity (name, UUID, id) is read once: the UUID and id together key
    every per-domain cache, so a domain restarted under the same name (new
    id, new QEMU, maybe a new QOM path) is never served stale data.

    Calls go to the lane the calling thread has leased from ``lanes``, if
    any (see :mod:`virt_balloon_stats.lanes`), else to the connection the
    domain was found on.

    :param domain: A ``libvirt.virDomain``.
    :param counter: The owning connection's RPC counter.
    :param lanes: The owning connection's lanes, if it has any.
    """

    def __init__(self, domain: Any, counter: RPCCounter, lanes: Optional[Lanes] = None) -> None:
        self._domain = domain
        self.counter = counter
        self._lanes = lanes
        self.name: str = domain.name()
        self.uuid: str = domain.UUIDString()
        raw_id = domain.ID()
        self.id: Optional[int] = raw_id if raw_id is not None and raw_id >= 0 else None

    def __repr__(self) -> str:
        return f"Guest(name={self.name!r}, uuid={self.uuid!r}, id={self.id!r})"

    @property
    def cache_key(self) -> tuple[str, Optional[int]]:
        """``(uuid, id)``: changes whenever the domain is restarted."""
        return (self.uuid, self.id)

    @property
    def domain(self) -> Any:
        """The ``virDomain`` to call: on the calling thread's lane, else the one this Guest was made with."""
        lane = self._lanes.current() if self._lanes is not None else None
        if lane is None:
            return self._domain
        return lane.domain(self.cache_key, self._look_up)

    def _look_up(self, conn: Any) -> Any:
        """This domain on another connection to the same libvirtd (a lane's first call to it)."""
        with self._call("lookupByUUIDString"):
            return conn.lookupByUUIDString(self.uuid)

    def _call(self, call: str) -> contextlib.AbstractContextManager[None]:
        return libvirt_call(self.counter, call, self.name)

    def state(self) -> str:
        """Return the domain state as a word: ``running``, ``paused``, ``shutoff``..."""
        with self._call("state"):
            state = self.domain.state()[0]
        return _STATE_NAMES.get(state, f"unknown-{state}")

    def xml(self, inactive: bool = False) -> str:
        """Return libvirt's live domain XML, or the persistent one if ``inactive``."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with self._call("XMLDesc"):
            return str(self.domain.XMLDesc(flags))

    def memory_stats(self) -> Dict[str, int]:
        """Return ``virDomainMemoryStats`` as libvirt gives it (KiB and counts)."""
        with self._call("memoryStats"):
            stats = self.domain.memoryStats()
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in stats.values()):
            raise LibvirtFailure(f"memoryStats() gave a figure that is not an integer: {stats!r:.200}")
        return {str(k): int(v) for k, v in stats.items()}

    def set_memory(self, size: int) -> None:
        """Ask the balloon for ``size`` bytes (``setMemoryFlags`` on the live domain, in whole KiB).

        Only the running domain changes: a restart gives the guest its
        defined size back, which is the safe way for a step to be undone.
        libvirt returns once QEMU took the request; the guest's driver then
        inflates or deflates, and ``actual`` follows within seconds.
        """
        if size < 1024:
            raise InvalidArgument(f"a balloon size is at least 1 KiB, not {size!r} bytes")
        with self._call("setMemoryFlags"):
            self.domain.setMemoryFlags(size // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def job_active(self) -> bool:
        """Whether a job (a migration, a save, a dump) runs on the domain (``jobInfo``)."""
        with self._call("jobInfo"):
            info = self.domain.jobInfo()
        return bool(info) and info[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def set_memory_stats_period(self, seconds: int, *, live: bool, config: bool) -> None:
        """Call ``setMemoryStatsPeriod`` on the live and/or persistent definition."""
        flags = 0
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if config:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with self._call("setMemoryStatsPeriod"):
            self.domain.setMemoryStatsPeriod(seconds, flags)


class Host:
    """One libvirt connection: domain look-up and bulk statistics.

    Thread-safe as libvirt connections are; holds no state but the
    connection, its URI, its :class:`RPCCounter` and, when it can open more
    connections to the same URI (``reopen``), its
    :class:`~virt_balloon_stats.lanes.Lanes`: the calls of a thread that
    leased a lane go there (see :mod:`virt_balloon_stats.lanes`).

    :param reopen: Opens another connection to ``uri``, the same way.
    """

    def __init__(
        self,
        conn: Any,
        uri: str,
        counter: Optional[RPCCounter] = None,
        *,
        reopen: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.conn = conn
        self.uri = uri
        self.counter = counter or RPCCounter()
        self._callbacks: List[int] = []  # domain event registrations, undone by close()
        self._reopen = reopen
        self.lanes: Optional[Lanes] = (
            None
            if reopen is None
            else Lanes(self._open_lane, _close_quietly, lister=self._lane_domains, alive=_is_alive)
        )

    def _open_lane(self) -> Any:
        """One more connection, for a lane (:raise ConnectionFailed: when libvirt cannot connect)."""
        assert self._reopen is not None
        return _connected(self.counter, "open", self._reopen, "cannot open another connection")

    def _lane_domains(self, conn: Any) -> Dict[Tuple[str, Optional[int]], Any]:
        """The running domains of a lane's connection, keyed as :attr:`Guest.cache_key` is."""
        with libvirt_call(self.counter, "listAllDomains"):
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return {(d.UUIDString(), d.ID()): d for d in domains}

    def leased(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with its calls in a lane of their own (on this connection if it has no lanes)."""
        if self.lanes is None:
            return fn(*args)
        return self.lanes.run(fn, *args)

    @classmethod
    def open(cls, uri: Optional[str] = None, *, readonly: bool = False) -> "Host":
        """Open a connection, by default as virsh would (see :func:`default_uri`).

        :raise ConnectionFailed: When libvirt cannot connect.
        """
        target = uri or default_uri()
        counter = RPCCounter()
        call = "openReadOnly" if readonly else "open"

        def connect() -> Any:
            return libvirt.openReadOnly(target) if readonly else libvirt.open(target)

        why = "cannot connect; is libvirtd running, and may this user use it?"
        conn = _connected(counter, call, connect, why)
        return cls(conn, target, counter, reopen=connect)

    def close(self) -> None:
        """Close the connection; errors on close are of no use to anyone.

        Event and close-callback registrations hold references to the
        connection, so they go first: otherwise the socket stays open.
        """
        for callback_id in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(callback_id)
        if self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.unregisterCloseCallback()
        self._callbacks = []
        if self.lanes is not None:
            self.lanes.close()
        _close_quietly(self.conn)

    def alive(self) -> bool:
        """Whether the connection still answers (one cheap round trip)."""
        try:
            with libvirt_call(self.counter, "getLibVersion"):
                self.conn.getLibVersion()
        except LibvirtFailure:
            return False
        return True

    def node_available(self) -> int:
        """Bytes of memory the host has available: free + cached + buffers (``getMemoryStats``).

        Asked of libvirt, not read from ``/proc``, so that a remote URI
        gives that host's figure; the page cache counts as available, as the
        kernel's own ``MemAvailable`` mostly does.

        :raise LibvirtFailure: When libvirt cannot say, or says it without a free figure.
        """
        with libvirt_call(self.counter, "getMemoryStats"):
            stats = self.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        if not isinstance(stats.get("free"), int):
            raise LibvirtFailure(f"getMemoryStats() gave no free memory: {stats!r:.200}")
        return sum(int(stats.get(name, 0)) for name in ("free", "cached", "buffers")) * 1024

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, spec: str) -> Guest:
        """Find a domain as virsh does: by id, then UUID, then name.

        :raise InvalidArgument: When ``spec`` is empty.
        :raise DomainNotFound: When nothing matches.
        """
        if not spec:
            raise InvalidArgument("an empty domain name was given")
        if re.fullmatch(r"[0-9]+", spec):
            try:
                with libvirt_call(self.counter, "lookupByID", spec):
                    return Guest(self.conn.lookupByID(int(spec)), self.counter, self.lanes)
            except DomainNotFound:
                pass
        if _is_uuid(spec):
            try:
                with libvirt_call(self.counter, "lookupByUUIDString", spec):
                    return Guest(self.conn.lookupByUUIDString(spec), self.counter, self.lanes)
            except DomainNotFound:
                pass
        with libvirt_call(self.counter, "lookupByName", spec):
            return Guest(self.conn.lookupByName(spec), self.counter, self.lanes)

    def running_guests(self) -> List[Guest]:
        """Return every active domain (running or paused), sorted by name."""
        with libvirt_call(self.counter, "listAllDomains"):
            domains = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sorted((Guest(d, self.counter, self.lanes) for d in domains), key=lambda g: g.name)

    def domain_records(self, guests: Sequence[Guest], *, balloon: bool = True) -> Dict[str, DomainRecord]:
        """State (and balloon figures) of many domains in one round trip, keyed by UUID.

        The state costs nothing extra: libvirt reads it from its own
        definition, without a job on QEMU, so even a hung QEMU's domain
        comes back with its state (``NOWAIT`` skips only its balloon part).
        """
        if not guests:
            return {}
        stats = libvirt.VIR_DOMAIN_STATS_STATE | (libvirt.VIR_DOMAIN_STATS_BALLOON if balloon else 0)
        lane = self.lanes.current() if self.lanes is not None else None
        conn = lane.conn if lane is not None else self.conn
        with libvirt_call(self.counter, "domainListGetStats"):
            records = conn.domainListGetStats(
                [g.domain for g in guests], stats, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
            )
        out = {}
        for dom, raw in records:
            state = raw.get("state.state")
            out[dom.UUIDString()] = DomainRecord(
                state="unknown" if state is None else _STATE_NAMES.get(state, f"unknown-{state}"),
                balloon={str(k): int(v) for k, v in raw.items() if str(k).startswith("balloon.")},
            )
        return out

    def watch(self, queue: Callable[[HostEvent], None], *, keepalive: Optional[int] = 5) -> None:
        """Deliver domain events and the loss of the connection to ``queue``.

        Needs :func:`~virt_balloon_stats.events.start_event_loop` before :meth:`open`. ``queue`` is called
        in libvirt's event thread, so it must only hand the event on. With
        ``keepalive`` (seconds), a libvirtd that stops answering is noticed
        after about three missed replies even when no call is in flight.

        :raise LibvirtFailure: When libvirt refuses a registration.
        """
        from virt_balloon_stats.events import CLOSE_REASONS, LIFECYCLE_NAMES, HostEvent

        def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            queue(HostEvent("lifecycle", dom.UUIDString(), LIFECYCLE_NAMES.get(event, str(event))))

        def device(_conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
            queue(HostEvent("device", dom.UUIDString(), str(alias)))

        def balloon(_conn: Any, dom: Any, actual: int, _opaque: Any) -> None:
            queue(HostEvent("balloon", dom.UUIDString(), str(actual)))

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            queue(HostEvent("closed", None, CLOSE_REASONS.get(reason, str(reason))))

        registrations = (
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, device),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, device),
            (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon),
        )
        for event_id, callback in registrations:
            with libvirt_call(self.counter, "domainEventRegisterAny"):
                self._callbacks.append(self.conn.domainEventRegisterAny(None, event_id, callback, None))
        with libvirt_call(self.counter, "registerCloseCallback"):
            self.conn.registerCloseCallback(closed, None)
        if keepalive:
            with libvirt_call(self.counter, "setKeepAlive"):
                self.conn.setKeepAlive(keepalive, 3)


def silence_libvirt_stderr() -> None:
    """Stop libvirt printing ``libvirt: QEMU Driver error : ...`` by itself.

    libvirt's default error handler writes every error to stderr, even
    those we catch and report better. This is process-wide, so only a
    program's entry point (the CLI) calls it; a library must not.
    """
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _connected(counter: RPCCounter, call: str, connect: Callable[[], Any], why: str) -> Any:
    """``connect()``, counted; its failure as :class:`ConnectionFailed` saying ``why``."""
    try:
        with libvirt_call(counter, call):
            return connect()
    except LibvirtFailure as err:
        raise ConnectionFailed(
            f"{why} ({err.libvirt_message})", code=err.code, libvirt_message=err.libvirt_message
        ) from err


def _is_alive(conn: Any) -> bool:
    """``virConnectIsAlive``: local to the client (no round trip), false once the connection is lost."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close_quietly(conn: Any) -> None:
    """Close a connection; errors on close are of no use to anyone."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _is_uuid(text: str) -> bool:
    """32 hex digits, hyphens allowed (what virsh takes as a UUID)."""
    return re.fullmatch(r"[0-9a-fA-F]{32}", text.replace("-", "")) is not None and len(text) in (32, 36)

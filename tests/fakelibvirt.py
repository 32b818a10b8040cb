"""A fake of the libvirt boundary, built from fixtures recorded on the testbed.

Only what libvirt itself would do is faked here: ``virDomain`` and
``virConnect`` objects and ``libvirt_qemu.qemuMonitorCommand``. Everything
above that (the package's Host, Guest, transport, QMP client...) is the real
code under test. Errors are real ``libvirt.libvirtError`` instances carrying
the code, error domain and message libvirt gave on the testbed, so
``get_error_code()`` and ``get_error_domain()`` behave as in production.

A recorded fixture (``tests/fixtures/recorded/<scenario>.json``) holds one
domain's identity, live and inactive XML, ``memoryStats()``, its
``getAllDomainStats(BALLOON)`` record, and every QMP command sent with the raw
reply QEMU gave, in the order they were sent.

Faults that cannot be recorded as a reply are modelled here the way libvirt
shows them to a client: a hung QEMU is a ``qemuMonitorCommand`` that does not
return (:meth:`FakeDomain.hang`), a lost connection makes every call raise
libvirt's RPC error (:meth:`FakeConnect.lose`), a destroyed transient domain
answers every call with "no domain" (:meth:`FakeConnect.destroy`), and
events reach the callbacks registered with ``domainEventRegisterAny`` and
``registerCloseCallback`` when a test says so (:meth:`FakeConnect.emit`).

How calls share one connection is modelled only for the tests that ask
(:class:`RPCModel`): more connections to the same hypervisor
(:meth:`FakeConnect.another`), each serving a bounded number of calls at
once and losing the wake-up of a call made while another is held by a hang.
Without it, a connection answers any number of calls at once.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import threading
from typing import (
    Any,
    Callable,
    ContextManager,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import libvirt

from virt_balloon_stats.host import Guest
from virt_balloon_stats.transport import LibvirtQemuTransport

__all__ = [
    "libvirt_error",
    "error_from_record",
    "connection_lost_error",
    "canonical",
    "RPCModel",
    "FakeDomain",
    "DomainHandle",
    "FakeConnect",
    "RecordedTransport",
]

#: VIR_ERR_ERROR: every error in the recordings had this level.
_LEVEL_ERROR = 2


def libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    """A real ``libvirtError`` as libvirt-python builds it from virGetLastError()."""
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, _LEVEL_ERROR, None, None, None, 0, 0)
    # libvirtError takes its text from the thread's last libvirt error when
    # there is one; force the recorded text whatever an earlier test left.
    err.args = (message,)
    return err


def error_from_record(record: Mapping[str, Any]) -> libvirt.libvirtError:
    """The error of one ``libvirt-errors.json`` entry."""
    return libvirt_error(record["code"], record["domain"], record["message"])


def connection_lost_error() -> libvirt.libvirtError:
    """What a call on a connection whose libvirtd went away raises.

    Synthetic (the testbed recordings have no dead libvirtd): the code, error
    domain and text libvirt's RPC client gives when the daemon's end of the
    socket closes.
    """
    message = "End of file while reading data: Input/output error"
    return libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, message)


def _copy(err: libvirt.libvirtError) -> libvirt.libvirtError:
    """A fresh instance of ``err``, so that threads failing at once do not share one traceback."""
    return libvirt_error(err.get_error_code(), err.get_error_domain(), str(err))


def canonical(command: Mapping[str, Any]) -> str:
    """One text per command dict, whatever the key order, to match recordings."""
    return json.dumps(command, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class RPCModel:
    """How calls share one libvirt connection, as a client of libvirt 9.0 sees it.

    Opt-in (``FakeConnect(..., rpc=RPCModel())``); every connection of the
    fake hypervisor (:meth:`FakeConnect.another`) then behaves so:

    * **At most** ``max_requests`` **calls are served at once**, libvirtd's
      ``max_client_requests`` (5 by default). libvirtd stops reading a
      connection at that count, so a later call waits until one of those
      returns: calls that never return take slots from every other call.
    * **The wake-up of a call is lost** (``lost_wakeup``), in its worst case.
      libvirt's RPC client lets threads share a connection by having one of
      them, the one "holding the buck", do the socket I/O for all. A thread
      that queues a call wakes the holder with ``g_main_loop_quit()``, and
      that wake-up can be lost (when the holder is between releasing the
      client lock and entering ``g_main_loop_run()``; ``virNetClientIO`` and
      ``virNetClientIOEventLoop`` in ``src/rpc/virnetclient.c``): the call is
      not even written to the socket until some other message arrives on the
      connection. When the holder is a call to a stopped QEMU, nothing may
      arrive: on the testbed, a healthy domain's call waited 2.5 s (until the
      next cycle's calls came) in about 1 trial in 15. Here it happens every
      time, for as long as it can: a call made on a connection while another
      call on it is held by a hang (:meth:`FakeDomain.hang`) waits until no
      call on it is held.

    Every wait ends when the calls held by a hang return, so a test that sets
    its hang gates in a ``finally`` leaves no thread stuck.
    """

    max_requests: int = 5
    lost_wakeup: bool = True


class FakeDomain:
    """One ``virDomain`` replaying a recorded fixture.

    :param fixture: A recorded scenario.
    :param dom_id: Overrides the recorded id (e.g. to model a restart: same
        UUID, new id); ``-1`` is libvirt's id of a domain that is not running.
    :param raises: libvirt method name -> error it raises instead of answering.
    """

    def __init__(
        self,
        fixture: Mapping[str, Any],
        *,
        dom_id: Optional[int] = None,
        raises: Optional[Mapping[str, libvirt.libvirtError]] = None,
    ) -> None:
        self.fixture = fixture
        info = fixture["domain"]
        self._name: str = info["name"]
        self._uuid: str = info["uuid"]
        self._id: int = info["id"] if dom_id is None else dom_id
        self._state: Tuple[int, int] = (info["state"][0], info["state"][1])
        self._raises = dict(raises or {})
        self._lock = threading.Lock()
        #: Every call made, as (method name, positional arguments).
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        #: The connection holding this domain (set by FakeConnect): when it is
        #: lost, every call fails as libvirt's would.
        self.connection: Optional["FakeConnect"] = None
        self._gone: Optional[libvirt.libvirtError] = None
        self._gates: Dict[str, threading.Event] = {}
        self._held: "collections.Counter[str]" = collections.Counter()
        self._held_changed = threading.Condition()

    def _called(self, method: str, *args: Any) -> ContextManager[None]:
        """Record a call to ``method``; the block it guards is the call being served."""
        with self._lock:
            self.calls.append((method, args))
        return self.serving(method)

    @contextlib.contextmanager
    def serving(self, method: str) -> Iterator[None]:
        """One call to ``method``, from when it is made until it returns.

        It goes through this domain's connection (see :class:`RPCModel`),
        then :meth:`enter`. Also used by :class:`RecordedTransport` for
        ``qemuMonitorCommand``.
        """
        conn = self.connection
        with conn._rpc(method) if conn is not None else contextlib.nullcontext():
            self.enter(method)
            yield

    def enter(self, method: str) -> None:
        """What libvirt does before answering ``method`` on this domain.

        Fails for a lost connection or a destroyed domain, raises the error
        set for ``method``, or holds the call while it is hung.
        """
        conn = self.connection
        if conn is not None and conn.lost is not None:
            raise _copy(conn.lost)
        with self._lock:
            gone, error, gate = self._gone, self._raises.get(method), self._gates.get(method)
        if gone is not None:
            raise _copy(gone)
        if error is not None:
            raise error
        if gate is not None and not gate.is_set():
            # Counted on the connection first: a test that saw the call held
            # must find its connection holding it.
            with conn._holding() if conn is not None else contextlib.nullcontext():
                with self._held_changed:
                    self._held[method] += 1
                    self._held_changed.notify_all()
                gate.wait()

    def hang(self, method: str = "qemuMonitorCommand") -> threading.Event:
        """Make every later call to ``method`` block until the returned Event is set.

        A stopped QEMU looks like this through libvirt: the first call to its
        monitor does not return, and libvirt has no reply timeout for it. A
        test sets the Event in a ``finally``, so that no thread stays stuck.
        """
        release = threading.Event()
        with self._lock:
            self._gates[method] = release
        return release

    def held(self, method: str = "qemuMonitorCommand") -> int:
        """How many calls to ``method`` were held by :meth:`hang` so far."""
        with self._held_changed:
            return self._held[method]

    def wait_held(self, method: str = "qemuMonitorCommand", count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` calls to ``method`` have been held by :meth:`hang`."""
        with self._held_changed:
            return self._held_changed.wait_for(lambda: self._held[method] >= count, timeout)

    def fail(self, method: str, error: Optional[libvirt.libvirtError]) -> None:
        """From now on ``method`` raises ``error`` (``None``: it answers again)."""
        with self._lock:
            if error is None:
                self._raises.pop(method, None)
            else:
                self._raises[method] = error

    def set_state(self, state: int, reason: int = 1) -> None:
        """Change what ``state()`` and the bulk stats say (e.g. suspended: ``VIR_DOMAIN_PAUSED``)."""
        with self._lock:
            self._state = (state, reason)

    def calls_to(self, method: str) -> List[Tuple[Any, ...]]:
        """The arguments of every call to ``method``, in order."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def ID(self) -> int:
        return self._id

    def isActive(self) -> int:
        with self._called("isActive"):
            return int(self._id >= 0)

    def state(self, flags: int = 0) -> List[int]:
        with self._called("state", flags):
            return list(self._state)

    def XMLDesc(self, flags: int = 0) -> str:
        with self._called("XMLDesc", flags):
            key = "xml_inactive" if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else "xml_live"
            return str(self.fixture[key])

    def memoryStats(self) -> Dict[str, int]:
        with self._called("memoryStats"):
            return dict(self.fixture["memory_stats"])

    def setMemoryStatsPeriod(self, period: int, flags: int = 0) -> int:
        with self._called("setMemoryStatsPeriod", period, flags):
            return 0

    def jobInfo(self) -> List[int]:
        """The recorded ``jobInfo()``: ``[0] * 12`` (no job) on every recorded domain."""
        with self._called("jobInfo"):
            return list(self.fixture["job_info"])

    def setMemoryFlags(self, memory: int, flags: int = 0) -> int:
        """Accepted, as libvirt accepts a size within ``<memory>`` (0): the call is recorded.

        The balloon does not move here: a test that needs the guest to
        follow changes the fixture's figures itself (the ``step`` recording
        shows what libvirt reports once it has).
        """
        with self._called("setMemoryFlags", memory, flags):
            return 0


class DomainHandle(FakeDomain):
    """A :class:`FakeDomain` as looked up on another connection (:meth:`FakeConnect.another`).

    A ``virDomain`` belongs to the ``virConnect`` it was found on, and its
    calls go through that connection. So does this handle's: its
    :attr:`connection` is its own, and everything else (the recording, the
    state, the faults, the calls recorded) is the shared :attr:`domain`'s,
    read and written through.
    """

    def __init__(self, domain: FakeDomain, connection: "FakeConnect") -> None:
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "connection", connection)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.domain, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.domain, name, value)

    def __repr__(self) -> str:
        return f"<DomainHandle {self.name()} on connection {self.connection.number}>"


class FakeConnect:
    """A ``virConnect`` to the QEMU driver holding the given domains.

    :param domains: The domains this "hypervisor" has.
    :param not_found: The recorded ``unknown-domain`` entry of
        ``libvirt-errors.json``: its code, error domain and message shape are
        reused for every failed look-up.
    :param busy: UUIDs of domains whose QEMU does not answer: with ``NOWAIT``
        domainListGetStats returns them without balloon figures (as seen on
        the testbed with a SIGSTOPped QEMU).
    :param rpc: How this connection, and those opened with :meth:`another`,
        serve calls made at once (default: any number, each at once).

    The call counters (:attr:`served`, :attr:`in_flight`, :attr:`peak`,
    :attr:`hung`, :attr:`delayed`, :attr:`queued`) are kept with or without ``rpc``.
    """

    def __init__(
        self,
        domains: Iterable[FakeDomain],
        *,
        not_found: Mapping[str, Any],
        busy: Iterable[str] = (),
        rpc: Optional[RPCModel] = None,
        node_memory_stats: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.domains = list(domains)
        #: What ``getMemoryStats`` answers (KiB), as recorded by the ``step`` scenario.
        self.node_memory_stats = dict(node_memory_stats or {})
        self._not_found = not_found
        self._busy = set(busy)
        self.rpc = rpc
        #: Every connection to this hypervisor, in the order opened (this one first; see :meth:`another`).
        self.connections: List[FakeConnect] = [self]
        #: This connection's place in :attr:`connections`.
        self.number = 0
        self._wire = threading.Condition()
        #: Calls made on this connection that have not returned yet.
        self.in_flight = 0
        #: The most calls in flight at once so far.
        self.peak = 0
        #: Calls on this connection held by a hang now (:meth:`FakeDomain.hang`).
        self.hung = 0
        #: Calls that waited for a lost wake-up (:attr:`RPCModel.lost_wakeup`).
        self.delayed = 0
        #: Calls that waited for libvirtd to serve fewer than :attr:`RPCModel.max_requests`.
        self.queued = 0
        #: Calls that went through this connection, by method: the domains' calls too, unlike :attr:`calls`.
        self.served: "collections.Counter[str]" = collections.Counter()
        self._serving = 0
        self.closed = False
        #: The error every call raises once the connection is lost (:meth:`lose`).
        self.lost: Optional[libvirt.libvirtError] = None
        self._lock = threading.Lock()
        #: Every call made, as (method name, positional arguments).
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self._after: Dict[str, List[Callable[[], None]]] = {}
        self._event_callbacks: List[Tuple[int, Any, Callable[..., Any], Any]] = []
        self.deregistered: Set[int] = set()  # callback ids given back to domainEventDeregisterAny
        self._close_callbacks: List[Tuple[Callable[..., Any], Any]] = []
        for dom in self.domains:
            dom.connection = self

    def _called(self, method: str, *args: Any, via: Optional["FakeConnect"] = None) -> ContextManager[None]:
        """Record a call to ``method``; the block it guards is the call, served by ``via`` (default: here)."""
        conn = via if via is not None else self
        with self._lock:
            self.calls.append((method, args))
        lost = conn.lost
        if lost is not None:
            raise _copy(lost)
        return conn._rpc(method)

    @contextlib.contextmanager
    def _rpc(self, method: str) -> Iterator[None]:
        """One call on this connection, from when it is made until it returns (see :class:`RPCModel`)."""
        rpc = self.rpc
        with self._wire:
            self.served[method] += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if rpc is not None and rpc.lost_wakeup and self.hung:
                self.delayed += 1
                self._wire.wait_for(lambda: not self.hung)
            if rpc is not None and self._serving >= rpc.max_requests:
                self.queued += 1
                self._wire.wait_for(lambda: self._serving < rpc.max_requests)
            self._serving += 1
        try:
            yield
        finally:
            with self._wire:
                self._serving -= 1
                self.in_flight -= 1
                self._wire.notify_all()

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """A call on this connection held by a hang, for as long as it is held."""
        with self._wire:
            self.hung += 1
        try:
            yield
        finally:
            with self._wire:
                self.hung -= 1
                self._wire.notify_all()

    def another(self) -> "FakeConnect":
        """Open one more connection to this hypervisor, as ``libvirt.open`` of the same URI would.

        It shares the domains (those started or destroyed later too) and the
        :class:`RPCModel`. It has its own calls, counters, events and loss
        (:meth:`lose` is one connection's), and what it looks up are handles
        of its own (:class:`DomainHandle`). :attr:`connections` lists it.
        """
        other = FakeConnect((), not_found=self._not_found, busy=self._busy, rpc=self.rpc)
        with self._lock:
            other.domains = self.domains
            other._lock = self._lock  # one list of domains, one lock
            other.connections = self.connections
            other.number = len(self.connections)
            self.connections.append(other)
        return other

    def _here(self, dom: FakeDomain) -> FakeDomain:
        """``dom`` as a ``virDomain`` found on this connection."""
        return dom if dom.connection is self else DomainHandle(dom, self)

    def _answer(self, method: str, result: Any) -> Any:
        """Return ``result`` after running the hooks waiting for this call (see :meth:`after`)."""
        with self._lock:
            hooks = self._after.pop(method, [])
        for hook in hooks:
            hook()
        return result

    def after(self, method: str, hook: Callable[[], None]) -> None:
        """Run ``hook`` once, right after the next ``method`` call computed its answer.

        Models what happens on the host between two calls of a reader, e.g.
        a domain destroyed just after it was listed.
        """
        with self._lock:
            self._after.setdefault(method, []).append(hook)

    def lose(self, error: Optional[libvirt.libvirtError] = None) -> None:
        """libvirtd went away: every later call raises ``error`` (default :func:`connection_lost_error`)."""
        with self._lock:
            self.lost = error if error is not None else connection_lost_error()

    def add(self, dom: FakeDomain) -> None:
        """A domain started on the host."""
        with self._lock:
            self.domains.append(dom)
        dom.connection = self

    def destroy(self, dom: FakeDomain) -> None:
        """``virsh destroy`` of a transient domain: it leaves the list, and its
        ``virDomain`` answers every later call with libvirt's "no domain"
        error (the recorded code and error domain)."""
        with self._lock:
            self.domains.remove(dom)
        gone = self._missing("uuid", dom.UUIDString())
        with dom._lock:
            dom._gone = gone

    def _active(self) -> List[FakeDomain]:
        with self._lock:
            return [d for d in self.domains if d.ID() >= 0]

    def calls_to(self, method: str) -> List[Tuple[Any, ...]]:
        """The arguments of every call to ``method``, in order."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def _missing(self, kind: str, value: object) -> libvirt.libvirtError:
        # Same code and error domain as recorded; the message names what was
        # asked, as libvirt's does ("no domain with matching name 'X'").
        message = re.sub(r"matching name '.*'", f"matching {kind} '{value}'", self._not_found["message"])
        return libvirt_error(self._not_found["code"], self._not_found["domain"], message)

    def _all(self) -> List[FakeDomain]:
        with self._lock:
            return list(self.domains)

    def lookupByName(self, name: str) -> FakeDomain:
        with self._called("lookupByName", name):
            for dom in self._all():
                if dom.name() == name:
                    return self._answer("lookupByName", self._here(dom))
            raise self._missing("name", name)

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        with self._called("lookupByUUIDString", uuid):
            for dom in self._all():
                if dom.UUIDString() == uuid.lower():
                    return self._answer("lookupByUUIDString", self._here(dom))
            raise self._missing("uuid", uuid)

    def lookupByID(self, dom_id: int) -> FakeDomain:
        with self._called("lookupByID", dom_id):
            for dom in self._all():
                if dom.ID() == dom_id and dom_id >= 0:
                    return self._answer("lookupByID", self._here(dom))
            raise self._missing("id", dom_id)

    def getMemoryStats(  # noqa: N802 - libvirt's name
        self, cellNum: int, flags: int = 0  # noqa: N803 - libvirt's name
    ) -> Dict[str, int]:
        with self._called("getMemoryStats", cellNum, flags):
            return dict(self.node_memory_stats)

    def listAllDomains(self, flags: int = 0) -> List[FakeDomain]:
        with self._called("listAllDomains", flags):
            doms = self._all()
            if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
                doms = [d for d in doms if d.ID() >= 0]
            return self._answer("listAllDomains", [self._here(d) for d in doms])

    def domainListGetStats(
        self, doms: Sequence[FakeDomain], stats: int = 0, flags: int = 0
    ) -> List[Tuple[FakeDomain, Dict[str, Any]]]:
        """The bulk stats call.

        As libvirt's, it goes through the connection of the domains named (the
        first one's, whatever connection it is called on), and refuses domains
        of several connections.
        """
        doms = list(doms)
        via = (doms[0].connection or self) if doms else self
        with self._called("domainListGetStats", doms, stats, flags, via=via):
            if any((d.connection or self) is not via for d in doms):
                raise libvirt_error(
                    libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_FROM_DOMAIN,
                    "invalid argument: domains in 'doms' array must belong to a single connection",
                )
            return self._bulk_stats(doms, stats, flags)

    def _bulk_stats(
        self, doms: Sequence[FakeDomain], stats: int, flags: int
    ) -> List[Tuple[FakeDomain, Dict[str, Any]]]:
        out = []
        for dom in doms:
            if dom._gone is not None:
                continue  # libvirt skips domains that no longer exist
            record: Dict[str, Any] = {}
            if stats & libvirt.VIR_DOMAIN_STATS_BALLOON:
                if dom.UUIDString() not in self._busy:
                    # libvirt asks QEMU for the balloon figures: a hung QEMU
                    # whose job is free holds the whole call (hang() on this).
                    dom.enter("domainListGetStats")
                record.update(dom.fixture["all_domain_stats"])
                if dom.UUIDString() in self._busy:
                    if not flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT:
                        raise AssertionError("a busy domain without NOWAIT would block libvirt for 30 s")
                    record = {}
            if stats & libvirt.VIR_DOMAIN_STATS_STATE:
                # libvirt reads the state from its own definition, without a
                # job on QEMU: a busy domain still has it.
                record["state.state"], record["state.reason"] = dom._state
            out.append((dom, record))
        return out

    def getType(self) -> str:
        with self._called("getType"):
            return "QEMU"

    def close(self) -> int:
        with self._lock:
            self.calls.append(("close", ()))
        self.closed = True
        return 0

    def domainEventRegisterAny(
        self, dom: Optional[FakeDomain], event_id: int, cb: Callable[..., Any], opaque: Any
    ) -> int:
        with self._called("domainEventRegisterAny", dom, event_id), self._lock:
            self._event_callbacks.append((event_id, dom, cb, opaque))
            return len(self._event_callbacks) - 1

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        with self._called("domainEventDeregisterAny", callback_id), self._lock:
            if not 0 <= callback_id < len(self._event_callbacks) or callback_id in self.deregistered:
                raise libvirt_error(libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_FROM_NONE, "no such callback")
            self.deregistered.add(callback_id)
            return 0

    def unregisterCloseCallback(self) -> int:
        with self._called("unregisterCloseCallback"), self._lock:
            self._close_callbacks.clear()
            return 0

    def getLibVersion(self) -> int:
        with self._called("getLibVersion"):
            return 9000000

    def isAlive(self) -> int:
        """Local in libvirt (no round trip): 0 once the connection is lost or closed."""
        with self._lock:
            return int(self.lost is None and not self.closed)

    def registerCloseCallback(self, cb: Callable[..., Any], opaque: Any) -> int:
        with self._called("registerCloseCallback"), self._lock:
            self._close_callbacks.append((cb, opaque))
            return 0

    def setKeepAlive(self, interval: int, count: int) -> int:
        with self._called("setKeepAlive", interval, count):
            return 0

    def emit(self, event_id: int, dom: FakeDomain, *args: Any) -> int:
        """Deliver one domain event to the callbacks registered for it, as libvirt's event loop would.

        ``args`` are the event's own arguments (for a lifecycle event, the
        event and its detail; for a device event, the alias). Returns how many
        callbacks were called.
        """
        with self._lock:
            targets = [(cb, opaque) for i, (eid, only, cb, opaque) in enumerate(self._event_callbacks)
                       if eid == event_id and (only is None or only is dom) and i not in self.deregistered]
        for cb, opaque in targets:
            cb(self, dom, *args, opaque)
        return len(targets)

    def emit_close(self, reason: int = libvirt.VIR_CONNECT_CLOSE_REASON_EOF) -> int:
        """Call the close callbacks, as libvirt does when it sees the connection die."""
        with self._lock:
            targets = list(self._close_callbacks)
        for cb, opaque in targets:
            cb(self, reason, opaque)
        return len(targets)


class RecordedTransport:
    """The package's Transport, answering with QEMU's recorded replies.

    It stands in for ``libvirt_qemu.qemuMonitorCommand`` only: the real
    :class:`~virt_balloon_stats.transport.LibvirtQemuTransport` wraps it, so
    RPC counting and libvirt error translation are the package's own.

    Each command is answered with the reply recorded for an equal command dict
    (key order does not matter). When the same command was recorded several
    times (e.g. the polling interval read before and after a ``qom-set``), the
    replies are given in recorded order and the last one is repeated after
    that, as a QEMU left in its final state would. A command that was never
    recorded fails the test: a unit test must not guess QEMU's answer.

    :param fixtures: Recorded scenarios; replies are looked up by domain UUID.
    :param raises: Command dicts for which qemuMonitorCommand raises this
        ``libvirtError`` instead (whatever the domain).
    """

    def __init__(
        self,
        *fixtures: Mapping[str, Any],
        raises: Sequence[Tuple[Mapping[str, Any], libvirt.libvirtError]] = (),
    ) -> None:
        self._replies: Dict[str, Dict[str, Deque[str]]] = {}
        for fixture in fixtures:
            table = self._replies.setdefault(fixture["domain"]["uuid"], {})
            for exchange in fixture["qmp"]:
                replies = table.setdefault(canonical(exchange["command"]), collections.deque())
                replies.append(exchange["reply"])
        self._raises = {canonical(cmd): err for cmd, err in raises}
        self._lock = threading.Lock()
        self._real = LibvirtQemuTransport(self.qemuMonitorCommand)
        #: Every command that reached "libvirt": domain name, raw text, flags.
        self.sent: List[Dict[str, Any]] = []

    def monitor_command(self, guest: Guest, command: str) -> str:
        """The Transport protocol's one method."""
        return self._real.monitor_command(guest, command)

    def qemuMonitorCommand(self, dom: FakeDomain, command: str, flags: int) -> str:
        """The fake of ``libvirt_qemu.qemuMonitorCommand(dom, cmd, flags)``."""
        parsed = json.loads(command)
        key = canonical(parsed)
        with self._lock:
            self.sent.append({"domain": dom.name(), "command": parsed, "raw": command, "flags": flags})
        if isinstance(dom, FakeDomain):
            with dom.serving("qemuMonitorCommand"):
                return self._reply(dom, key)
        return self._reply(dom, key)

    def _reply(self, dom: Any, key: str) -> str:
        with self._lock:
            if key in self._raises:
                raise self._raises[key]
            replies = self._replies.get(dom.UUIDString(), {}).get(key)
            if not replies:
                raise AssertionError(f"{dom.name()}: no recorded reply for {key}")
            return replies.popleft() if len(replies) > 1 else replies[0]

    def commands(self, execute: Optional[str] = None, domain: Optional[str] = None) -> List[Dict[str, Any]]:
        """The command dicts sent so far, optionally only one ``execute``'s or one domain's (by name)."""
        with self._lock:
            return [
                s["command"] for s in self.sent
                if (execute is None or s["command"]["execute"] == execute)
                and (domain is None or s["domain"] == domain)
            ]

    def answer(self, uuid: str, command: Mapping[str, Any], reply: str) -> None:
        """From now on answer ``command`` to that domain with ``reply``: a QEMU whose state moved on."""
        with self._lock:
            self._replies.setdefault(uuid, {})[canonical(command)] = collections.deque([reply])

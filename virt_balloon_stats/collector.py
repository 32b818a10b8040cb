"""The collector: every multi-domain reading, with deadlines, events and reconnects.

One :class:`Collector` reads the balloon figures of many domains on one or
more libvirt connections, once (:meth:`Collector.collect`) or in the
background (:meth:`Collector.start`). It is the single path behind
``stats``/``check``/``rearm`` with several domains, ``watch``,
:meth:`BalloonStats.sample_many`, and the long-running front ends.

What it guarantees, and how:

* **Deadlines.** Each domain is read in a daemon worker thread
  (:class:`~virt_balloon_stats.pool.WorkerPool`). A domain whose reading has
  not returned ``timeout`` seconds after the cycle began is reported
  ``unresponsive``; the others are reported on time. A long-running
  collector never asks a domain again while a call to it is outstanding
  (at most one per domain), and adds one spare thread per stuck call up to
  a fixed limit, so threads never pile up; when QEMU moves again the call
  returns and the domain is read as usual from the next cycle.
* **Isolation.** Every call that names a domain runs on a lane, a
  connection of its own carrying one call at a time
  (:mod:`virt_balloon_stats.lanes`); the cycle's calls are scheduled by
  :mod:`virt_balloon_stats.rounds`. A call stuck on a stopped QEMU holds
  its lane and nothing else: libvirt's client can lose the wake-up of a
  call queued behind it on a shared connection, and libvirtd serves only
  five calls per connection at once.
* **No repeated work.** State and libvirt's figures for all domains come
  from one bulk ``virDomainListGetStats`` call per host and cycle (``NOWAIT``,
  so a busy QEMU costs only its own balloon part). Domain XML is parsed once
  per incarnation (UUID, id); with ``events=True`` libvirt's events say when
  to list domains again or re-parse a domain's XML, and QEMU's polling
  interval is cached (see :class:`~virt_balloon_stats.client.DomainMemo`).
  A steady cycle costs a few bulk calls, and a ``qemuMonitorCommand`` for
  each domain whose turn it is.
* **The cross-check in turns.** With ``source='both'`` and events, each
  domain's figures are read from QEMU and compared with libvirt's one
  cycle in ``crosscheck_every`` (:data:`DEFAULT_CROSSCHECK_EVERY`), the
  domains taking turns. Between its turns a *settled* domain (its last
  comparison agreed, its last reading was read, libvirt has a name for
  each figure its QEMU names) is read from libvirt's bulk figures alone:
  the same ``guest-stats``, read through libvirt's own monitor, which costs
  libvirtd about half what the passthrough does. When those figures say
  something changed, QEMU's polling interval is read again, as a reading
  of QEMU would. Any other domain reads QEMU every cycle, its bulk call
  asks for its state only, and its balloon size comes from libvirt's
  ``BALLOON_CHANGE`` events, as libvirt's own does. A reading not compared
  says so (``skipped``, with its last conclusive cross-check beside it as
  ``previous``), never "agree"; a comparison that was not an agreement is
  made again the next cycle. A QEMU that stops between a settled domain's
  turns holds the bulk call it is in; the other domains of that call ask
  libvirt on their own after the cutoff, on time (see
  :mod:`~virt_balloon_stats.rounds`), and it is not asked again while that
  call is out.
* **Reconnect.** A connection lost (libvirtd restarted or crashed) is seen
  through libvirt's close callback and keepalive, or through the failure of
  a call. Its domains are then reported ``unreachable`` ("lost the libvirt
  connection; reconnecting") while the collector reconnects with backoff
  (1 s doubling to 30 s) and registers its events again.
* **Churn.** A domain started shows up in the next cycle, one destroyed
  drops out without an error, and one destroyed between listing and reading
  is left out of that cycle.

Example::

    from virt_balloon_stats.collector import Collector

    with Collector(["qemu:///system"], timeout=5, events=True) as collector:
        cycle = collector.collect()
        for sample in cycle.samples:
            print(sample.domain, sample.status.value, sample.get("stat-free-memory"))
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from virt_balloon_stats.client import DEFAULT_TIMEOUT, DEFAULT_WORKERS, BalloonStats, GuestRef
from virt_balloon_stats.errors import (
    BalloonStatsError,
    ConnectionFailed,
    DomainNotFound,
    DomainNotRunning,
    InvalidArgument,
)
from virt_balloon_stats.events import EventLoopHold, HostEvent, start_event_loop
from virt_balloon_stats.host import Guest, Host, default_uri
from virt_balloon_stats.lanes import LaneStats
from virt_balloon_stats.pool import WorkerPool
from virt_balloon_stats.reading import DomainMemo, Reading
from virt_balloon_stats.rounds import (
    BULK_CHUNKS,
    BulkCalls,
    BulkRound,
    DomainSlot,
    Work,
    run_rounds,
    start_reading,
)
from virt_balloon_stats.sample import SOURCES, Sample, not_read, unanswered
from virt_balloon_stats.stats import DEFAULT_GRACE_SECONDS, Status

__all__ = [
    "DEFAULT_CROSSCHECK_EVERY",
    "DEFAULT_TIMEOUT",
    "RECONNECT_FIRST",
    "RECONNECT_MAX",
    "LOST_CONNECTION",
    "HostState",
    "Problem",
    "Cycle",
    "Totals",
    "Collector",
]

LOG = logging.getLogger(__name__)
# The package's loggers are silent until the application configures logging
# (the collector is the part that logs; the exporter sits on it).
logging.getLogger("virt_balloon_stats").addHandler(logging.NullHandler())

#: Reconnect backoff: first retry after this many seconds, doubling up to the max.
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0

#: The reason given for every domain of a host whose connection was lost.
LOST_CONNECTION = "lost the libvirt connection; reconnecting"

#: Seconds early a reconnect attempt may start, to match the cycle schedule.
_RETRY_SLACK = 0.25

#: Hard cap on worker threads above ``workers``: one per stuck call, at most.
MAX_STUCK_THREADS = 32

#: With events, the domain list is still re-read this often, in case an event was missed.
RELIST_SECONDS = 300.0

#: With events and ``source='both'``, each domain is cross-checked one cycle in this many.
DEFAULT_CROSSCHECK_EVERY = 4

Opener = Callable[[str], BalloonStats]


@dataclasses.dataclass(frozen=True)
class HostState:
    """One connection as of a cycle.

    :ivar up: Whether the connection answered this cycle.
    :ivar message: Why it is down (empty when up).
    :ivar retry_in: Seconds until the next reconnect attempt, when down.
    :ivar lanes: The connection's calls in flight, stuck (past the cycle's
        deadline) and lanes open at the end of the cycle (see
        :mod:`virt_balloon_stats.lanes`); ``None`` when down.
    """

    uri: str
    up: bool
    message: str = ""
    retry_in: Optional[float] = None
    lanes: Optional[LaneStats] = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """A failure that belongs to no sample: a host that cannot be reached, a name that does not resolve.

    :ivar what: What failed, as the CLI prefixes its error line (a URI or a domain name).
    """

    what: str
    uri: str
    error: BalloonStatsError


@dataclasses.dataclass(frozen=True)
class Cycle:
    """One pass over every domain.

    :ivar samples: One per domain read (or found unresponsive/unreachable),
        in host order, then by name (or in the order the domains were named).
    :ivar calls: libvirt round trips made during the cycle, by call name.
    :ivar errors: Failures by kind: the exception class, ``unresponsive``.
    """

    number: int
    started_at: float
    duration: float
    samples: Tuple[Sample, ...]
    hosts: Mapping[str, HostState]
    problems: Tuple[Problem, ...]
    calls: Mapping[str, int]
    errors: Mapping[str, int]

    @property
    def statuses(self) -> Dict[str, int]:
        """Domains by status (every status listed, zeros included)."""
        counts = collections.Counter(s.status.value for s in self.samples)
        return {status.value: counts.get(status.value, 0) for status in Status}


@dataclasses.dataclass
class Totals:
    """Counts over the collector's life: cycles, calls and errors (in all, and per URI)."""

    cycles: int = 0
    calls: "collections.Counter[str]" = dataclasses.field(default_factory=collections.Counter)
    errors: "collections.Counter[str]" = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    last_up: Dict[str, float] = dataclasses.field(default_factory=dict)  # URI -> start of its last good cycle
    calls_by_uri: Dict[str, "collections.Counter[str]"] = dataclasses.field(default_factory=dict)
    errors_by_uri: Dict[str, "collections.Counter[str]"] = dataclasses.field(default_factory=dict)


class _HostSession:
    """One URI: its connection, event queue, domain entries and reconnect schedule."""

    def __init__(self, uri: str, client: Optional[BalloonStats], bulk_calls: int = 1) -> None:
        self.uri = uri
        self.client = client
        self.owned = client is None  # a session we opened is ours to close
        self.events: "queue.SimpleQueue[HostEvent]" = queue.SimpleQueue()
        self.entries: Dict[str, DomainSlot] = {}
        self.relist_due = 0.0
        self.retry_at = 0.0
        self.backoff = RECONNECT_FIRST
        self.lost = ""
        self.seen: Dict[str, int] = {}  # the RPC counter at the end of the last cycle
        self.order: List[str] = []  # UUIDs in the order samples are reported
        # The bulk calls run apart from the domain readers, which wait for them.
        self.bulk = BulkCalls(bulk_calls)


class Collector:
    """Reads many domains on one or more connections; see the module docstring.

    :param uris: Connections to open (``-c`` URIs); default: as virsh would.
    :param clients: Already open :class:`BalloonStats` instead of ``uris``
        (their connections are not closed by :meth:`stop` unless asked).
    :param domains: Names, UUIDs, ids or :class:`Guest` objects; ``None`` for
        every running domain (then domains come and go with the host).
    :param source: ``both``, ``qmp`` or ``libvirt`` (see :data:`SOURCES`).
    :param timeout: Seconds each domain gets per cycle; default
        :data:`DEFAULT_TIMEOUT`, or the interval when running in the background.
    :param workers: Threads reading domains in parallel.
    :param events: Use libvirt's events, close callback and keepalive
        (long-running use); without them each cycle lists domains again.
    :param readonly: Open read-only connections (only ``source='libvirt'`` works).
    :param crosscheck_every: With ``source='both'`` and ``events``, read
        QEMU and compare each domain's figures with libvirt's one cycle in
        this many (1: every cycle); between its turns a settled domain is
        read from libvirt's figures. Without events every reading reads
        QEMU and compares: nothing else would keep libvirt's balloon size
        between comparisons.
    :param log_changes: Log a warning when a domain becomes unresponsive or
        answers again (a long-running service's log); a one-shot command
        reports on stderr itself.
    :raise InvalidArgument: For a bad source, timeout or workers.
    """

    def __init__(
        self,
        uris: Optional[Sequence[str]] = None,
        *,
        clients: Optional[Sequence[BalloonStats]] = None,
        domains: Optional[Sequence[GuestRef]] = None,
        source: str = "both",
        timeout: Optional[float] = None,
        workers: int = DEFAULT_WORKERS,
        events: bool = False,
        readonly: bool = False,
        crosscheck_every: int = DEFAULT_CROSSCHECK_EVERY,
        grace: float = DEFAULT_GRACE_SECONDS,
        log_changes: bool = False,
        opener: Optional[Opener] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if source not in SOURCES:
            raise InvalidArgument(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
        if workers < 1:
            raise InvalidArgument(f"workers must be 1 or more, not {workers}")
        if timeout is not None and not timeout > 0:
            raise InvalidArgument(f"timeout must be more than 0 seconds, not {timeout}")
        every = crosscheck_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgument(f"crosscheck_every must be a whole number, 1 or more, not {every!r}")
        self.source = source
        self.crosscheck_every = crosscheck_every if events else 1
        self.domains = None if domains is None else list(domains)
        self.timeout = timeout
        self.events = events
        self.clock = clock
        self.log_changes = log_changes
        self._warn = LOG.warning if log_changes else LOG.debug
        self.totals = Totals()
        self._readonly = readonly
        self._grace = grace
        self._opener = opener
        self._pool = WorkerPool(workers, workers + MAX_STUCK_THREADS, name="vbs-collector")
        self._lock = threading.Lock()  # one cycle at a time
        self._last: Optional[Cycle] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._thread_abandoned: Optional[threading.Thread] = None
        self._unreported: "collections.Counter[str]" = collections.Counter()  # calls not yet in a cycle
        self._on_state: Dict[Tuple[str, str], str] = {}
        self._interval: Optional[float] = None  # set by run()
        if events:
            start_event_loop()
        # ``workers`` bounds the bulk calls in flight too: one worker means one
        # QMP read and one bulk call at a time.
        bulk = min(BULK_CHUNKS, workers)
        if clients is not None:
            self._sessions = [_HostSession(c.host.uri, c, bulk) for c in clients]
            for session in self._sessions:
                assert session.client is not None
                session.seen = session.client.host.counter.snapshot()  # count only our own calls
        else:
            self._sessions = [_HostSession(u, None, bulk) for u in (uris or [default_uri()])]

    # -- life cycle ----------------------------------------------------------

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def last(self) -> Optional[Cycle]:
        """The last complete cycle, or ``None`` before the first."""
        return self._last

    def guest(self, uri: str, uuid: str) -> Optional[Guest]:
        """The :class:`Guest` this collector reads a domain through, while it knows the domain.

        For what runs between cycles in the collector's thread (``on_cycle``),
        such as advice made from the domains of the last cycle: it reuses the
        collector's connection and domain object, so it costs no lookup.
        """
        for session in self._sessions:
            if session.uri == uri and uuid in session.entries:
                return session.entries[uuid].guest
        return None

    def host(self, uri: str) -> Optional[Host]:
        """The connection this collector reads ``uri`` through, while it is open (for ``on_cycle``)."""
        for session in self._sessions:
            if session.uri == uri and session.client is not None:
                return session.client.host
        return None

    @property
    def threads(self) -> int:
        """Worker threads alive now (stuck ones included)."""
        return self._pool.threads

    def start(self, interval: float, on_cycle: Optional[Callable[[Cycle], None]] = None) -> None:
        """Collect every ``interval`` seconds in a background thread until :meth:`stop`.

        Each domain's deadline is ``timeout`` if given, else the interval. A
        cycle that overruns makes the next start at once, never two at a time.
        ``on_cycle`` is called in that thread after each cycle.
        """
        if not interval > 0:
            raise InvalidArgument(f"interval must be more than 0 seconds, not {interval}")
        if self._thread is not None:
            raise InvalidArgument("the collector is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(interval, on_cycle), name="vbs-collector-loop", daemon=True
        )
        self._thread.start()

    def run(
        self, interval: float, on_cycle: Optional[Callable[[Cycle], None]] = None, *, count: int = 0
    ) -> None:
        """Collect every ``interval`` seconds in this thread until :meth:`request_stop`.

        :param count: Stop after this many cycles (0: until asked to stop).
        """
        deadline = self.timeout or interval
        self._interval = interval
        next_at = time.monotonic()
        done = 0
        try:
            while not self._stop.is_set():
                cycle = self.collect(timeout=deadline)
                done += 1
                if self._stop.is_set() and threading.current_thread() is self._thread_abandoned:
                    return  # stop() has given up waiting for this cycle: nobody wants it
                if on_cycle is not None:
                    on_cycle(cycle)
                if count and done >= count:
                    return
                next_at += interval
                now = time.monotonic()
                if next_at < now:
                    next_at = now  # overran: start the next cycle at once, skip the missed ticks
                self._stop.wait(next_at - now)
        finally:
            if threading.current_thread() is self._thread_abandoned:
                self._shutdown_pools()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`request_stop` (or :meth:`stop`) was called."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Make :meth:`run` return after the cycle in progress; safe in a signal handler."""
        self._stop.set()

    def stop(self, *, close: Optional[bool] = None, wait: Optional[float] = 5.0) -> None:
        """Stop the background loop and close the connections this collector opened.

        Waits up to ``wait`` seconds for a cycle in progress, and not at all
        for calls stuck on a hung QEMU: their daemon threads are abandoned.
        ``close=False`` leaves every connection open. A stopped collector
        cannot be started again.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)
            if thread.is_alive():
                # A cycle is still waiting on libvirt: its thread shuts the
                # pools down itself when it ends, and reports nothing more.
                self._thread_abandoned = thread
        if self._thread_abandoned is None or not self._thread_abandoned.is_alive():
            self._shutdown_pools()
        for session in self._sessions:
            if session.client is not None and (close if close is not None else session.owned):
                session.client.close()
                session.client = None

    def _shutdown_pools(self) -> None:
        self._pool.shutdown()
        for session in self._sessions:
            session.bulk.shutdown()

    # -- one cycle -------------------------------------------------------------

    def collect(self, timeout: Optional[float] = None) -> Cycle:
        """Read every domain once and return the cycle; never raises for a domain or host.

        :param timeout: This cycle's deadline per domain (default: the
            collector's ``timeout``, else :data:`DEFAULT_TIMEOUT`).
        """
        with self._lock:
            return self._collect(timeout or self.timeout or DEFAULT_TIMEOUT)

    def _collect(self, timeout: float) -> Cycle:
        started_at, start = self.clock(), time.monotonic()
        deadline = start + timeout
        hosts: Dict[str, HostState] = {}
        problems: List[Problem] = []
        planned: List[Tuple[_HostSession, List[Work]]] = []
        rounds: List[Tuple[BulkRound, List[Work]]] = []
        # Bulk calls and the last QEMU read of each host wake the pipeline.
        wake: "queue.SimpleQueue[None]" = queue.SimpleQueue()
        stuck = sum(1 for s in self._sessions for e in s.entries.values() if e.busy)
        self._pool.reserve(stuck)
        # libvirt's event loop waits while this cycle's calls run (see
        # EventLoopHold), until the reads stall or the bulk calls are back.
        hold = EventLoopHold()
        try:
            # Everyone reads QEMU first; bulk calls then cover those that answered.
            self._start(problems, hosts, planned, rounds, wake)
            run_rounds(self._pool, rounds, wake, start, deadline, timeout, stuck, hold)
        finally:
            hold.release()
        futures = [f for _, work in planned for _, f in work if isinstance(f, concurrent.futures.Future)]
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        samples: List[Sample] = []
        by_uri: Dict[str, "collections.Counter[str]"] = collections.defaultdict(collections.Counter)
        for session, work in planned:
            lost = False
            for entry, item in work:
                sample = self._settle(session, entry, item)
                if sample is None:
                    continue
                if isinstance(sample.error, ConnectionFailed):
                    lost = True
                if sample.status is Status.UNRESPONSIVE:
                    by_uri[session.uri]["unresponsive"] += 1
                elif sample.error is not None:
                    by_uri[session.uri][type(sample.error).__name__] += 1
                samples.append(sample)
                self._log_change(session.uri, sample)
            if lost and session.client is not None and not session.client.host.alive():
                self._lose(session, "a call failed on a lost connection")
                hosts[session.uri] = self._down(session)
                samples = [self._lost(s) if s.uri == session.uri else s for s in samples]
        for session in self._sessions:
            host = hosts.get(session.uri)
            lanes = session.client.host.lanes if session.client is not None else None
            if host is not None and host.up and lanes is not None:
                hosts[session.uri] = dataclasses.replace(host, lanes=lanes.stats(stuck_after=timeout))
        for problem in problems:
            by_uri[problem.uri][type(problem.error).__name__] += 1
        errors: "collections.Counter[str]" = collections.Counter()
        for uri, kinds in by_uri.items():
            errors.update(kinds)
            self.totals.errors_by_uri.setdefault(uri, collections.Counter()).update(kinds)
        self._unreported.update(self._count_calls())
        calls, self._unreported = dict(self._unreported), collections.Counter()
        duration = time.monotonic() - start
        with_number = self.totals.cycles + 1
        self.totals.cycles = with_number
        self.totals.calls.update(calls)
        self.totals.errors.update(errors)
        self.totals.seconds += duration
        for uri, host in hosts.items():
            if host.up:
                self.totals.last_up[uri] = started_at
        cycle = Cycle(
            number=with_number,
            started_at=started_at,
            duration=duration,
            samples=tuple(samples),
            hosts=hosts,
            problems=tuple(problems),
            calls=calls,
            errors=dict(errors),
        )
        self._last = cycle
        return cycle

    def _start(
        self,
        problems: List[Problem],
        hosts: Dict[str, HostState],
        planned: List[Tuple[_HostSession, List[Work]]],
        rounds: List[Tuple[BulkRound, List[Work]]],
        wake: "queue.SimpleQueue[None]",
    ) -> None:
        """Connect each host as needed and start every domain's QEMU read (or settle it at once)."""
        for session in self._sessions:
            self._drain_events(session)
            if not self._connect(session, problems):
                hosts[session.uri] = self._down(session)
                planned.append((session, [(e, self._unreachable(session, e)) for e in self._known(session)]))
                continue
            try:
                bulk, work = self._plan(session, problems, wake)
            except ConnectionFailed as err:
                self._lose(session, str(err))
                hosts[session.uri] = self._down(session)
                planned.append((session, [(e, self._unreachable(session, e)) for e in self._known(session)]))
                continue
            hosts[session.uri] = HostState(session.uri, True)
            planned.append((session, work))
            if bulk is not None:
                rounds.append((bulk, work))

    # -- connection ----------------------------------------------------------

    def _open(self, uri: str) -> BalloonStats:
        if self._opener is not None:
            return self._opener(uri)
        return BalloonStats.open(uri, readonly=self._readonly, grace=self._grace)

    def _connect(self, session: _HostSession, problems: List[Problem]) -> bool:
        """Make sure the session has a live connection; on failure, schedule a retry."""
        if session.client is not None:
            return True
        now = time.monotonic()
        # A little early is fine: cycles start on a schedule, not exactly at retry_at.
        if now < session.retry_at - _RETRY_SLACK:
            return False
        try:
            client = self._open(session.uri)
        except BalloonStatsError as err:
            session.retry_at = now + self._retry_delay(session)
            if not session.lost:
                problems.append(Problem(session.uri, session.uri, err))
                session.lost = str(err)
            return False
        if self.events:
            try:
                client.host.watch(session.events.put)
            except BalloonStatsError as err:
                client.close()
                problems.append(Problem(session.uri, session.uri, err))
                session.retry_at = now + self._retry_delay(session)
                return False
        if session.lost:
            self._warn("%s: reconnected", session.uri)
        session.client = client
        session.owned = True
        session.lost = ""
        session.backoff = RECONNECT_FIRST
        session.relist_due = 0.0
        session.seen = {}
        # Guests of the old connection are useless now; their memos go with them.
        session.entries = {}
        return True

    def _retry_delay(self, session: _HostSession) -> float:
        """The next reconnect delay: 1 s doubling to 30 s, but never over one interval.

        Attempts are made only at the start of a cycle, so a background
        collector tries once per cycle at most; capping the delay at the
        interval keeps "fresh within two intervals of libvirtd answering"
        after a long outage too.
        """
        delay = session.backoff
        session.backoff = min(session.backoff * 2, RECONNECT_MAX)
        return min(delay, self._interval) if self._interval else delay

    def _lose(self, session: _HostSession, why: str) -> None:
        if session.client is None:
            return
        self._warn("%s: %s (%s)", session.uri, LOST_CONNECTION, why)
        self._unreported.update(self._count_calls())  # the old connection's last calls count too
        if session.owned:
            session.client.close()
        session.client = None
        session.lost = why
        session.retry_at = time.monotonic()  # first attempt at once, then back off
        session.backoff = RECONNECT_FIRST

    def _down(self, session: _HostSession) -> HostState:
        retry = max(0.0, session.retry_at - time.monotonic())
        return HostState(session.uri, False, f"{LOST_CONNECTION}: {session.lost}", retry)

    def _drain_events(self, session: _HostSession) -> None:
        """Act on what libvirt told us since the last cycle (in this thread, not libvirt's)."""
        while True:
            try:
                event = session.events.get_nowait()
            except queue.Empty:
                return
            LOG.debug("%s: event %s %s %s", session.uri, event.kind, event.uuid, event.detail)
            if event.kind == "closed":
                self._lose(session, f"libvirt closed the connection: {event.detail}")
            elif event.kind == "lifecycle":
                session.relist_due = 0.0
            elif event.kind == "balloon" and event.uuid in session.entries:
                # libvirt keeps its balloon size from these same events; a
                # cycle that does not ask libvirt for its figures uses this one.
                session.entries[event.uuid].memo.actual_kib = int(event.detail)
            elif event.kind == "device" and event.uuid in session.entries:
                entry = session.entries[event.uuid]
                entry.memo = DomainMemo()  # re-parse the XML; a pending call keeps its own memo
                if session.client is not None:
                    session.client.paths.forget(entry.guest)

    # -- planning and settling ---------------------------------------------------

    def _plan(
        self, session: _HostSession, problems: List[Problem], wake: "queue.SimpleQueue[None]"
    ) -> Tuple[Optional[BulkRound], List[Work]]:
        """List the domains if needed and start each domain's reading of QEMU."""
        client = session.client
        assert client is not None
        now = time.monotonic()
        if not self.events or now >= session.relist_due:
            self._relist(session, problems)
            session.relist_due = now + RELIST_SECONDS
        # Decided once: a call still out may come back while this loop runs.
        entries = [(session.entries[k], session.entries[k].busy) for k in self._order(session)]
        free = sum(1 for _, busy in entries if not busy)
        # With the libvirt source no QMP read runs for a bulk call to overlap: one call for all.
        calls = 1 if self.source == "libvirt" else None
        bulk = BulkRound(client, session.bulk, free, self.source != "qmp", wake, calls) if free else None
        work: List[Work] = []
        for phase, (entry, busy) in enumerate(entries):
            if busy or bulk is None:
                work.append((entry, self._unresponsive(session, entry)))
                continue
            compare = self.source != "both" or entry.memo.due(self.crosscheck_every, phase)
            entry.pending_since = time.monotonic()
            entry.pending = start_reading(self._pool, client, entry, bulk, self.source, compare)
            work.append((entry, entry.pending))
        return bulk, work

    def _relist(self, session: _HostSession, problems: List[Problem]) -> None:
        """Bring the session's entries in line with the running (or named) domains."""
        client = session.client
        assert client is not None
        if self.domains is None:
            guests = client.guests()
            client.paths.retain(guests)
        else:
            guests = []
            for ref in self.domains:
                try:
                    guests.append(client.guest(ref))
                except ConnectionFailed:
                    raise
                except BalloonStatsError as err:
                    if not any(p.what == str(ref) for p in problems):
                        problems.append(Problem(str(ref), session.uri, err))
        fresh: Dict[str, DomainSlot] = {}
        for guest in guests:
            old = session.entries.get(guest.uuid)
            same = old is not None and old.guest.cache_key == guest.cache_key
            fresh[guest.uuid] = old if old is not None and same else DomainSlot(guest)
        session.entries = fresh
        if client.host.lanes is not None:
            client.host.lanes.retain(g.cache_key for g in guests)
        # A domain named twice (by name and by UUID, say) is read once.
        session.order = list(dict.fromkeys(g.uuid for g in guests))

    def _order(self, session: _HostSession) -> List[str]:
        return [k for k in session.order if k in session.entries]

    def _settle(
        self,
        session: _HostSession,
        entry: DomainSlot,
        item: Union[Sample, "concurrent.futures.Future[Union[Reading, Sample]]"],
    ) -> Optional[Sample]:
        """Turn a planned item into the cycle's sample, or ``None`` to leave the domain out."""
        if isinstance(item, Sample):
            return item
        if not item.done():
            return self._unresponsive(session, entry)
        entry.pending = None
        try:
            result = item.result()
            assert isinstance(result, Sample), "a joined reading is finished before settling"
            sample = result
        except BalloonStatsError as err:  # sample() turns these into samples; belt and braces
            sample = dataclasses.replace(
                self._placeholder(session.uri, entry.guest, None, Status.UNREACHABLE, str(err)), error=err
            )
        if self.domains is None and isinstance(sample.error, (DomainNotFound, DomainNotRunning)):
            # Destroyed between listing and reading: gone, not failed.
            session.entries.pop(entry.guest.uuid, None)
            session.relist_due = 0.0
            return None
        entry.last = sample
        return sample

    def _unresponsive(self, session: _HostSession, entry: DomainSlot) -> Sample:
        waited = time.monotonic() - entry.pending_since
        again = "; not asked again until it answers" if self.events or entry.last else ""
        message = unanswered(waited) + again
        return self._placeholder(session.uri, entry.guest, entry.last, Status.UNRESPONSIVE, message)

    def _unreachable(self, session: _HostSession, entry: DomainSlot) -> Sample:
        return self._placeholder(session.uri, entry.guest, entry.last, Status.UNREACHABLE, LOST_CONNECTION)

    def _lost(self, sample: Sample) -> Sample:
        """A sample read on a connection found lost in the same cycle, as unreachable."""
        return dataclasses.replace(
            self._placeholder(sample.uri, None, sample, Status.UNREACHABLE, LOST_CONNECTION),
            domain=sample.domain,
            uuid=sample.uuid,
            id=sample.id,
        )

    def _placeholder(
        self, uri: str, guest: Optional[Guest], last: Optional[Sample], status: Status, message: str
    ) -> Sample:
        """A sample without figures, for a domain that could not be read this cycle."""
        return not_read(
            uri,
            guest.name if guest is not None else last.domain if last is not None else "",
            guest.uuid if guest is not None else last.uuid if last is not None else "",
            guest.id if guest is not None else last.id if last is not None else None,
            source=self.source,
            sampled_at=self.clock(),
            status=status,
            message=message,
            last=last,
        )

    def _known(self, session: _HostSession) -> List[DomainSlot]:
        return [session.entries[k] for k in self._order(session)]

    def _count_calls(self) -> Dict[str, int]:
        """libvirt calls since the last count, summed over every connection (and kept per URI)."""
        calls: "collections.Counter[str]" = collections.Counter()
        for session in self._sessions:
            if session.client is None:
                continue
            now = session.client.host.counter.snapshot()
            mine = self.totals.calls_by_uri.setdefault(session.uri, collections.Counter())
            for name, count in now.items():
                delta = count - session.seen.get(name, 0)
                if delta:
                    calls[name] += delta
                    mine[name] += delta
            session.seen = now
        return dict(calls)

    def _log_change(self, uri: str, sample: Sample) -> None:
        """One log line when a domain becomes unresponsive or comes back, not one per cycle."""
        key = (uri, sample.uuid)
        before = self._on_state.get(key)
        now = sample.status.value
        self._on_state[key] = now
        if before == now or (before is None and sample.status is not Status.UNRESPONSIVE):
            return
        if sample.status is Status.UNRESPONSIVE:
            self._warn("%s: %s", sample.domain, sample.message)
        elif before == Status.UNRESPONSIVE.value:
            self._warn("%s: QEMU answers again", sample.domain)

"""Call scheduling: each libvirt call that names a domain gets a connection to itself.

A *lane* is one extra libvirt connection to the same URI, carrying at most
one call at a time. A collector runs every call that names a domain (the
QMP passthrough, ``memoryStats()``, ``XMLDesc``, the bulk stats call) in a
lane it leases for the task (:meth:`Lanes.lease`); the connection it was
opened with keeps the calls that name no domain (listing, look-ups), the
events, the close callback and keepalive. A call that never returns, as the
first call to a stopped QEMU's monitor does, then holds its own lane and
nothing else: the next task leases another, opened on demand (about 1 ms on
the testbed), and the stuck lane serves again once its call returns.

Why not many calls on one connection: two reasons, both measured on the
testbed (libvirt 9.0; see the README's Collector section for the log lines).

* **libvirt's RPC client can lose the wake-up of a call.** Threads share a
  connection by letting one of them, the one "holding the buck", do the
  socket I/O for all. A thread that queues a call while another holds the
  buck wakes it with ``g_main_loop_quit()``; when the holder is between
  releasing the client lock and entering ``g_main_loop_run()``, the wake-up
  is lost and the call is not even written to the socket until the next
  message arrives on that connection (``virNetClientIO`` and
  ``virNetClientIOEventLoop`` in ``src/rpc/virnetclient.c``). A call to a
  stopped QEMU ends up holding the buck, and no message may come for it
  again: a healthy domain's call sat unsent for 2.5 s, until the next
  cycle's calls arrived, in 1 trial in 15.
* **libvirtd serves at most** ``max_client_requests`` **(5) calls per
  connection at once** and stops reading the connection at that count, so
  calls that cannot finish take slots from every other call on it.

One call per connection removes both, with libvirtd's defaults. A larger
``max_client_requests`` would remove only the second.

The lease is carried in a context variable: :class:`~virt_balloon_stats.host.Guest`
and :class:`~virt_balloon_stats.host.Host` ask :meth:`Lanes.current` which
connection the calling thread's call goes to, so nothing between the
collector and the libvirt edge needs to know about lanes. This module
imports nothing of libvirt: it schedules opaque connection objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from virt_balloon_stats.errors import TooManyCallsStuck

__all__ = ["MAX_CALLS", "LEASE_WAIT", "Lane", "Lanes", "LaneStats"]

#: Calls in flight per URI, at most: 8 workers and 3 bulk calls at full
#: speed, and room for 5 stuck calls before a new call has to wait. Each
#: call running holds one of libvirtd's worker threads (``max_workers``, 20
#: by default, shared by every client): with this bound, calls stuck on
#: hung QEMUs never take more than 16 of them, and virsh and the other
#: clients keep the rest.
MAX_CALLS = 16

#: Seconds a task waits for a lane when :data:`MAX_CALLS` are running.
LEASE_WAIT = 2.0

#: How a domain is keyed in a lane: (UUID, id), which changes when it restarts.
Key = Tuple[str, Optional[int]]

#: The lease of the running thread: (the pool it came from, the lane).
_LEASE: "contextvars.ContextVar[Optional[Tuple[Lanes, Lane]]]" = contextvars.ContextVar(
    "virt_balloon_stats_lane", default=None
)


@dataclasses.dataclass(frozen=True)
class LaneStats:
    """The calls and connections of one pool, as of now.

    :ivar connections: Lanes open (busy or idle); the pool's own connection is not counted.
    :ivar in_flight: Calls running now, one per busy lane.
    :ivar stuck: Calls running for longer than the ``stuck_after`` asked for.
    :ivar oldest_seconds: How long the oldest call has run (0 when none is running).
    """

    connections: int
    in_flight: int
    stuck: int
    oldest_seconds: float


class Lane:
    """One connection of a pool, with the domains looked up on it.

    :ivar conn: The connection (a ``libvirt.virConnect``).
    :ivar since: When the running call's lease began (``None`` while idle).
    """

    def __init__(self, conn: Any, number: int, pool: "Optional[Lanes]" = None) -> None:
        self.conn = conn
        self.number = number
        self._pool = pool
        self.since: Optional[float] = None
        self._domains: Dict[Key, Any] = {}
        self._listed = -1  # the pool's generation when this lane last listed its domains
        self._kept = -1  # ... and when it last forgot the domains the pool no longer keeps

    def __repr__(self) -> str:
        return f"Lane({self.number}, busy={self.since is not None})"

    def domain(self, key: Key, lookup: Callable[[Any], Any]) -> Any:
        """This lane's handle of the domain ``key`` (UUID, id).

        The first time, the lane lists every running domain in one call (the
        pool's ``lister``), so a new lane costs one round trip rather than
        one per domain; a domain still missing after that (not running, or
        started since) is found with ``lookup(conn)``. Only the leasing
        thread uses a lane, so the cache needs no lock.
        """
        found = self._domains.get(key)
        if found is None:
            pool = self._pool
            if pool is not None and pool.lister is not None and self._listed != pool.generation:
                self._listed = pool.generation
                self._domains.update(pool.lister(self.conn))
                found = self._domains.get(key)
            if found is None:
                found = self._domains[key] = lookup(self.conn)
        return found

    def retain(self, keys: FrozenSet[Key]) -> None:
        """Forget the handles of domains not in ``keys`` (they stopped or restarted)."""
        self._domains = {k: v for k, v in self._domains.items() if k in keys}


class Lanes:
    """A pool of lanes to one URI; see the module docstring.

    :param opener: Opens one more connection to the URI (and counts it).
    :param closer: Closes one; never raises.
    :param lister: The running domains of one connection, by (UUID, id): a
        new lane's handles, in one round trip (without it, each domain is
        looked up on its own).
    :param keep: Idle lanes kept open for the next tasks; more are closed
        as their calls return (a burst of stuck calls leaves nothing behind).
    :param alive: Whether a connection still works, without a round trip; a
        lane whose connection was lost is closed when its call returns,
        never handed out again.
    :param limit: Calls in flight at most (see :data:`MAX_CALLS`).
    :param wait: Seconds a lease waits for a call to return when ``limit``
        are running, before it gives up with :class:`TooManyCallsStuck`.
    """

    def __init__(
        self,
        opener: Callable[[], Any],
        closer: Callable[[Any], None],
        *,
        lister: Optional[Callable[[Any], Dict[Key, Any]]] = None,
        alive: Optional[Callable[[Any], bool]] = None,
        keep: int = 11,
        limit: int = MAX_CALLS,
        wait: float = LEASE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keep < 0 or limit < 1:
            raise ValueError(f"need keep >= 0 and limit >= 1, not keep={keep} limit={limit}")
        self.limit = limit
        self.wait = wait
        self._opener = opener
        self._closer = closer
        self.lister = lister
        self._alive = alive
        #: Bumped by :meth:`retain`: a lane lists its domains again on its next miss.
        self.generation = 0
        self.keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a busy lane came back
        self._idle: List[Lane] = []
        self._busy: List[Lane] = []
        self._numbers = 0
        self._opening = 0  # lanes being opened: they count as busy
        self._closed = False
        self._retained: Optional[FrozenSet[Key]] = None

    def current(self) -> Optional[Lane]:
        """The lane the calling thread leased from this pool, if any."""
        lease = _LEASE.get()
        if lease is None or lease[0] is not self:
            return None
        return lease[1]

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lane]:
        """Run the block's calls in a lane of their own; the lane serves again when the block ends.

        :raise TooManyCallsStuck: When ``limit`` calls stay running for ``wait`` seconds.
        :raise: Whatever ``opener`` raises when no idle lane is left and a
            new connection cannot be opened.
        """
        if _LEASE.get() is not None:
            raise RuntimeError("a lane is already leased by this thread")
        lane = self._take()
        token = _LEASE.set((self, lane))
        try:
            yield lane
        finally:
            _LEASE.reset(token)
            self._give_back(lane)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a leased lane: the form a worker pool's task takes."""
        with self.lease():
            return fn(*args)

    def _take(self) -> Lane:
        with self._lock:
            if self._running() >= self.limit and not self._freed.wait_for(
                lambda: self._running() < self.limit or self._closed, self.wait
            ):
                raise TooManyCallsStuck(
                    f"not sent: {len(self._busy)} libvirt calls on this connection are still running,"
                    " stuck on QEMUs that do not answer; they hold libvirtd worker threads, and the"
                    " rest are left to other clients; see the domains reported unresponsive"
                )
            if self._closed:
                raise RuntimeError("the lanes are closed")
            if self._idle:
                lane = self._idle.pop()
                lane.since = self._clock()
                self._busy.append(lane)
                return lane
            self._numbers += 1
            number = self._numbers
            self._opening += 1
        try:
            conn = self._opener()  # outside the lock: opening is a round trip
        except BaseException:
            with self._lock:
                self._opening -= 1
                self._freed.notify()
            raise
        lane = Lane(conn, number, self)
        lane.since = self._clock()
        with self._lock:
            self._opening -= 1
            closed = self._closed
            if not closed:
                self._busy.append(lane)
        if closed:
            self._closer(conn)
            raise RuntimeError("the lanes are closed")
        return lane

    def _running(self) -> int:
        """Calls in flight, and lanes being opened for one; the caller holds the lock."""
        return len(self._busy) + self._opening

    def _give_back(self, lane: Lane) -> None:
        dead = self._alive is not None and not self._alive(lane.conn)
        with self._lock:
            self._busy.remove(lane)
            self._freed.notify()
            lane.since = None
            close = dead or self._closed or len(self._idle) >= self.keep
            if not close:
                if self._retained is not None and lane._kept != self.generation:
                    lane.retain(self._retained)
                    lane._kept = self.generation
                self._idle.append(lane)
        if close:
            self._closer(lane.conn)

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget, in every lane, the handles of domains not in ``keys`` (a busy lane, when it returns).

        Called when the domains were listed again: a lane that then misses a
        domain lists its own again once.
        """
        keep = frozenset(keys)
        with self._lock:
            if keep == self._retained:
                return
            self._retained = keep
            self.generation += 1
            for lane in self._idle:
                lane.retain(keep)
                lane._kept = self.generation

    def stats(self, stuck_after: float) -> LaneStats:
        """Calls in flight, those running longer than ``stuck_after`` seconds, and lanes open."""
        with self._lock:
            now = self._clock()
            ages = [now - lane.since for lane in self._busy if lane.since is not None]
            return LaneStats(
                connections=len(self._idle) + len(self._busy),
                in_flight=len(ages),
                stuck=sum(1 for age in ages if age > stuck_after),
                oldest_seconds=max(ages, default=0.0),
            )

    def close(self) -> None:
        """Close the idle lanes now, and each busy one when its call returns (a stuck call may never)."""
        with self._lock:
            self._closed = True
            self._freed.notify_all()
            idle, self._idle = self._idle, []
        for lane in idle:
            self._closer(lane.conn)

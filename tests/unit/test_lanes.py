"""virt_balloon_stats.lanes: a pool of connections, each carrying one call at a time.

The module schedules opaque connection objects, so these tests give it
plain objects and count what it opens and closes; no libvirt is involved.
A lease held "at once" is held in a thread of its own, which waits on an
Event the test sets in a ``finally``; the clock is injected wherever an age
is asserted. Waits have generous bounds and are only there so that a
broken pool fails instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.unit.conftest import wait_until
from virt_balloon_stats.errors import TooManyCallsStuck
from virt_balloon_stats.lanes import Key, Lane, Lanes, LaneStats

#: Upper bound for anything that should happen at once.
PATIENCE = 5.0

#: Bound of a lease held "at once": only the test lets it go, well before.
HOLD = 60.0

#: Time given to a task to start waiting. Correct code passes whatever the machine's pace; a
#: lease that does not wait is caught unless its thread gets no turn in all that time.
SETTLE = 0.2

#: Two domains, and one restarted (same UUID, new id), as Guest.cache_key gives them.
WEB: Key = ("8f1b4c3e-0000-4000-8000-000000000001", 3)
DB: Key = ("8f1b4c3e-0000-4000-8000-000000000002", 4)
DB_RESTARTED: Key = (DB[0], 9)

#: What a pool with nothing open and nothing running says.
EMPTY = LaneStats(connections=0, in_flight=0, stuck=0, oldest_seconds=0.0)


class Conn:
    """A stand-in connection: only its identity matters to the pool."""

    def __init__(self, number: int) -> None:
        self.number = number

    def __repr__(self) -> str:
        return f"Conn({self.number})"


class Connections:
    """The pool's opener and closer, keeping count; the first ``refuse`` opens raise."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.opened: List[Conn] = []
        self.closed: List[Conn] = []
        self._lock = threading.Lock()

    def open(self) -> Conn:
        with self._lock:
            if self.refuse:
                self.refuse -= 1
                raise ConnectionRefusedError("cannot connect")
            conn = Conn(len(self.opened) + 1)
            self.opened.append(conn)
            return conn

    def close(self, conn: Conn) -> None:
        with self._lock:
            self.closed.append(conn)

    @property
    def open_now(self) -> List[Conn]:
        with self._lock:
            return [c for c in self.opened if c not in self.closed]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Lookups:
    """A domain look-up: a new handle each time, remembering which connection it was asked on."""

    def __init__(self) -> None:
        self.asked: List[Tuple[Any, Key]] = []

    def of(self, key: Key) -> Any:
        def lookup(conn: Any) -> Any:
            self.asked.append((conn, key))
            return ("handle", conn, key, len(self.asked))

        return lookup


@pytest.fixture
def conns() -> Connections:
    return Connections()


@pytest.fixture
def lanes(conns: Connections) -> Lanes:
    return Lanes(conns.open, conns.close)


@pytest.fixture
def threads() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for tasks that wait; a test releases what holds them before this ends."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def held(pool: Lanes, count: int) -> Iterator[List[Lane]]:
    """``count`` leases held at once, each by a thread of its own, until the block ends."""
    ready = threading.Barrier(count + 1)
    release = threading.Event()
    leased: List[Lane] = []

    def hold() -> None:
        with pool.lease() as lane:
            leased.append(lane)
            ready.wait(PATIENCE)
            release.wait(HOLD)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(PATIENCE)
        yield list(leased)
    finally:
        release.set()
        for thread in threads:
            thread.join(PATIENCE)
        assert not any(t.is_alive() for t in threads), "a lease was not given back"


# -- leasing ---------------------------------------------------------------------------------


def test_a_lease_reuses_an_idle_lane(lanes, conns):
    """One task after another: one connection, opened once, never closed."""
    with lanes.lease() as first:
        assert first.conn is conns.opened[0]
    with lanes.lease() as second:
        pass
    assert second is first
    assert conns.opened == [first.conn] and conns.closed == []
    assert lanes.stats(stuck_after=1.0) == LaneStats(connections=1, in_flight=0, stuck=0, oldest_seconds=0.0)


def test_leases_held_at_once_get_lanes_of_their_own(lanes, conns):
    """Three calls at once: three lanes on three connections; all serve again when they return."""
    with held(lanes, 3) as leased:
        assert len({id(lane) for lane in leased}) == 3
        assert sorted(lane.conn.number for lane in leased) == [1, 2, 3]
        assert lanes.stats(stuck_after=60.0).in_flight == 3
    assert lanes.stats(stuck_after=60.0) == LaneStats(connections=3, in_flight=0, stuck=0, oldest_seconds=0.0)
    with held(lanes, 3) as again:
        assert {id(lane) for lane in again} == {id(lane) for lane in leased}
    assert len(conns.opened) == 3


def test_a_lane_still_leased_is_never_handed_out_again(lanes, conns):
    """A call that does not return keeps its lane; the tasks after it get another, opened for them."""
    with held(lanes, 1) as [stuck]:
        served = []
        for _ in range(4):
            with lanes.lease() as lane:
                served.append(lane)
        assert all(lane is not stuck for lane in served)
        assert all(lane is served[0] for lane in served)  # the new one, reused
        assert conns.opened == [stuck.conn, served[0].conn]
        assert lanes.stats(stuck_after=60.0).in_flight == 1
    # Its call returned: the stuck lane serves again, and nothing more is opened.
    with held(lanes, 2) as both:
        assert {id(lane) for lane in both} == {id(stuck), id(served[0])}
    assert len(conns.opened) == 2 and conns.closed == []


def test_a_lease_ending_in_an_error_gives_its_lane_back(lanes, conns):
    """A call that raised still frees its lane: the error goes on, the lane serves the next task."""
    with pytest.raises(KeyError):
        with lanes.lease() as first:
            raise KeyError("the call failed")
    assert lanes.current() is None
    with lanes.lease() as second:
        assert second is first
    assert len(conns.opened) == 1


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_keep_bounds_the_idle_lanes(conns, keep):
    """Three lanes at once with ``keep`` idle allowed: the others are closed as their calls return."""
    lanes = Lanes(conns.open, conns.close, keep=keep)
    with held(lanes, 3) as leased:
        assert conns.closed == []  # nothing is closed while in use
    assert len(conns.opened) == 3
    assert len(conns.closed) == 3 - keep
    assert lanes.stats(stuck_after=1.0).connections == keep == len(conns.open_now)
    with lanes.lease() as lane:
        assert (lane.conn in conns.open_now) and (keep == 0 or lane in leased)
    assert len(conns.opened) == 3 + (keep == 0)


@pytest.mark.parametrize("kwargs", [dict(keep=-1), dict(limit=0)], ids=["keep=-1", "limit=0"])
def test_bounds_are_checked(conns, kwargs):
    with pytest.raises(ValueError):
        Lanes(conns.open, conns.close, **kwargs)


def test_close_closes_idle_lanes_now_and_busy_ones_when_they_return(lanes, conns):
    """A stuck call may never return: close() does not wait for it, and closes its lane when it does."""
    with held(lanes, 3):
        pass
    with held(lanes, 1) as [busy]:
        lanes.close()
        assert sorted(c.number for c in conns.closed) == sorted(
            c.number for c in conns.opened if c is not busy.conn
        )
        assert busy.conn not in conns.closed
    assert busy.conn in conns.closed and conns.open_now == []
    with pytest.raises(RuntimeError):
        with lanes.lease():
            pytest.fail("a closed pool leased a lane")
    assert len(conns.opened) == 3
    assert lanes.stats(stuck_after=1.0) == EMPTY


def test_close_while_a_lane_is_being_opened_closes_that_connection_too(conns):
    """Opening runs outside the pool's lock: a close() meanwhile must not leave the new connection open."""
    pool: List[Lanes] = []

    def open_as_the_pool_closes() -> Conn:
        pool[0].close()
        return conns.open()

    lanes = Lanes(open_as_the_pool_closes, conns.close)
    pool.append(lanes)
    with pytest.raises(RuntimeError):
        with lanes.lease():
            pytest.fail("a closed pool leased a lane")
    assert len(conns.opened) == 1 and conns.closed == conns.opened
    assert lanes.stats(stuck_after=1.0) == EMPTY


def test_an_opener_that_raises_leaves_no_busy_lane_behind():
    """libvirt refused the connection: the lease fails with its error, and the pool is as before
    (its place among the calls in flight too: the next lease, allowed one and no wait, gets it)."""
    conns = Connections(refuse=1)
    lanes = Lanes(conns.open, conns.close, limit=1, wait=0.0)
    with pytest.raises(ConnectionRefusedError):
        with lanes.lease():
            pytest.fail("leased a lane without a connection")
    assert lanes.stats(stuck_after=0.0) == EMPTY
    assert lanes.current() is None
    with lanes.lease() as lane:
        assert lane.conn is conns.opened[0]
    assert lanes.stats(stuck_after=1.0).connections == 1


# -- calls in flight, at most ``limit`` --------------------------------------------------------


def test_a_lease_waits_for_a_call_to_return_when_the_limit_is_reached(conns, threads):
    """Two calls allowed, two running: a third task waits, then takes the lane that came back."""
    lanes = Lanes(conns.open, conns.close, limit=2, wait=PATIENCE)
    release = threading.Event()

    def hold() -> Lane:
        with lanes.lease() as lane:
            release.wait(HOLD)
            return lane

    try:
        with held(lanes, 1) as [first]:
            second = threads.submit(hold)
            assert wait_until(lambda: lanes.stats(stuck_after=60.0).in_flight == 2)
            third = threads.submit(lanes.run, lanes.current)
            # Neither served nor given a connection of its own while both calls run.
            assert not wait_until(lambda: third.done() or len(conns.opened) > 2, within=SETTLE)
        assert third.result(PATIENCE) is first  # the lane that came back, not a new connection
    finally:
        release.set()
    second.result(PATIENCE)
    assert len(conns.opened) == 2


def test_a_lease_gives_up_when_the_limit_stays_reached(conns):
    """Every call allowed is stuck: after ``wait`` the task is refused with TooManyCallsStuck, unsent."""
    lanes = Lanes(conns.open, conns.close, limit=2, wait=0.05)
    with held(lanes, 2):
        with pytest.raises(TooManyCallsStuck):
            with lanes.lease():
                pytest.fail("a lease over the limit")
        assert lanes.stats(stuck_after=60.0).in_flight == 2
    assert len(conns.opened) == 2
    with lanes.lease() as lane:  # the calls returned: room again
        assert lane.conn in conns.opened


def test_a_lane_being_opened_counts_against_the_limit(conns, threads):
    """Opening is a round trip outside the pool's lock: the lane it is for is already a call in flight."""
    opening, release = threading.Event(), threading.Event()

    def slow_open() -> Conn:
        opening.set()
        release.wait(PATIENCE)
        return conns.open()

    lanes = Lanes(slow_open, conns.close, limit=1, wait=0.0)
    try:
        first = threads.submit(lanes.run, lambda: "served")
        assert opening.wait(PATIENCE)
        with pytest.raises(TooManyCallsStuck):
            with lanes.lease():
                pytest.fail("two calls with a limit of one")
    finally:
        release.set()
    assert first.result(PATIENCE) == "served"
    assert len(conns.opened) == 1


def test_close_wakes_a_lease_waiting_for_room(conns, threads):
    """A task waiting for a call to return is told at once that the pool closed, not after ``wait``."""
    lanes = Lanes(conns.open, conns.close, limit=1, wait=60.0)
    with held(lanes, 1):
        waiting = threads.submit(lanes.run, lambda: pytest.fail("leased from a closed pool"))
        assert not wait_until(waiting.done, within=SETTLE)
        lanes.close()
        with pytest.raises(RuntimeError) as err:
            waiting.result(PATIENCE)
        assert not isinstance(err.value, TooManyCallsStuck)


# -- figures -----------------------------------------------------------------------------------


def test_stats_count_calls_in_flight_stuck_and_the_oldest(conns):
    """Ages come from the pool's clock: a call is stuck once it has run longer than ``stuck_after``."""
    clock = Clock(100.0)
    lanes = Lanes(conns.open, conns.close, clock=clock)
    with held(lanes, 1):
        clock.now = 103.0
        with held(lanes, 1):
            clock.now = 104.5  # the calls have run 4.5 s and 1.5 s
            assert lanes.stats(stuck_after=2.0) == LaneStats(
                connections=2, in_flight=2, stuck=1, oldest_seconds=4.5
            )
            assert lanes.stats(stuck_after=1.0).stuck == 2
            assert lanes.stats(stuck_after=4.5).stuck == 0  # longer than, not as long as
        assert lanes.stats(stuck_after=2.0) == LaneStats(
            connections=2, in_flight=1, stuck=1, oldest_seconds=4.5
        )
        clock.now = 200.0
        assert lanes.stats(stuck_after=2.0).oldest_seconds == 100.0
    assert lanes.stats(stuck_after=0.0) == LaneStats(connections=2, in_flight=0, stuck=0, oldest_seconds=0.0)


def test_a_lane_reused_counts_its_age_from_its_new_lease(conns):
    """An idle lane's earlier lease does not count: its age starts again with each task."""
    clock = Clock(10.0)
    lanes = Lanes(conns.open, conns.close, clock=clock)
    with lanes.lease() as first:
        assert first.since == 10.0
    assert first.since is None
    clock.now = 50.0
    with held(lanes, 1) as [again]:
        assert again is first and again.since == 50.0
        clock.now = 51.0
        assert lanes.stats(stuck_after=5.0) == LaneStats(
            connections=1, in_flight=1, stuck=0, oldest_seconds=1.0
        )


# -- the calling thread's lane ---------------------------------------------------------------


def test_current_is_the_lane_of_this_thread_and_this_pool_only(conns):
    """Only the thread that leased sees its lane, and only through the pool it leased from."""
    lanes, other = Lanes(conns.open, conns.close), Lanes(conns.open, conns.close)
    assert lanes.current() is None
    with lanes.lease() as lane:
        assert lanes.current() is lane
        assert other.current() is None
        elsewhere: List[Any] = []
        thread = threading.Thread(target=lambda: elsewhere.append(lanes.current()))
        thread.start()
        thread.join(PATIENCE)
        assert elsewhere == [None]
    assert lanes.current() is None


def test_run_gives_the_function_its_lane_and_hands_back_its_result(lanes):
    """run() is a worker task's form of a lease: fn sees its lane; the lane is free once it returns."""
    result = lanes.run(lambda x: (x, lanes.current()), 7)
    assert result[0] == 7 and isinstance(result[1], Lane)
    assert lanes.current() is None
    assert lanes.stats(stuck_after=1.0).in_flight == 0
    with pytest.raises(ZeroDivisionError):
        lanes.run(lambda: 1 / 0)
    assert lanes.stats(stuck_after=1.0) == LaneStats(connections=1, in_flight=0, stuck=0, oldest_seconds=0.0)


def test_a_nested_lease_raises_and_leaves_the_outer_one_alone(lanes, conns):
    """A thread holds one lane at a time: asking for a second is a programming error, refused at once."""
    with lanes.lease() as outer:
        with pytest.raises(RuntimeError):
            with lanes.lease():
                pytest.fail("a thread leased two lanes")
        assert lanes.current() is outer
        assert lanes.stats(stuck_after=60.0).in_flight == 1
    assert len(conns.opened) == 1
    assert lanes.stats(stuck_after=60.0).in_flight == 0


# -- the domains of a lane -------------------------------------------------------------------


def test_a_lane_looks_each_domain_up_once(lanes):
    """Without a lister, a domain is looked up on the lane's own connection the first time only."""
    lookups = Lookups()
    with lanes.lease() as lane:
        web = lane.domain(WEB, lookups.of(WEB))
        assert lane.domain(WEB, lookups.of(WEB)) is web
        db = lane.domain(DB, lookups.of(DB))
    assert lookups.asked == [(lane.conn, WEB), (lane.conn, DB)]
    assert web != db


def test_retain_forgets_the_handles_of_domains_not_kept(lanes):
    """Domains listed again without DB: an idle lane forgets DB at once, a busy one when it returns."""
    lookups = Lookups()
    with held(lanes, 2) as [one, two]:
        for lane in (one, two):
            lane.domain(WEB, lookups.of(WEB))
            lane.domain(DB, lookups.of(DB))
    assert len(lookups.asked) == 4
    with lanes.lease() as busy:
        lanes.retain([WEB])
        idle = one if busy is two else two
        # The busy lane is its thread's alone: untouched until its call returns.
        assert busy.domain(DB, lookups.of(DB))[1] is busy.conn
        assert len(lookups.asked) == 4
    with held(lanes, 2) as both:
        assert {id(lane) for lane in both} == {id(one), id(two)}
        for lane in both:
            assert lane.domain(WEB, lookups.of(WEB))[3] <= 4  # kept
            lane.domain(DB, lookups.of(DB))  # forgotten: looked up again
    assert sorted(conn.number for conn, key in lookups.asked[4:] if key == DB) == sorted(
        [busy.conn.number, idle.conn.number]
    )
    assert [key for _, key in lookups.asked].count(WEB) == 2


def test_a_restarted_domain_gets_a_new_handle(lanes):
    """Same UUID, new id: another key, so the lane never calls the old incarnation's handle."""
    lookups = Lookups()
    with lanes.lease() as lane:
        old = lane.domain(DB, lookups.of(DB))
    lanes.retain([DB_RESTARTED])
    with lanes.lease() as lane:
        new = lane.domain(DB_RESTARTED, lookups.of(DB_RESTARTED))
    assert new is not old and new[2] == DB_RESTARTED
    assert [key for _, key in lookups.asked] == [DB, DB_RESTARTED]


def test_a_new_lane_lists_the_running_domains_in_one_call(conns):
    """With a lister: one listing per lane instead of one look-up per domain; a miss after it is looked up."""
    listed: List[Conn] = []

    def lister(conn: Conn) -> Dict[Key, Any]:
        listed.append(conn)
        return {WEB: ("listed", conn, WEB), DB: ("listed", conn, DB)}

    lanes = Lanes(conns.open, conns.close, lister=lister)
    lookups = Lookups()
    with held(lanes, 2) as leased:
        for lane in leased:
            assert lane.domain(WEB, lookups.of(WEB)) == ("listed", lane.conn, WEB)
            assert lane.domain(DB, lookups.of(DB)) == ("listed", lane.conn, DB)
    assert sorted(c.number for c in listed) == [1, 2]
    assert lookups.asked == []
    with lanes.lease() as lane:
        restarted = lane.domain(DB_RESTARTED, lookups.of(DB_RESTARTED))  # not in the listing it made
    assert restarted[0] == "handle" and lookups.asked == [(lane.conn, DB_RESTARTED)]
    assert len(listed) == 2  # a miss does not list again until the domains change


def test_a_lane_lists_again_once_after_the_domains_changed(conns):
    """retain() with another set of domains: each lane's next miss lists once more; the same set, no."""
    listed: List[Conn] = []
    running = {WEB: "web"}

    def lister(conn: Conn) -> Dict[Key, Any]:
        listed.append(conn)
        return {key: (name, conn) for key, name in running.items()}

    lanes = Lanes(conns.open, conns.close, lister=lister)
    lookups = Lookups()
    lanes.retain([WEB])
    with lanes.lease() as lane:
        lane.domain(WEB, lookups.of(WEB))
    assert len(listed) == 1
    running[DB] = "db"
    lanes.retain([WEB, DB])
    with lanes.lease() as lane:
        assert lane.domain(WEB, lookups.of(WEB)) == ("web", lane.conn)  # kept: no listing
        assert len(listed) == 1
        assert lane.domain(DB, lookups.of(DB)) == ("db", lane.conn)
    assert len(listed) == 2 and lookups.asked == []
    lanes.retain([WEB, DB])  # listed again, nothing changed
    with lanes.lease() as lane:
        lane.domain(DB_RESTARTED, lookups.of(DB_RESTARTED))
    assert len(listed) == 2 and [key for _, key in lookups.asked] == [DB_RESTARTED]

"""virt_balloon_stats.pool: daemon workers for calls that may never return.

Tasks that block stand in for a call stuck on a hung QEMU: each waits on a
``threading.Event`` that the test sets in a ``finally``, so no thread is left
stuck. Nothing here depends on how fast the machine is: waits have generous
bounds and are only there so that a broken pool fails instead of hanging.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, List

import pytest

from virt_balloon_stats.pool import WorkerPool

#: Upper bound for anything that should happen at once.
PATIENCE = 5.0


class Blocker:
    """Tasks that report when they start, then wait until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._started = threading.Condition(self._lock)
        self.running = 0

    def task(self, value: object = None) -> Callable[[], object]:
        def run() -> object:
            with self._started:
                self.running += 1
                self._started.notify_all()
            self.release.wait()
            return value

        return run

    def wait_running(self, count: int) -> bool:
        with self._started:
            return self._started.wait_for(lambda: self.running >= count, PATIENCE)


@pytest.fixture
def blocker() -> Iterator[Blocker]:
    """Blocking tasks, released whatever the test does."""
    b = Blocker()
    try:
        yield b
    finally:
        b.release.set()


@pytest.fixture
def pools() -> Iterator[List[WorkerPool]]:
    """Pools made by a test, shut down at its end."""
    made: List[WorkerPool] = []
    try:
        yield made
    finally:
        for pool in made:
            pool.shutdown()


def _pool(pools: List[WorkerPool], size: int, limit: int) -> WorkerPool:
    pool = WorkerPool(size, limit, name="vbs-test")
    pools.append(pool)
    return pool


def _wait_until(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_results_come_back_through_the_futures(pools):
    """Each task's return value lands in its own future, arguments passed through."""
    pool = _pool(pools, 2, 4)
    futures = [pool.submit(pow, base, 2) for base in range(10)]
    assert [f.result(timeout=PATIENCE) for f in futures] == [b * b for b in range(10)]


@pytest.mark.parametrize("error", [ValueError("bad figure"), KeyboardInterrupt()], ids=type)
def test_exceptions_come_back_through_the_future_and_the_worker_goes_on(pools, error):
    """A task's exception (even a BaseException) is the caller's to see; the one thread survives it."""
    pool = _pool(pools, 1, 1)

    def boom() -> None:
        raise error

    failed = pool.submit(boom)
    assert failed.exception(timeout=PATIENCE) is error
    assert pool.submit(lambda: "still here").result(timeout=PATIENCE) == "still here"
    assert pool.threads == 1


def test_threads_are_daemons_named_after_the_pool(pools):
    """Daemon threads: a call stuck on a hung QEMU never keeps the process alive at exit."""
    pool = _pool(pools, 1, 1)
    thread = pool.submit(threading.current_thread).result(timeout=PATIENCE)
    daemon, name = thread.daemon, thread.name
    assert daemon is True
    assert name.startswith("vbs-test-")


def test_threads_start_on_demand_and_stay_within_the_size(pools):
    """No thread before the first task, one for it; sequential work never goes past ``size``."""
    pool = _pool(pools, 3, 8)
    assert pool.threads == 0
    assert pool.submit(lambda: "one").result(timeout=PATIENCE) == "one"
    assert pool.threads == 1
    for value in range(20):
        assert pool.submit(lambda v=value: v).result(timeout=PATIENCE) == value
    assert 1 <= pool.threads <= 3


def test_a_blocked_thread_holds_the_next_task_without_a_reservation(pools, blocker):
    """size=1: a second task waits for the stuck one; no thread is added unasked."""
    pool = _pool(pools, 1, 4)
    stuck = pool.submit(blocker.task("first"))
    assert blocker.wait_running(1)
    queued = pool.submit(blocker.task("second"))
    assert pool.threads == 1
    assert not queued.done()
    blocker.release.set()
    assert stuck.result(timeout=PATIENCE) == "first"
    assert queued.result(timeout=PATIENCE) == "second"
    assert pool.threads == 1


def test_reserve_lets_one_more_thread_start_while_one_is_blocked(pools, blocker):
    """reserve(1) for one stuck call: the next task runs at once on a second thread."""
    pool = _pool(pools, 1, 4)
    stuck = pool.submit(blocker.task())
    assert blocker.wait_running(1)
    pool.reserve(1)
    assert pool.submit(lambda: "healthy").result(timeout=PATIENCE) == "healthy"
    assert not stuck.done()
    assert pool.threads == 2


def test_never_more_threads_than_the_limit(pools, blocker):
    """reserve() above the limit is capped: with every thread stuck, further tasks wait."""
    pool = _pool(pools, 1, 2)
    pool.reserve(10)
    futures = [pool.submit(blocker.task(i)) for i in range(4)]
    assert blocker.wait_running(2)
    assert pool.threads == 2
    assert blocker.running == 2
    assert not any(f.done() for f in futures)
    blocker.release.set()
    assert [f.result(timeout=PATIENCE) for f in futures] == [0, 1, 2, 3]
    assert pool.threads == 2


def test_reserve_never_goes_below_the_size(pools, blocker):
    """A negative or zero reservation still leaves ``size`` threads for ordinary work."""
    pool = _pool(pools, 2, 4)
    pool.reserve(-3)
    futures = [pool.submit(blocker.task(i)) for i in range(2)]
    assert blocker.wait_running(2)
    assert pool.threads == 2
    blocker.release.set()
    assert [f.result(timeout=PATIENCE) for f in futures] == [0, 1]


def test_a_cancelled_task_is_not_run(pools, blocker):
    """A future cancelled while queued is skipped; the worker takes the next task."""
    pool = _pool(pools, 1, 1)
    ran: List[str] = []
    stuck = pool.submit(blocker.task())
    assert blocker.wait_running(1)
    cancelled = pool.submit(lambda: ran.append("cancelled"))
    assert cancelled.cancel()
    after = pool.submit(lambda: ran.append("after"))
    blocker.release.set()
    stuck.result(timeout=PATIENCE)
    after.result(timeout=PATIENCE)
    assert ran == ["after"]


def test_shutdown_lets_idle_threads_exit(pools):
    """After shutdown no worker thread stays behind, and no new task is taken."""
    pool = _pool(pools, 3, 3)
    barrier = threading.Barrier(3, timeout=PATIENCE)
    futures = [pool.submit(barrier.wait) for _ in range(3)]
    for f in futures:
        f.result(timeout=PATIENCE)
    assert pool.threads == 3
    pool.shutdown()
    assert _wait_until(lambda: pool.threads == 0), pool.threads
    assert _wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("vbs-test-")])
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_shutdown_does_not_wait_for_a_stuck_call_which_leaves_when_released(pools, blocker):
    """shutdown returns with a call still stuck; that thread leaves once its call returns."""
    pool = _pool(pools, 2, 2)
    stuck = pool.submit(blocker.task("late"))
    pool.submit(lambda: None).result(timeout=PATIENCE)
    assert blocker.wait_running(1)
    assert pool.threads == 2
    pool.shutdown()
    assert _wait_until(lambda: pool.threads == 1), pool.threads
    blocker.release.set()
    assert stuck.result(timeout=PATIENCE) == "late"
    assert _wait_until(lambda: pool.threads == 0), pool.threads


@pytest.mark.parametrize("size, limit", [(0, 1), (-1, 4), (3, 2)])
def test_impossible_sizes_are_refused(size, limit):
    """At least one thread, and a limit no lower than the size."""
    with pytest.raises(ValueError):
        WorkerPool(size, limit)

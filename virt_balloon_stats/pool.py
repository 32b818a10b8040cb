"""A small pool of daemon threads for libvirt calls that may never return.

``concurrent.futures.ThreadPoolExecutor`` joins its workers when the
interpreter exits, so one call stuck on a stopped QEMU (libvirt has no reply
timeout for the first call to a hung monitor) would keep a one-shot command
alive for as long as the QEMU stays stopped. These threads are daemons: the
process exits on time and abandons them.

The pool also keeps its capacity when calls hang: a caller that knows some
calls are overdue asks for that many extra threads (:meth:`WorkerPool.reserve`),
up to a hard ``limit``, so healthy domains are still read in parallel while
stuck threads wait. Threads above the wanted size leave once idle.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Optional, Tuple

__all__ = ["WorkerPool"]

_Task = Tuple["concurrent.futures.Future[Any]", Callable[..., Any], Tuple[Any, ...]]

#: Seconds an idle thread above the wanted size waits for work before leaving.
_IDLE_SECONDS = 5.0


class WorkerPool:
    """Daemon worker threads, started on demand.

    :param size: Threads to keep for ordinary work.
    :param limit: Never more threads than this, stuck ones included.
    :param name: Prefix of the thread names (they show in ``py-spy`` and ``ps -L``).
    """

    def __init__(self, size: int, limit: int, name: str = "vbs-worker") -> None:
        if size < 1 or limit < size:
            raise ValueError(f"need 1 <= size <= limit, not size={size} limit={limit}")
        self.size = size
        self.limit = limit
        self._name = name
        self._queue: "queue.SimpleQueue[Optional[_Task]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._wanted = size
        self._serial = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        with self._lock:
            return self._threads

    def reserve(self, extra: int) -> None:
        """Allow ``extra`` threads above ``size`` (capped by ``limit``): one per stuck call.

        Threads start at once for tasks already waiting in the queue, so work
        queued behind stuck calls gets going without a new submit.
        """
        with self._lock:
            self._wanted = max(self.size, min(self.limit, self.size + extra))
            waiting = self._queue.qsize() - self._idle
            while waiting > 0 and self._threads < self._wanted and not self._closed:
                self._spawn()
                waiting -= 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        """Run ``fn(*args)`` in a worker; its result or exception lands in the future."""
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            self._queue.put((future, fn, args))
            if self._idle == 0 and self._threads < self._wanted:
                self._spawn()
            elif self._idle:
                self._idle -= 1  # that idle thread is now spoken for
        return future

    def _spawn(self) -> None:
        """Start one worker; the caller holds the lock."""
        self._threads += 1
        self._serial += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._serial}", daemon=True).start()

    def shutdown(self) -> None:
        """Let idle threads go; busy ones finish their call and leave. Does not wait."""
        with self._lock:
            self._closed = True
            count = self._threads
        for _ in range(count):
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            try:
                task = self._queue.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._threads > self._wanted and self._idle > 0:
                        self._threads -= 1
                        self._idle -= 1
                        return
                continue
            if task is None:
                with self._lock:
                    self._threads -= 1
                    self._idle = max(0, self._idle - 1)
                return
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: B902 - handed to the caller through the future
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

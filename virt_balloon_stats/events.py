"""libvirt's process-wide machinery: its event loop, what its events become, its error printing.

libvirt delivers domain events, the close of a connection and keepalive
through its default event loop, which must be registered before the
connections that use it are opened and must run in a thread of its own.
:func:`start_event_loop` does both once per process; :class:`EventLoopHold`
makes it wait while a collector's calls run. :meth:`~virt_balloon_stats.host.Host.watch`
registers the callbacks, which only hand :class:`HostEvent` values on, as
nova does: nothing slow ever runs inside libvirt's loop.

With :mod:`virt_balloon_stats.host` and :mod:`virt_balloon_stats.transport`,
this is the only module that touches libvirt.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

import libvirt

__all__ = [
    "HostEvent",
    "LIFECYCLE_NAMES",
    "CLOSE_REASONS",
    "start_event_loop",
    "EventLoopHold",
]


@dataclasses.dataclass(frozen=True)
class HostEvent:
    """What libvirt told us asynchronously, reduced to what a reader acts on.

    :ivar kind: ``lifecycle``, ``device`` (a device was added or removed),
        ``balloon`` (the balloon's size changed) or ``closed`` (the
        connection was lost; ``uuid`` is ``None``).
    :ivar uuid: The domain concerned.
    :ivar detail: A short word for logs (``started``, ``stopped``, ``eof``...).
    """

    kind: str
    uuid: Optional[str]
    detail: str


LIFECYCLE_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}

_event_loop_lock = threading.Lock()
_event_loop_thread: Optional[threading.Thread] = None
_event_loop_free = threading.Event()  # cleared while an EventLoopHold is held
_event_loop_free.set()
_event_loop_holds = 0


def start_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread, once per process.

    Events, the close callback and keepalive all need it, and it must be
    registered before the connections that use it are opened. libvirt's
    callbacks run in this thread; :class:`Host` only queues them there, as
    nova does, so nothing slow ever runs inside libvirt's loop.
    """
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                _event_loop_free.wait()
                libvirt.virEventRunDefaultImpl()

        _event_loop_thread = threading.Thread(target=loop, name="libvirt-event-loop", daemon=True)
        _event_loop_thread.start()


class EventLoopHold:
    """Keeps the event loop of :func:`start_event_loop` waiting until released.

    libvirt's RPC client does the I/O of each call in the calling thread,
    but it switches its socket's watch off and on again around every call,
    and each switch wakes the loop to re-read its handles: two wake-ups of
    the loop thread per call. A collector making a few dozen calls a cycle
    spent a fifth of its CPU on them (1.8 ms of 8.8 ms for 30 domains, and
    4 % of the cycle's time, on the testbed). Held, the loop finishes the
    iteration it is in and waits; what libvirt receives meanwhile (events,
    the close of the connection) it queues, and delivers when the loop runs
    again. Holds nest and may overlap; the loop waits while any is held.
    Hold it only for a bounded time: the loop also serves keepalive.
    """

    def __init__(self) -> None:
        global _event_loop_holds
        with _event_loop_lock:
            _event_loop_holds += 1
            _event_loop_free.clear()
        self._held = True

    def release(self) -> None:
        """Let the loop run again, unless another hold remains; a second release does nothing."""
        global _event_loop_holds
        with _event_loop_lock:
            if not self._held:
                return
            self._held = False
            _event_loop_holds -= 1
            if not _event_loop_holds:
                _event_loop_free.set()

    def __enter__(self) -> "EventLoopHold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

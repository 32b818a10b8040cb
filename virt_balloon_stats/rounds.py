"""Call scheduling within a cycle: one call out per domain, QEMU reads first, libvirt's side in bulk.

Below the collector, which keeps the connections, reconnects and events,
this module decides which calls a cycle makes and when:

* :class:`DomainSlot`: a domain is never asked again while a call to it is
  outstanding (with a stopped QEMU, every further call would only wait
  behind the first, each holding a thread, a lane and a libvirtd worker);
* :func:`start_reading`, :func:`read_then_join`: each domain's reading
  reads QEMU first (one passthrough call) in a worker, then joins its
  host's :class:`BulkRound`; a reading with nothing to ask first (the
  ``libvirt`` source, a settled domain between its turns) joins at once,
  without a worker;
* :class:`BulkRound`: libvirt's state and balloon figures of the domains
  whose QEMU answered come in a few bulk ``virDomainListGetStats`` calls,
  sent in chunks while the other reads go on; :class:`BulkCalls` bounds how
  many are in flight per host across cycles;
* :func:`run_rounds`: the collector's thread drives the rounds to the
  cutoff and the deadline, and adds a spare thread per stuck read.

Every call runs in a lane of its own (:mod:`virt_balloon_stats.lanes`), so
a call that never returns holds only its own connection; what makes no
call (a reading a bulk record completes) is done in the collector's thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Dict, List, Optional, Tuple, TypeVar, Union

from virt_balloon_stats.client import BalloonStats
from virt_balloon_stats.reading import DomainMemo, Reading
from virt_balloon_stats.errors import BalloonStatsError
from virt_balloon_stats.events import EventLoopHold
from virt_balloon_stats.host import DomainRecord, Guest
from virt_balloon_stats.pool import WorkerPool
from virt_balloon_stats.sample import Sample

__all__ = [
    "BULK_CHUNKS",
    "BULK_MIN_CHUNK",
    "BULK_RESERVE",
    "SLOW_READ",
    "DomainSlot",
    "Work",
    "read_then_join",
    "start_reading",
    "run_rounds",
    "BulkCalls",
    "BulkRound",
    "chunk_sizes",
    "woken",
    "done",
]

LOG = logging.getLogger("virt_balloon_stats.collector")

_T = TypeVar("_T")


#: A cycle's bulk calls per host, at most (and no more than ``workers``): each
#: covers a share of the domains, so libvirt's work, serial inside one call,
#: runs in parallel across calls and overlaps the QMP reads.
BULK_CHUNKS = 3

#: No bulk call for fewer domains than this, unless they are all there are.
BULK_MIN_CHUNK = 6

#: Share of the deadline kept for the bulk call and the second half of each reading.
BULK_RESERVE = 0.2


#: Seconds after which a QEMU read still running is taken for stuck (a read takes milliseconds).
SLOW_READ = 0.5


class DomainSlot:
    """One incarnation of one domain on one host: its Guest, memo, and the one call out to it.

    A domain is never asked again while a call to it is outstanding
    (:attr:`busy`): with a stopped QEMU, every further call would only wait
    behind the first one, each holding a thread, a lane and a libvirtd worker.
    """

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.memo = DomainMemo()
        self.pending: Optional["concurrent.futures.Future[Union[Reading, Sample]]"] = None
        self.pending_since = 0.0
        self.last: Optional[Sample] = None

    @property
    def busy(self) -> bool:
        """Whether a call to this domain is still out."""
        return self.pending is not None and not self.pending.done()


#: A domain's place in a cycle: its reading in flight, or a sample made without one.
Work = Tuple[DomainSlot, Union[Sample, "concurrent.futures.Future[Union[Reading, Sample]]"]]


def read_then_join(
    client: BalloonStats, slot: DomainSlot, bulk: "BulkRound", source: str, compare: bool = True
) -> Union[Reading, Sample]:
    """In a worker: read QEMU; join the bulk call, or finish alone when the round has closed."""
    reading = client.begin_sample(slot.guest, source, memo=slot.memo, crosscheck=compare)
    if reading.error is None and bulk.join(reading):
        return reading
    return client.finish_sample(reading)


def start_reading(
    pool: WorkerPool, client: BalloonStats, slot: DomainSlot, bulk: "BulkRound", source: str, compare: bool
) -> "concurrent.futures.Future[Union[Reading, Sample]]":
    """Start a domain's reading: :func:`read_then_join` in a worker, or here if its first half makes no call.

    A steady reading of the ``libvirt`` source (or of a domain without a
    balloon) asks nothing before the bulk call, which carries all it shows:
    it joins the round at once, without a worker, a lane or a thread
    switch. With its second half finished where its record arrives too
    (:func:`_finish`), the exporter's own CPU with ``--source libvirt``
    went from 0.30 to 0.21 ms a domain-cycle (30 domains, 5 s interval).
    """
    if client.begin_calls(source, slot.memo, compare):
        read = pool.submit(client.host.leased, read_then_join, client, slot, bulk, source, compare)
    else:
        reading = client.begin_sample(slot.guest, source, memo=slot.memo, crosscheck=compare)
        if bulk.join(reading):
            read = done(reading)
        else:
            read = pool.submit(client.host.leased, client.finish_sample, reading)
    bulk.track(read)
    return read


class BulkCalls:
    """One host's bulk calls in flight, across cycles: at most ``limit`` at once.

    A bulk call that reached a QEMU stopped after its read holds its thread
    (and its lane) until QEMU moves again, and still counts here: the next
    rounds then ask per domain rather than queue behind it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pool = WorkerPool(limit, limit, name="vbs-bulk")
        # State-only calls take no job and never reach a monitor, so a
        # stopped QEMU cannot hold one: they are not counted against ``limit``.
        self._states = WorkerPool(1, limit, name="vbs-bulk-state")
        self._pending: "List[concurrent.futures.Future[Dict[str, DomainRecord]]]" = []
        self._lock = threading.Lock()

    def send(
        self, client: BalloonStats, guests: List[Guest], balloon: bool
    ) -> "Optional[concurrent.futures.Future[Dict[str, DomainRecord]]]":
        """Start one bulk call in a lane of its own; ``None`` when ``limit`` calls are still out.

        Without ``balloon`` the call asks for the state alone, which libvirt
        answers from its own definition: such calls always go.
        """
        if not balloon:
            return self._states.submit(
                client.host.leased, lambda: client.host.domain_records(guests, balloon=False)
            )
        with self._lock:
            pending = [f for f in self._pending if not f.done()]
            if len(pending) >= self.limit:
                self._pending = pending
                return None
            future: "concurrent.futures.Future[Dict[str, DomainRecord]]" = self._pool.submit(
                client.host.leased, lambda: client.host.domain_records(guests, balloon=balloon)
            )
            self._pending = pending + [future]
            return future

    def shutdown(self) -> None:
        """Let the threads go (a stuck one when its call returns)."""
        self._pool.shutdown()
        self._states.shutdown()


class BulkRound:
    """One host's bulk calls in one cycle, shared by the workers and the collector's thread.

    Each domain's reading reads QEMU first, in a worker, then joins the round.
    The worker whose read completes a chunk (a share of the domains,
    :data:`BULK_CHUNKS`; the last chunk when every read is back) sends that
    chunk's ``virDomainListGetStats`` call with ``NOWAIT`` itself, for the
    state and balloon figures of the domains in it, while the other reads go
    on. The collector's thread is woken only when a call returns, to finish
    its domains, and by its own timers: once reads stall it has every
    reading that joins sent at once (:meth:`hurry`), and at the cutoff it
    closes the round (:meth:`close`).

    A domain whose QMP read hangs never joins, so it is never part of a
    call: with a hung QEMU whose job is free, a bulk call that included it
    would block until QEMU moved again. A reading that joins without a read
    (the ``libvirt`` source, a settled domain between its turns) has no such
    probe: a QEMU stopped since its last cycle holds its call, and at the
    cutoff that call's domains ask libvirt on their own (:func:`run_rounds`),
    on time; the stopped one's own call then holds only its lane, and it is
    not asked again while that is out. A reading that comes back after the
    round closed finishes on its own. (Bulk calls sent alongside the QMP reads, as
    the bare floor does, were tried: with ``NOWAIT`` they skip the domains
    whose jobs the reads hold, and without it a QEMU stopped at the wrong
    moment left a healthy domain's calls blocked too, seen on the testbed.)

    :param client: The host's connection (its lanes carry the calls).
    :param bulk: The host's bulk calls in flight.
    :param expected: QEMU reads that will report to :meth:`track`.
    :param balloon: Ask for the balloon figures too (not with ``source='qmp'``).
    :param wake: Where the collector's thread waits; a call returning puts to it.
    :param calls: At most this many bulk calls (default: ``bulk.limit``).
        The chunks let libvirt's work overlap the QMP reads; with no read
        to overlap (the ``libvirt`` source) one call does for all, and saves
        the others' round trips: 30 domains every 5 s cost the client 0.14
        ms a domain-cycle in three calls and 0.095 ms in one, libvirtd 0.33
        and 0.26 ms.
    """

    def __init__(
        self,
        client: BalloonStats,
        bulk: BulkCalls,
        expected: int,
        balloon: bool,
        wake: "queue.SimpleQueue[None]",
        calls: Optional[int] = None,
    ) -> None:
        self.client = client
        self._bulk = bulk
        self._balloon = balloon
        self._wake = wake
        self._lock = threading.Lock()
        self._open = True
        self._hurry = False
        self._reads: "List[concurrent.futures.Future[Union[Reading, Sample]]]" = []
        self._reads_left = expected
        self._expected = expected
        # The last call takes whatever is left.
        self._chunks = chunk_sizes(expected, bulk.limit if calls is None else min(calls, bulk.limit))
        self._waiting: List[Reading] = []
        self._calls: Dict["concurrent.futures.Future[Dict[str, DomainRecord]]", List[Reading]] = {}

    def track(self, read: "concurrent.futures.Future[Union[Reading, Sample]]") -> None:
        """Follow one domain's QEMU read (the first half of its reading); one per ``expected``."""
        self._reads.append(read)
        read.add_done_callback(self._read_done)

    # -- in the workers --------------------------------------------------------

    def join(self, reading: Reading) -> bool:
        """Add a reading whose QEMU answered; ``False`` when the round has closed."""
        with self._lock:
            if self._open:
                self._waiting.append(reading)
            return self._open

    def _read_done(self, _read: object) -> None:
        with self._lock:
            self._reads_left -= 1
            self._send_locked(force=self._hurry)
            last = not self._reads_left
        if last:
            self._wake.put(None)

    # -- in the collector's thread ------------------------------------------------

    def hurry(self) -> None:
        """Reads are stalling: what has joined goes now, and so does each later join."""
        with self._lock:
            self._hurry = True
            self._send_locked(force=True)

    def close(self) -> None:
        """The cutoff: no more joins; what has joined goes now."""
        with self._lock:
            self._open = False
            self._send_locked(force=True)

    def returned(self) -> List[Tuple[List[Reading], Dict[str, DomainRecord]]]:
        """The readings of each bulk call that has returned, with its records."""
        with self._lock:
            done = [f for f in self._calls if f.done()]
            returned = [(self._calls.pop(f), f) for f in done]
        return [(readings, self._records(call)) for readings, call in returned]

    def abandon(self) -> List[Reading]:
        """Close the round and give up on the calls still out: their readings, and any waiting."""
        with self._lock:
            self._open = False
            if self._calls:
                LOG.info("%s: a bulk stats call did not return in time", self.client.host.uri)
            leftover = [r for readings in self._calls.values() for r in readings] + self._waiting
            self._calls, self._waiting = {}, []
            return leftover

    @property
    def calls_out(self) -> int:
        with self._lock:
            return len(self._calls)

    def settled(self) -> bool:
        """Every read back, every joined reading sent, every call returned and taken."""
        with self._lock:
            return not self._reads_left and not self._waiting and not self._calls

    def reads_running(self) -> int:
        """QEMU reads running now (not queued for a worker)."""
        return sum(1 for f in self._reads if f.running())

    # -- either ------------------------------------------------------------------------

    def _send_locked(self, *, force: bool) -> None:
        """Send the waiting readings' bulk call once a chunk is ready (or every read is back)."""
        if not self._waiting:
            return
        chunk = self._chunks[0] if self._chunks else self._expected
        if not force and len(self._waiting) < chunk and self._reads_left:
            return
        readings, self._waiting = self._waiting, []
        self._chunks = self._chunks[1:]
        # The domains due for their cross-check need libvirt's figures; the
        # others only their state, in a call that never enters a monitor.
        for balloon in (True, False):
            group = [r for r in readings if (self._balloon and r.libvirt_figures) is balloon]
            if not group:
                continue
            # None: libvirtd has not answered earlier bulk calls; ask per domain instead.
            call = self._bulk.send(self.client, [r.guest for r in group], balloon) or done({})
            self._calls[call] = group
            # Registered, then watched: the collector's thread finds it when woken.
            call.add_done_callback(lambda _call: self._wake.put(None))

    def _records(
        self, future: "concurrent.futures.Future[Dict[str, DomainRecord]]"
    ) -> Dict[str, DomainRecord]:
        try:
            return future.result()
        except BalloonStatsError as err:
            # Each domain then asks on its own (and a lost connection shows there).
            LOG.debug("%s: bulk stats failed: %s", self.client.host.uri, err)
            return {}


def chunk_sizes(expected: int, calls: int) -> List[int]:
    """The sizes of a round's chunks but the last, which takes whatever is left.

    Each chunk is smaller than the one before (6:5:4 for three calls). A
    chunk's bulk call starts once its domains have read QEMU and runs while
    the later reads go on; the later a chunk starts, the less time is left,
    so later chunks are smaller and the calls end about together. On the
    testbed, 30 domains in chunks of 12, 10 and 8 took 3 to 4 % less than in
    three chunks of 10. No chunk is smaller than :data:`BULK_MIN_CHUNK`.
    """
    weights = [2 * calls - i for i in range(calls)]
    return [max(BULK_MIN_CHUNK, round(expected * w / sum(weights))) for w in weights[:-1]]


def woken(wake: "queue.SimpleQueue[None]", timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a wake-up and take every one queued; ``False`` if none came."""
    try:
        wake.get(timeout=timeout)
    except queue.Empty:
        return False
    while True:
        try:
            wake.get_nowait()
        except queue.Empty:
            return True


def done(value: _T) -> "concurrent.futures.Future[_T]":
    """A future that has its result already."""
    future: "concurrent.futures.Future[_T]" = concurrent.futures.Future()
    future.set_result(value)
    return future


def run_rounds(
    pool: WorkerPool,
    rounds: "List[Tuple[BulkRound, List[Work]]]",
    wake: "queue.SimpleQueue[None]",
    start: float,
    deadline: float,
    timeout: float,
    stuck: int,
    hold: EventLoopHold,
) -> None:
    """Drive one cycle's rounds from QEMU reads to finished readings: bulk calls in chunks, as reads return.

    Readings join their host's round as their QEMU answers; as soon as a
    chunk of them has (a share of the domains, :data:`BULK_CHUNKS`), the
    worker that completed it sends one bulk call for libvirt's side of
    that chunk, while the other reads go on; when a bulk call returns, this
    thread has its domains finished in the workers. So libvirt's serial
    bulk work overlaps the QMP reads instead of following them, and this
    thread wakes a few times a cycle, not once per domain. At the cutoff
    (:data:`BULK_RESERVE` of the deadline before it) the rounds close; a
    read still running then is left to finish alone. Halfway from the
    cutoff to the deadline, the domains of a bulk call still out ask
    libvirt on their own: a QEMU that stopped between its QMP read and the
    bulk call holds that call.

    A read takes milliseconds; one still running after :data:`SLOW_READ`
    seconds (or a fifth of the deadline, if shorter) is taken for stuck:
    the domains waiting for a chunk to fill get their bulk call now, not at
    the cutoff, and the pool gets a spare thread per stuck read, so the
    domains queued behind it are read on time even when every worker is
    held by a hung QEMU. libvirt's event loop, held while the calls run,
    is let go then too: ``hold`` lasts a healthy cycle, never a stuck one.
    """
    cutoff = deadline - BULK_RESERVE * timeout
    slow = min(SLOW_READ, (cutoff - start) / 4)
    where = [{entry.guest.uuid: i for i, (entry, _) in enumerate(work)} for _, work in rounds]
    closed = hurried = False
    while True:
        now = time.monotonic()
        if now >= cutoff and not closed:
            closed = True
            for bulk, _ in rounds:
                bulk.close()
        if not hurried and (closed or now - start >= slow):
            hurried = True
            hold.release()
            for bulk, _ in rounds:
                bulk.hurry()
        for (bulk, work), index in zip(rounds, where):
            for readings, records in bulk.returned():
                _finish(pool, bulk, work, index, readings, records)
        if all(bulk.settled() for bulk, _ in rounds):
            return
        if closed and not any(bulk.calls_out for bulk, _ in rounds):
            return
        # After the cutoff, bulk calls get half of what is left; then their
        # domains ask libvirt on their own, in time for the deadline. (A QEMU
        # that stops between its QMP read and the bulk call holds that call.)
        until = cutoff if not closed else (cutoff + deadline) / 2
        if now >= until:
            break
        if not woken(wake, max(0.0, min(until - now, slow))) and time.monotonic() - start >= slow:
            pool.reserve(stuck + sum(bulk.reads_running() for bulk, _ in rounds))
    # Bulk calls still out: their domains ask libvirt on their own.
    for (bulk, work), index in zip(rounds, where):
        _finish(pool, bulk, work, index, bulk.abandon(), {})


def _finish(
    pool: WorkerPool,
    bulk: "BulkRound",
    work: List[Work],
    index: Dict[str, int],
    readings: List[Reading],
    records: Dict[str, DomainRecord],
) -> None:
    """Finish readings with their bulk call's records (none: each asks libvirt).

    A reading the record completes without a call is finished here (see
    :meth:`~virt_balloon_stats.client.BalloonStats.finish_from_record`);
    any other, in a worker, in a lane of its own.
    """
    client = bulk.client
    for reading in readings:
        i = index[reading.guest.uuid]
        entry, _ = work[i]
        record = records.get(reading.guest.uuid)
        sample = client.finish_from_record(reading, record) if record is not None else None
        if sample is not None:
            entry.pending = done(sample)
        else:
            entry.pending = pool.submit(client.host.leased, client.finish_sample, reading, record)
        work[i] = (entry, entry.pending)

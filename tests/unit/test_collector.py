"""virt_balloon_stats.collector: cycles over fake libvirt domains and recorded QMP replies.

The collector, client, host, transport and QMP layers are the real code;
only libvirt is fake (tests/fakelibvirt.py). Faults are modelled there as a
client sees them: a hung QEMU is a ``qemuMonitorCommand`` that does not
return, a dead libvirtd makes every call raise libvirt's RPC error, a
destroyed domain answers "no domain". Every held call is released in a
``finally``. Timing is only ever an upper bound for "returned on time";
everything else is counted (libvirt calls, QMP commands) or read from the
statuses.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakelibvirt import FakeDomain, RPCModel, connection_lost_error, libvirt_error
from tests.unit.conftest import (
    EXPECTED_STATUS,
    URI,
    World,
    balloon,
    load,
    now_for,
    scenario_names,
    stack_scenarios,
    wait_until,
)
from virt_balloon_stats.client import DEFAULT_REFRESH_SECONDS, BalloonStats
from virt_balloon_stats.collector import LOST_CONNECTION, RECONNECT_FIRST, Collector, Cycle
from virt_balloon_stats.errors import ConnectionFailed, DomainNotFound, InvalidArgument, QEMUUnresponsive
from virt_balloon_stats.host import Host
from virt_balloon_stats.metrics import render
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.reading import NOT_THIS_TURN
from virt_balloon_stats.rounds import BULK_MIN_CHUNK, chunk_sizes
from virt_balloon_stats.stats import Status
from virt_balloon_stats.transport import QMPClient

#: Deadline of cycles where every domain answers: they never wait for it, so a
#: generous value only makes a broken collector slow to fail, never flaky.
TIMEOUT = 5.0

#: Deadline of cycles with a hung domain, and the slack allowed on top of it.
HUNG_TIMEOUT = 0.5
SLACK = 2.0

#: Statuses the clock does not decide, plus one fresh domain whose clock is used
#: (as in test_client: one clock cannot make every recording fresh).
MANY = ["virtio-hog", "nostats", "nodriver", "noos", "paused", "none"]


# -- helpers ------------------------------------------------------------------------------


def _world(names: List[str], stack: str = "debian12", **kwargs: Any) -> World:
    """A World of several scenarios of one stack, its clock pinned for the first one.

    QEMU keeps its polling interval: the recordings read it again after the
    recorder's own ``qom-set`` 0 and 3, which no collector test makes, so
    every read of it gives the first recorded reply (see :func:`_keep_interval`).
    """
    fixtures = [load(n, stack) for n in names]
    kwargs.setdefault("now", now_for(fixtures[0]))
    w = World(fixtures, stack=stack, **kwargs)
    for dom in w.domains:
        if balloon(dom.fixture).present:
            _keep_interval(w, dom)
    return w


def _collector(w: World, **kwargs: Any) -> Collector:
    kwargs.setdefault("timeout", TIMEOUT)
    return Collector(clients=[w.client], **kwargs)


def _name(fixture: Mapping[str, Any]) -> str:
    return str(fixture["domain"]["name"])


def _dom(w: World, scenario: str) -> FakeDomain:
    return next(d for d in w.domains if d.fixture["scenario"] == scenario)


def by_name(cycle: Cycle) -> Dict[str, str]:
    return {s.domain: s.status.value for s in cycle.samples}


def _expected(names: List[str]) -> Dict[str, str]:
    return {f"vbs-tb-rec-{n}": EXPECTED_STATUS[n] for n in names}


def _with_balloon(w: World) -> int:
    return sum(1 for f in w.fixtures if balloon(f).present)


def _qom_get(fixture: Mapping[str, Any], prop: str) -> Dict[str, Any]:
    return {"execute": "qom-get", "arguments": {"path": fixture["balloon_path"], "property": prop}}


def _raw_replies(fixture: Mapping[str, Any], command: Mapping[str, Any]) -> List[str]:
    """The reply texts recorded for one command, in order, exactly as QEMU sent them."""
    return [q["reply"] for q in fixture["qmp"] if q["command"] == command]


def _interval_reads(w: World, fixture: Mapping[str, Any]) -> int:
    wanted = _qom_get(fixture, POLLING_PROPERTY)
    return sum(1 for c in w.transport.commands("qom-get", domain=_name(fixture)) if c == wanted)


def _guest_answers_at(w: World, dom: FakeDomain, last_update: int) -> None:
    """The guest's figures now carry ``last_update``, as QEMU and libvirt both report them.

    Synthetic: the recorded guest-stats reply with only ``last-update``
    changed, in QEMU's reply and in libvirt's bulk and memoryStats() records
    alike, so that the cross-check has nothing to re-read.
    """
    fixture = dom.fixture
    command = _qom_get(fixture, "guest-stats")
    reply = json.loads(_raw_replies(fixture, command)[-1])
    reply["return"]["last-update"] = last_update
    w.transport.answer(dom.UUIDString(), command, json.dumps(reply))
    fixture["all_domain_stats"]["balloon.last-update"] = last_update
    fixture["memory_stats"]["last_update"] = last_update


def _keep_interval(w: World, dom: FakeDomain, index: int = 0) -> None:
    """QEMU answers the polling interval with its ``index``-th recorded reply from now on.

    The recordings read the interval before and after ``qom-set`` 0 and 3;
    pinning one reply keeps a test about caching from seeing those changes.
    """
    command = _qom_get(dom.fixture, POLLING_PROPERTY)
    w.transport.answer(dom.UUIDString(), command, _raw_replies(dom.fixture, command)[index])


# -- one cycle ---------------------------------------------------------------------------


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_one_cycle_gives_each_scenario_its_expected_status(stack, name):
    """One domain per host: the collector classifies each recorded situation as the client does."""
    w = _world([name], stack)
    fixture = w.fixtures[0]
    with _collector(w) as collector:
        cycle = collector.collect()
    [sample] = cycle.samples
    assert sample.status.value == EXPECTED_STATUS[name]
    assert sample.error is None
    assert (sample.domain, sample.uuid, sample.id) == (
        fixture["domain"]["name"], fixture["domain"]["uuid"], fixture["domain"]["id"]
    )
    assert sample.uri == URI
    assert cycle.hosts[URI].up and cycle.hosts[URI].message == ""
    assert cycle.problems == () and cycle.errors == {}


def test_one_cycle_over_many_domains_is_in_name_order_with_their_statuses():
    """Every running domain once, sorted by name, each with its own status."""
    w = _world(MANY)
    with _collector(w) as collector:
        cycle = collector.collect()
    assert [s.domain for s in cycle.samples] == sorted(_name(f) for f in w.fixtures)
    assert by_name(cycle) == _expected(MANY)
    assert cycle.statuses["ok"] == 1 and cycle.statuses["unresponsive"] == 0
    assert cycle.number == 1 and cycle.statuses["unresponsive"] == 0


def test_one_cycle_says_what_balloon_stats_sample_says_for_every_scenario(stack):
    """Under one clock, each domain's sample from a cycle equals the client's own sample of it."""
    fixtures = [load(n, stack) for n in scenario_names(stack)]
    now = now_for(fixtures[0])
    w = World(fixtures, now=now, stack=stack)
    with _collector(w, workers=len(fixtures)) as collector:
        cycle = collector.collect()
    assert len(cycle.samples) == len(fixtures)
    for sample in cycle.samples:
        fixture = next(f for f in fixtures if _name(f) == sample.domain)
        alone = World([load(fixture["scenario"], stack)], now=now, stack=stack).client.sample(sample.domain)
        assert sample.status is alone.status, sample.domain
        assert sample.message == alone.message
        assert sample.stats == alone.stats
        assert sample.actual_bytes == alone.actual_bytes
        assert sample.polling == alone.polling
        assert sample.crosscheck.result is alone.crosscheck.result
        assert sample.libvirt == alone.libvirt
        assert sample.state == alone.state


def test_named_domains_come_back_in_the_order_named():
    """With names, the order is the caller's, not the alphabet's."""
    w = _world(MANY)
    names = [_name(f) for f in reversed(w.fixtures)]
    with _collector(w, domains=names) as collector:
        cycle = collector.collect()
    assert [s.domain for s in cycle.samples] == names
    assert by_name(cycle) == _expected(MANY)
    assert "listAllDomains" not in cycle.calls


# -- steady state --------------------------------------------------------------------------


@pytest.mark.parametrize("named", [False, True], ids=["all", "named"])
def test_steady_cycles_cost_one_bulk_call_and_one_qmp_command_per_balloon(named):
    """After the first cycle: no XML, no state(), one domainListGetStats, one guest-stats per balloon."""
    w = _world(MANY)
    domains = [_name(f) for f in w.fixtures] if named else None
    with _collector(w, domains=domains) as collector:
        first = collector.collect()
        assert first.calls["XMLDesc"] == len(MANY)
        cycles = [collector.collect() for _ in range(2)]
        for cycle in cycles:
            assert by_name(cycle) == _expected(MANY)
            assert cycle.calls.get("XMLDesc", 0) == 0, cycle.calls
            assert cycle.calls.get("state", 0) == 0, cycle.calls
            assert cycle.calls["domainListGetStats"] == 1
            assert cycle.calls["qemuMonitorCommand"] == _with_balloon(w) == len(MANY) - 1
        for dom in w.domains:
            if balloon(dom.fixture).present:
                # First cycle: interval, guest-stats, query-balloon; then guest-stats only.
                assert len(w.transport.commands(domain=dom.name())) == 3 + len(cycles)
        totals = collector.totals
    assert totals.cycles == 3
    summed: Dict[str, int] = {}
    for cycle in [first, *cycles]:
        for call, count in cycle.calls.items():
            summed[call] = summed.get(call, 0) + count
    assert dict(totals.calls) == summed == w.client.rpc_counts
    assert not totals.errors


def test_cycle_calls_are_the_connections_own_count():
    """cycle.calls is what the host's RPC counter moved by during the cycle."""
    w = _world(MANY)
    with _collector(w) as collector:
        collector.collect()
        before = w.host.counter.snapshot()
        cycle = collector.collect()
        after = w.host.counter.snapshot()
    assert cycle.calls == {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_first_cycle_counts_only_its_own_calls():
    """Cycle.calls is the round trips made during the cycle, even on a client used before.

    A script's client, or sample_many's, has calls on its counter already;
    the first cycle must not count them.
    """
    w = _world(["virtio"])
    w.client.sample(_name(w.fixtures[0]))
    earlier = w.host.counter.snapshot()
    with _collector(w) as collector:
        cycle = collector.collect()
    after = w.host.counter.snapshot()
    assert cycle.calls == {k: after[k] - earlier.get(k, 0) for k in after if after[k] != earlier.get(k, 0)}


def test_no_balloon_domain_costs_no_call_of_its_own_in_steady_state():
    """Its bulk record (``balloon.rss``) is all libvirt has for it: no memoryStats() of its own.

    Without a ``last-update`` the record looks like one NOWAIT left empty;
    taking it for that would cost one extra round trip per such domain per
    cycle.
    """
    w = _world(["none"])
    with _collector(w) as collector:
        collector.collect()
        cycle = collector.collect()
    assert by_name(cycle) == _expected(["none"])
    assert cycle.samples[0].libvirt == w.fixtures[0]["memory_stats"]
    assert cycle.calls == {"listAllDomains": 1, "domainListGetStats": 1}


# -- a hung QEMU ---------------------------------------------------------------------------

HUNG_SET = ["virtio-hog", "nostats", "noos", "nodriver"]
HUNG = "nodriver"
WORKERS = 8


@pytest.fixture
def hung() -> Iterator[Tuple[World, FakeDomain, Collector, threading.Event]]:
    """Four domains, one whose QEMU does not answer; released and stopped whatever the test does."""
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    release = dom.hang()
    collector = _collector(w, timeout=HUNG_TIMEOUT, workers=WORKERS)
    try:
        yield w, dom, collector, release
    finally:
        release.set()
        collector.stop()


def _timed_collect(collector: Collector) -> Cycle:
    began = time.monotonic()
    cycle = collector.collect()
    took = time.monotonic() - began
    assert took < HUNG_TIMEOUT + SLACK, f"took {took:.1f} s"
    return cycle


def test_a_domain_that_hangs_after_a_good_cycle_is_kept_out_of_the_bulk_call():
    """Read last cycle, it hangs now: its QMP read does not come back, so it never joins the bulk call
    (which it would hold, its job being free), and the others get theirs on time."""
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    with _collector(w, timeout=HUNG_TIMEOUT) as collector:
        assert by_name(collector.collect()) == _expected(HUNG_SET)
        earlier = len(w.conn.calls_to("domainListGetStats"))
        releases = [dom.hang(), dom.hang("domainListGetStats")]
        try:
            cycle = _timed_collect(collector)
            assert dom.held("domainListGetStats") == 0
        finally:
            for release in releases:
                release.set()
    assert by_name(cycle)[dom.name()] == "unresponsive"
    assert _healthy(cycle) == _expected([n for n in HUNG_SET if n != HUNG])
    assert cycle.errors == {"unresponsive": 1}
    [(doms, _, _)] = w.conn.calls_to("domainListGetStats")[earlier:]
    assert dom not in doms and len(doms) == len(HUNG_SET) - 1


def test_a_qemu_that_stops_between_its_read_and_the_bulk_call_costs_no_other_domain_its_cycle():
    """Its QMP read came back, then it stopped: the bulk call that includes it hangs on it (its job
    free). Its chunk-mates ask libvirt on their own halfway from the cutoff to the deadline: on time."""
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    release = dom.hang("domainListGetStats")
    try:
        with _collector(w, timeout=HUNG_TIMEOUT) as collector:
            cycle = _timed_collect(collector)
            assert dom.held("domainListGetStats") == 1
    finally:
        release.set()
    assert by_name(cycle) == _expected(HUNG_SET)
    assert cycle.calls["memoryStats"] == len(HUNG_SET)  # each asked on its own


def test_with_one_qemu_hung_the_others_get_their_bulk_call_soon_not_at_the_cutoff():
    """The others must not wait for a chunk that the hung domain will never complete.

    Their bulk call goes out once the hung read has run for SLOW_READ, long
    before the cutoff (80 % of the deadline): they are finished with time to
    spare even when libvirt is slow. Counted in seconds with a wide margin.
    """
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    release = dom.hang()
    bulk_at: List[float] = []
    answer = w.conn.domainListGetStats

    def timed(*args: Any, **kwargs: Any) -> Any:  # the fake's bulk call, with when it answered
        try:
            return answer(*args, **kwargs)
        finally:
            bulk_at.append(time.monotonic())

    w.conn.domainListGetStats = timed
    try:
        with _collector(w, timeout=4.0) as collector:
            began = time.monotonic()
            cycle = collector.collect()
    finally:
        release.set()
    assert _healthy(cycle) == _expected([n for n in HUNG_SET if n != HUNG])
    assert len(bulk_at) == 1 and bulk_at[0] - began < 2.0, [t - began for t in bulk_at]


def _healthy(cycle: Cycle) -> Dict[str, str]:
    statuses = by_name(cycle)
    statuses.pop(f"vbs-tb-rec-{HUNG}")
    return statuses


def test_hung_domain_is_unresponsive_and_the_others_are_read_on_time(hung):
    """The cycle ends at its deadline; only the hung domain lacks figures, with a typed error."""
    w, dom, collector, _release = hung
    cycle = _timed_collect(collector)
    assert dom.held() == 1
    sample = next(s for s in cycle.samples if s.domain == dom.name())
    assert sample.status is Status.UNRESPONSIVE
    assert isinstance(sample.error, QEMUUnresponsive)
    assert sample.message.startswith("QEMU did not answer within")
    assert sample.error.domain == dom.name()
    assert sample.stats is None
    assert _healthy(cycle) == _expected([n for n in HUNG_SET if n != HUNG])
    assert cycle.statuses["unresponsive"] == 1
    assert cycle.errors == {"unresponsive": 1}
    assert cycle.hosts[URI].up


def test_hung_domain_is_left_out_of_the_bulk_call(hung):
    """A bulk call naming a hung QEMU would wait on it: it names only those that answered."""
    w, dom, collector, _release = hung
    collector.collect()
    [(doms, stats, flags)] = w.conn.calls_to("domainListGetStats")
    assert sorted(d.name() for d in doms) == sorted(_name(f) for f in w.fixtures if f["scenario"] != HUNG)
    assert flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert stats == libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON


def test_libvirts_event_loop_waits_for_a_cycles_calls_but_not_for_a_stuck_read(hung, ticks):
    """Held while the calls run (see EventLoopHold), let go once reads stall, and after every cycle."""
    w, dom, collector, _release = hung
    cycle: List[Cycle] = []
    reader = threading.Thread(target=lambda: cycle.append(collector.collect(timeout=3.0)))
    reader.start()
    try:
        # A 3 s deadline: reads count as stalled after 0.5 s; the rounds close at 2.4 s.
        time.sleep(0.9)
        during = len(ticks)
        time.sleep(0.5)
        assert not cycle, "the cycle ended before the stuck read's deadline"
        assert len(ticks) > during + 10, "the event loop was held for a stuck read"
    finally:
        reader.join(10)
    assert by_name(cycle[0])[dom.name()] == "unresponsive"
    after = len(ticks)
    assert wait_until(lambda: len(ticks) > after + 10, within=5.0), "a cycle left the event loop held"


def test_hung_domain_is_not_asked_again_while_its_call_is_outstanding(hung):
    """At most one call per domain in flight: later cycles report it without sending it anything."""
    w, dom, collector, _release = hung
    collector.collect()
    sent = len(w.transport.commands(domain=dom.name()))
    assert sent == 1
    for _ in range(4):
        cycle = _timed_collect(collector)
        assert by_name(cycle)[dom.name()] == "unresponsive"
        assert _healthy(cycle) == _expected([n for n in HUNG_SET if n != HUNG])
        assert cycle.calls["domainListGetStats"] == 1
        assert collector.threads <= WORKERS + 1, collector.threads
    assert len(w.transport.commands(domain=dom.name())) == sent
    assert dom.held() == 1
    assert collector.totals.errors["unresponsive"] == 5


def test_hung_domain_is_read_as_usual_once_qemu_answers(hung):
    """Released: the stuck call completes on its own, then the domain is read like any other."""
    w, dom, collector, release = hung
    collector.collect()
    collector.collect()
    release.set()
    # Until the late reading has finished, the domain is still not asked again.
    assert wait_until(lambda: by_name(collector.collect())[dom.name()] != "unresponsive")
    sample = next(s for s in collector.last.samples if s.domain == dom.name())
    assert sample.status.value == EXPECTED_STATUS[HUNG]
    assert sample.error is None
    sent = len(w.transport.commands(domain=dom.name()))
    cycle = collector.collect()
    assert by_name(cycle) == _expected(HUNG_SET)
    assert cycle.statuses["unresponsive"] == 0
    # A steady reading now: one guest-stats, its XML never parsed again.
    assert w.transport.commands(domain=dom.name())[sent:] == [_qom_get(dom.fixture, "guest-stats")]
    assert len(dom.calls_to("XMLDesc")) == 1


def test_hung_domain_does_not_hold_up_the_others_with_one_worker():
    """With ``workers=1`` (or as many hung QEMUs as workers), the domains queued behind a hung one are read.

    "A domain whose reading has not returned ``timeout`` seconds after the
    cycle began is reported unresponsive; the others are reported on time":
    a read still running after a fraction of the deadline gets a spare
    thread, so the others are not stuck behind it even in a one-shot
    reading (``sample_many(workers=1)``).
    """
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    assert min(_name(f) for f in w.fixtures) == dom.name()  # read first
    release = dom.hang()
    try:
        with _collector(w, workers=1, timeout=HUNG_TIMEOUT) as collector:
            cycle = _timed_collect(collector)
    finally:
        release.set()
    assert by_name(cycle)[dom.name()] == "unresponsive"
    assert _healthy(cycle) == _expected([n for n in HUNG_SET if n != HUNG])


#: Every domain's own status, none without a balloon (whose steady cost has its own test).
BUSY_HOST = ["virtio-hog", "nostats", "nodriver", "noos", "paused"]


@pytest.mark.parametrize("workers", [1, 3, len(BUSY_HOST)])
def test_fewer_workers_than_domains_still_make_one_bulk_call_for_all(workers):
    """More domains than workers (DEFAULT_WORKERS is 8: any busy host) still make one bulk call for all.

    Counted, not timed: the bulk call names every domain and no domain asks
    libvirt on its own. A reader that held its worker while waiting for the
    bulk call would leave the bulk call no thread with as many domains as
    workers, and make the late ones miss it with more.
    """
    w = _world(BUSY_HOST)
    with _collector(w, workers=workers, timeout=2.0) as collector:
        cycle = collector.collect()
    assert by_name(cycle) == _expected(BUSY_HOST)
    [(doms, _, _)] = w.conn.calls_to("domainListGetStats")
    assert sorted(d.name() for d in doms) == sorted(by_name(cycle))
    assert cycle.calls.get("state", 0) == 0, cycle.calls
    assert cycle.calls.get("memoryStats", 0) == 0, cycle.calls


def _thirty() -> World:
    """30 domains recorded as the virtio scenario, each a UUID, name and id of its own."""
    fixtures = []
    for i in range(30):
        fixture = load("virtio")
        uuid = f"00000000-0000-4000-8000-{i:012d}"
        fixture["domain"].update(name=f"vbs-tb-many-{i:02d}", uuid=uuid, id=100 + i)
        fixtures.append(fixture)
    return World(fixtures, now=now_for(fixtures[0]))


def test_bulk_calls_come_in_shrinking_chunks_that_cover_every_domain_once():
    """30 domains, 3 bulk calls: later chunks are smaller, so the call sent after the last read is short."""
    w = _thirty()
    for dom in w.domains:
        _keep_interval(w, dom)
    with _collector(w, workers=4, timeout=5.0) as collector:
        collector.collect()
        before = len(w.conn.calls_to("domainListGetStats"))
        cycle = collector.collect()
    assert set(by_name(cycle).values()) == {EXPECTED_STATUS["virtio"]}
    sizes = [len(doms) for doms, _, _ in w.conn.calls_to("domainListGetStats")[before:]]
    assert len(sizes) == 3 and sum(sizes) == 30, sizes
    assert sizes[0] >= 12 and sizes[-1] <= 8, sizes
    assert cycle.calls.get("memoryStats", 0) == 0 and cycle.calls.get("state", 0) == 0, cycle.calls


def test_source_libvirt_reads_thirty_domains_in_one_bulk_call():
    """No QMP read for the chunks to overlap: one call for all, not three (each a round trip of its own)."""
    w = _thirty()
    with _collector(w, source="libvirt", workers=4, timeout=5.0) as collector:
        collector.collect()
        before = len(w.conn.calls_to("domainListGetStats"))
        cycle = collector.collect()
    assert [len(doms) for doms, _, _ in w.conn.calls_to("domainListGetStats")[before:]] == [30]
    assert len(cycle.samples) == 30 and all(s.libvirt is not None for s in cycle.samples)
    assert cycle.calls == {"listAllDomains": 1, "domainListGetStats": 1}


@pytest.mark.parametrize(
    "expected, calls, sizes",
    [(30, 3, [12, 10]), (100, 3, [40, 33]), (30, 2, [17]), (30, 1, []), (10, 3, [6, 6]), (1, 3, [6, 6])],
)
def test_chunk_sizes_shrink_and_never_go_below_the_minimum(expected, calls, sizes):
    assert chunk_sizes(expected, calls) == sizes
    assert all(size >= BULK_MIN_CHUNK for size in sizes)


def test_domain_named_twice_is_read_once_and_never_unresponsive():
    """Named twice (by name and by UUID, or ``check vm vm``): read once, never ``unresponsive``.

    A UUID kept twice in the reading order would make the second entry look
    "busy" with the first one's call, and a healthy domain CRITICAL for
    ``check``.
    """
    w = _world(["virtio-hog", "nostats"])
    hog = w.fixtures[0]
    with _collector(w, domains=[_name(hog), hog["domain"]["uuid"], _name(w.fixtures[1])], timeout=1.0) as c:
        cycle = c.collect()
    statuses = [s.status.value for s in cycle.samples if s.domain == _name(hog)]
    assert statuses and set(statuses) == {"ok"}, statuses
    assert len(w.transport.commands("qom-get", domain=_name(hog))) == 2  # interval and guest-stats


# -- churn ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steady", [False, True], ids=["first-cycle", "steady"])
def test_domain_destroyed_between_listing_and_reading_is_left_out(steady):
    """--all: listed, then destroyed before its reading: not in the cycle, and no error either."""
    w = _world(MANY)
    victim = _dom(w, "nostats")
    with _collector(w) as collector:
        if steady:
            collector.collect()
        earlier = len(w.conn.calls_to("domainListGetStats"))
        w.conn.after("listAllDomains", lambda: w.conn.destroy(victim))
        cycle = collector.collect()
        assert victim.name() not in by_name(cycle)
        assert by_name(cycle) == _expected([n for n in MANY if n != "nostats"])
        assert cycle.errors == {} and cycle.problems == ()
        assert cycle.hosts[URI].up
        [(doms, _, _)] = w.conn.calls_to("domainListGetStats")[earlier:]
        assert victim not in doms and len(doms) == len(MANY) - 1
        assert by_name(collector.collect()) == _expected([n for n in MANY if n != "nostats"])


def test_domain_started_shows_up_in_the_next_cycle():
    """Without events every cycle lists the domains: a new one is read at once, and only its XML parsed."""
    w = _world(MANY)
    late = _dom(w, "noos")
    w.conn.domains.remove(late)
    with _collector(w) as collector:
        first = collector.collect()
        assert late.name() not in by_name(first)
        w.conn.add(late)
        cycle = collector.collect()
    assert by_name(cycle) == _expected(MANY)
    assert cycle.calls["XMLDesc"] == 1 and len(late.calls_to("XMLDesc")) == 1


def test_domain_destroyed_drops_out_without_an_error_and_its_path_is_forgotten():
    """Gone between cycles: no sample, no error, and no cached QOM path left behind."""
    w = _world(MANY)
    victim = _dom(w, "virtio-hog")
    with _collector(w) as collector:
        collector.collect()
        guest = w.client.guest(victim.name())
        assert w.client.paths.get(guest) is not None
        w.conn.destroy(victim)
        cycle = collector.collect()
    assert by_name(cycle) == _expected([n for n in MANY if n != "virtio-hog"])
    assert cycle.errors == {} and cycle.problems == ()
    assert w.client.paths.get(guest) is None


def test_domain_restarted_under_the_same_uuid_is_read_afresh():
    """New id, new QEMU: its XML is parsed and its QOM path found again, not taken from the old one."""
    w = _world(["virtio-hog", "nostats"])
    old = _dom(w, "virtio-hog")
    with _collector(w) as collector:
        collector.collect()
        restarted = FakeDomain(old.fixture, dom_id=old.ID() + 10)
        w.conn.destroy(old)
        w.conn.add(restarted)
        cycle = collector.collect()
    sample = next(s for s in cycle.samples if s.domain == old.name())
    assert sample.id == old.ID() + 10
    assert sample.status is Status.OK
    assert len(restarted.calls_to("XMLDesc")) == 1
    # Its QOM path and interval are found again: the interval is read once per incarnation.
    intervals = [c for c in w.transport.commands("qom-get", domain=old.name())
                 if c["arguments"]["property"] == POLLING_PROPERTY]
    assert len(intervals) == 2


def test_unknown_named_domain_is_a_problem_and_the_others_are_read():
    """A name that resolves to nothing is one Problem (DomainNotFound); the rest are sampled."""
    w = _world(["virtio-hog", "nostats"])
    names = [_name(w.fixtures[0]), "vbs-tb-rec-nope", _name(w.fixtures[1])]
    with _collector(w, domains=names) as collector:
        cycle = collector.collect()
    assert [s.domain for s in cycle.samples] == [names[0], names[2]]
    assert by_name(cycle) == _expected(["virtio-hog", "nostats"])
    [problem] = cycle.problems
    assert problem.what == "vbs-tb-rec-nope" and problem.uri == URI
    assert isinstance(problem.error, DomainNotFound)
    assert problem.error.code == libvirt.VIR_ERR_NO_DOMAIN
    assert cycle.errors == {"DomainNotFound": 1}
    assert cycle.hosts[URI].up


# -- a lost connection -----------------------------------------------------------------------------


class Opener:
    """Stands in for BalloonStats.open: a fresh fake connection each time, or a refusal."""

    def __init__(self, names: List[str], *, refuse: int = 0, stack: str = "debian12") -> None:
        self.names = names
        self.refuse = refuse
        self.stack = stack
        self.worlds: List[World] = []
        self.calls: List[str] = []

    def __call__(self, uri: str) -> BalloonStats:
        self.calls.append(uri)
        if self.refuse:
            self.refuse -= 1
            raise ConnectionFailed("cannot connect; is libvirtd running, and may this user use it? (test)")
        w = _world(self.names, self.stack)
        self.worlds.append(w)
        return w.client


def _assert_down(cycle: Cycle, names: List[str]) -> None:
    state = cycle.hosts[URI]
    assert not state.up
    assert LOST_CONNECTION in state.message
    assert state.retry_in is not None
    assert [s.domain for s in cycle.samples] == sorted(f"vbs-tb-rec-{n}" for n in names)
    for sample in cycle.samples:
        assert sample.status is Status.UNREACHABLE
        assert isinstance(sample.error, ConnectionFailed)
        assert sample.message == LOST_CONNECTION


def test_connection_lost_at_listing_marks_the_host_down_and_its_domains_unreachable():
    """libvirtd gone (RPC error): the host is down, its known domains unreachable, nothing raised."""
    names = ["virtio-hog", "nostats", "none"]
    w = _world(names)
    with _collector(w, opener=Opener(names)) as collector:
        collector.collect()
        w.conn.lose()
        cycle = collector.collect()
    _assert_down(cycle, names)
    assert "End of file while reading data" in cycle.hosts[URI].message


def test_connection_lost_while_reading_marks_the_host_down():
    """Listed fine, then every reading fails on the dead connection: down, not a row of errors."""
    names = ["virtio-hog", "nostats"]
    w = _world(names)
    with _collector(w, opener=Opener(names)) as collector:
        collector.collect()
        w.conn.after("listAllDomains", w.conn.lose)
        cycle = collector.collect()
    _assert_down(cycle, names)


def test_lost_connection_is_reopened_on_the_next_cycle():
    """The first reconnect is at once; the fresh connection is read from scratch."""
    names = ["virtio-hog", "nostats"]
    w = _world(names)
    opener = Opener(names)
    with _collector(w, opener=opener) as collector:
        collector.collect()
        w.conn.lose(connection_lost_error())
        collector.collect()
        assert opener.calls == []
        cycle = collector.collect()
        assert opener.calls == [URI]
        fresh = opener.worlds[0]
        assert cycle.hosts[URI].up
        assert by_name(cycle) == _expected(names)
        assert cycle.calls["XMLDesc"] == len(names)
        assert fresh.conn.calls_to("listAllDomains")
    assert fresh.conn.closed  # opened by the collector: closed by stop()


def test_reconnect_backs_off_after_a_failed_attempt():
    """A refused reconnect is not retried before RECONNECT_FIRST seconds; then it is, and succeeds."""
    names = ["virtio-hog"]
    w = _world(names)
    opener = Opener(names, refuse=1)
    with _collector(w, opener=opener) as collector:
        collector.collect()
        w.conn.lose()
        collector.collect()
        refused = collector.collect()
        assert opener.calls == [URI]
        _assert_down(refused, names)
        waiting = collector.collect()
        assert opener.calls == [URI]
        _assert_down(waiting, names)
        assert 0 < waiting.hosts[URI].retry_in <= RECONNECT_FIRST
        time.sleep(waiting.hosts[URI].retry_in + 0.05)
        cycle = collector.collect()
    assert opener.calls == [URI, URI]
    assert cycle.hosts[URI].up
    assert by_name(cycle) == _expected(names)


def test_host_that_cannot_be_opened_is_one_problem_then_down():
    """Never connected: one Problem for the URI in the first cycle, later cycles only say it is down."""
    opener = Opener(["virtio-hog"], refuse=2)
    with Collector([URI], opener=opener, timeout=TIMEOUT) as collector:
        first = collector.collect()
        second = collector.collect()
    [problem] = first.problems
    assert problem.what == URI and isinstance(problem.error, ConnectionFailed)
    assert not first.hosts[URI].up and first.samples == ()
    assert second.problems == () and not second.hosts[URI].up
    assert opener.calls == [URI]


def test_one_host_lost_leaves_the_other_read():
    """Two connections: samples in host order; the lost one is down, the other is read as usual."""
    other_uri = "qemu+ssh://other.example/system"
    here, there = _world(["virtio-hog", "nostats"]), _world(["noos"])
    remote = BalloonStats(Host(there.conn, other_uri), QMPClient(there.transport), clock=there.client.clock)
    opener = Opener([])
    with Collector(clients=[here.client, remote], timeout=TIMEOUT, opener=opener) as collector:
        first = collector.collect()
        assert [s.uri for s in first.samples] == [URI, URI, other_uri]
        here.conn.lose()
        cycle = collector.collect()
    assert opener.calls == []
    assert not cycle.hosts[URI].up and cycle.hosts[other_uri].up
    assert [(s.uri, s.status.value) for s in cycle.samples] == [
        (URI, "unreachable"), (URI, "unreachable"), (other_uri, EXPECTED_STATUS["noos"])
    ]
    assert cycle.errors == {"ConnectionFailed": 2}


# -- the polling interval cache ----------------------------------------------------------------------


def test_steady_cycles_do_not_read_the_polling_interval_again():
    """The interval (and query-balloon) are read once; steady cycles take them from the memo."""
    w = _world(["virtio"])
    fixture = w.fixtures[0]
    with _collector(w) as collector:
        cycles = [collector.collect() for _ in range(4)]
    assert [by_name(c) for c in cycles] == [_expected(["virtio"])] * 4
    assert _interval_reads(w, fixture) == 1
    assert len(w.transport.commands("query-balloon")) == 1
    assert all(c.samples[0].polling.qemu_interval == 2 for c in cycles)


def test_figures_gone_old_make_one_extra_interval_read():
    """Fresh -> stale under the cached interval: read it again once to be sure, then trust it again."""
    w = _world(["virtio"])
    fixture, dom = w.fixtures[0], w.domain
    with _collector(w) as collector:
        assert by_name(collector.collect()) == _expected(["virtio"])
        assert _interval_reads(w, fixture) == 1
        _guest_answers_at(w, dom, int(now_for(fixture)) - 60)
        stale = collector.collect()
        assert _interval_reads(w, fixture) == 2
        again = collector.collect()
        assert _interval_reads(w, fixture) == 2
    assert stale.samples[0].status is Status.STALE
    assert again.samples[0].status is Status.STALE
    assert stale.samples[0].polling.qemu_interval == 2


def test_interval_disabled_behind_the_collectors_back_is_polling_disabled_not_stale():
    """The re-read interval decides: QEMU now says 0, so the old figures mean polling_disabled."""
    w = _world(["virtio"])
    fixture, dom = w.fixtures[0], w.domain
    with _collector(w) as collector:
        collector.collect()
        _guest_answers_at(w, dom, int(now_for(fixture)) - 60)
        _keep_interval(w, dom, index=1)  # the recorded read after qom-set 0
        cycle = collector.collect()
    assert cycle.samples[0].status is Status.POLLING_DISABLED
    assert cycle.samples[0].polling.qemu_interval == 0
    assert _interval_reads(w, fixture) == 2


def test_last_update_moving_faster_than_the_interval_makes_one_extra_interval_read():
    """Updates 1 s apart with a cached 2 s interval: it may have been shortened, so read it again."""
    w = _world(["virtio"])
    fixture, dom = w.fixtures[0], w.domain
    last = fixture["all_domain_stats"]["balloon.last-update"]
    with _collector(w) as collector:
        collector.collect()
        _guest_answers_at(w, dom, last + 1)
        first = collector.collect()
        assert _interval_reads(w, fixture) == 2
        second = collector.collect()
        assert _interval_reads(w, fixture) == 2
    assert first.samples[0].status is second.samples[0].status is Status.OK


def test_interval_is_read_again_after_the_refresh_period():
    """Even with no reason in the figures, the interval and query-balloon are re-read every refresh."""
    w = _world(["virtio"])
    fixture = w.fixtures[0]
    ticks = [1000.0]
    client = BalloonStats(
        w.host, QMPClient(w.transport), clock=lambda: now_for(fixture), monotonic=lambda: ticks[0]
    )
    with Collector(clients=[client], timeout=TIMEOUT) as collector:
        collector.collect()
        collector.collect()
        assert _interval_reads(w, fixture) == 1
        ticks[0] += DEFAULT_REFRESH_SECONDS
        cycle = collector.collect()
    assert _interval_reads(w, fixture) == 2
    assert len(w.transport.commands("query-balloon")) == 2
    assert cycle.samples[0].status is Status.OK


# -- sources ----------------------------------------------------------------------------------------


def test_source_qmp_bulk_call_asks_for_the_state_only():
    """QMP alone: libvirt is asked only for states, in the one bulk call; no memoryStats(), no state()."""
    w = _world(MANY)
    with _collector(w, source="qmp") as collector:
        cycle = collector.collect()
    [(doms, stats, flags)] = w.conn.calls_to("domainListGetStats")
    assert stats == libvirt.VIR_DOMAIN_STATS_STATE
    assert flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert len(doms) == len(MANY)
    assert all(d.calls_to("memoryStats") == [] and d.calls_to("state") == [] for d in w.domains)
    assert by_name(cycle) == _expected(MANY)
    assert all(s.source == "qmp" and s.libvirt is None for s in cycle.samples)


def test_source_libvirt_sends_no_qmp_command():
    """libvirt alone: no passthrough (no taint), figures from the bulk call, statuses as the client's."""
    w = _world(MANY)
    now = now_for(w.fixtures[0])
    with _collector(w, source="libvirt") as collector:
        cycles = [collector.collect() for _ in range(2)]
    assert w.transport.sent == []
    assert all("qemuMonitorCommand" not in c.calls for c in cycles)
    [(_doms, stats, _flags), _] = w.conn.calls_to("domainListGetStats")
    assert stats == libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON
    for sample in cycles[-1].samples:
        scenario = sample.domain[len("vbs-tb-rec-"):]
        alone = World([load(scenario)], now=now).client.sample(sample.domain, source="libvirt")
        assert sample.status is alone.status, sample.domain
        assert sample.stats == alone.stats
        assert sample.source == "libvirt"


def test_source_libvirt_a_record_nowait_left_short_is_read_on_its_own():
    """A busy QEMU's record has no figures: that domain alone asks memoryStats(), the rest need no call."""
    uuid = next(f["domain"]["uuid"] for f in map(load, MANY) if f["scenario"] == "virtio-hog")
    w = _world(MANY, busy=[uuid])
    busy = _dom(w, "virtio-hog")
    with _collector(w, source="libvirt") as collector:
        collector.collect()
        cycle = collector.collect()
    assert [d.name() for d in w.domains if d.calls_to("memoryStats")] == [busy.name()]
    assert cycle.calls == {"listAllDomains": 1, "domainListGetStats": 1, "memoryStats": 1}
    (sample,) = [s for s in cycle.samples if s.domain == busy.name()]
    assert sample.libvirt == busy.fixture["memory_stats"] and sample.status is Status.OK


def test_source_libvirt_a_hung_qemu_holds_up_no_other_domain():
    """No QMP read probes QEMU first: a hung QEMU holds the bulk call it is in; the others then ask
    libvirt on their own, on time, and it alone is unresponsive."""
    w = _world(HUNG_SET)
    dom = _dom(w, HUNG)
    with _collector(w, source="libvirt", timeout=HUNG_TIMEOUT) as collector:
        first = collector.collect()
        releases = [dom.hang("domainListGetStats"), dom.hang("memoryStats")]
        try:
            cycles = [_timed_collect(collector) for _ in range(2)]
        finally:
            for release in releases:
                release.set()
    healthy = {n: s for n, s in by_name(first).items() if n != dom.name()}
    for cycle in cycles:
        assert by_name(cycle)[dom.name()] == "unresponsive"
        assert _healthy(cycle) == healthy
    assert dom.held("domainListGetStats") == 1  # asked once, then left alone while its call is out


@pytest.mark.parametrize(
    "kwargs",
    [dict(source="virsh"), dict(workers=0), dict(workers=-2), dict(timeout=0), dict(timeout=-1.5)],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_bad_arguments_are_refused_before_any_call(kwargs):
    """A bad source, no workers or a deadline of 0 s or less: InvalidArgument, nothing sent."""
    w = _world(["virtio"])
    with pytest.raises(InvalidArgument):
        Collector(clients=[w.client], **kwargs)
    assert w.conn.calls == [] and w.transport.sent == []


# -- life cycle ---------------------------------------------------------------------------------------


def test_background_loop_collects_until_stopped():
    """start() runs cycles in a thread and hands each to on_cycle; stop() ends it; one loop at a time."""
    w = _world(["virtio-hog", "nostats"])
    seen: List[Cycle] = []
    collector = _collector(w)
    try:
        collector.start(0.01, on_cycle=seen.append)
        with pytest.raises(InvalidArgument):
            collector.start(0.01)
        assert wait_until(lambda: len(seen) >= 3)
    finally:
        collector.stop()
    count = len(seen)
    assert [c.number for c in seen] == list(range(1, count + 1))
    assert all(by_name(c) == _expected(["virtio-hog", "nostats"]) for c in seen)
    assert collector.last is seen[-1]
    assert len(seen) == count  # stop() joined the loop: no cycle after it


@pytest.mark.parametrize("interval", [0, -1])
def test_background_loop_needs_a_positive_interval(interval):
    """An interval of 0 s or less would spin; refused."""
    w = _world(["virtio"])
    with _collector(w) as collector:
        with pytest.raises(InvalidArgument):
            collector.start(interval)


@pytest.mark.parametrize("close, closed", [(None, False), (True, True), (False, False)])
def test_stop_closes_only_what_it_is_told_to(close, closed):
    """A connection handed in stays open on stop() unless close=True."""
    w = _world(["virtio"])
    collector = _collector(w)
    collector.collect()
    collector.stop(close=close)
    assert w.conn.closed is closed


# -- events -------------------------------------------------------------------------------------------


def _events_collector(opener: Opener, **kwargs: Any) -> Collector:
    kwargs.setdefault("timeout", TIMEOUT)
    return Collector([URI], opener=opener, events=True, **kwargs)


def test_events_are_registered_on_the_connection_it_opens():
    """Lifecycle, device added/removed and balloon events, a close callback and a 5 s keepalive."""
    opener = Opener(["virtio-hog"])
    with _events_collector(opener) as collector:
        collector.collect()
        conn = opener.worlds[0].conn
    assert sorted(event for _dom, event in conn.calls_to("domainEventRegisterAny")) == sorted([
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE,
    ])
    assert len(conn.calls_to("registerCloseCallback")) == 1
    assert conn.calls_to("setKeepAlive") == [(5, 3)]


def test_a_domain_stopping_mid_call_is_not_taken_for_a_lost_connection():
    """libvirt's error 38 from QEMU's monitor (seen when a domain is destroyed mid-call): the domain
    leaves the cycle; the connection, which still answers, is kept (no reconnect, nothing leaked)."""
    names = ["virtio-hog", "nostats"]
    opener = Opener(names)
    # Every cycle compares, so QEMU is read every cycle (between turns a settled domain is not).
    with _events_collector(opener, crosscheck_every=1) as collector:
        collector.collect()
        w = opener.worlds[0]
        dom = _dom(w, "virtio-hog")
        dom.fail("qemuMonitorCommand", libvirt_error(
            libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU,
            "Unable to read from monitor: Connection reset by peer",
        ))
        w.conn.after("qemuMonitorCommand", lambda: w.conn.destroy(dom))
        cycle = collector.collect()
    assert by_name(cycle) == _expected(["nostats"])
    assert cycle.hosts[URI].up and cycle.problems == ()
    assert len(opener.worlds) == 1  # never reopened


def test_with_events_steady_cycles_do_not_list_domains():
    """The domain list is kept until an event says it changed."""
    names = ["virtio-hog", "nostats"]
    opener = Opener(names)
    with _events_collector(opener) as collector:
        first = collector.collect()
        cycles = [collector.collect() for _ in range(2)]
    assert first.calls["listAllDomains"] == 1
    for cycle in cycles:
        assert "listAllDomains" not in cycle.calls
        # Both with libvirt's figures, in one call: one domain due for its cross-check, the other
        # settled between its turns.
        assert cycle.calls["domainListGetStats"] == 1
        assert by_name(cycle) == _expected(names)


# -- the cross-check in turns --------------------------------------------------------------

STATE_ONLY = libvirt.VIR_DOMAIN_STATS_STATE
WITH_FIGURES = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON
TURNS = ["virtio-hog", "nostats", "nodriver", "noos"]


def _bulk_names(conn: Any, since: int = 0) -> Dict[int, List[str]]:
    """The domains each kind of bulk call named, from call ``since`` on."""
    named: Dict[int, List[str]] = {STATE_ONLY: [], WITH_FIGURES: []}
    for doms, stats, _flags in conn.calls_to("domainListGetStats")[since:]:
        named[stats].extend(d.name() for d in doms)
    return named


def test_with_events_each_domain_is_crosschecked_one_cycle_in_four():
    """The first cycle reads QEMU and compares every domain; then each domain's turn comes one
    cycle in four, the domains taking turns. Between its turns a settled domain (its last
    comparison agreed) is not asked through QEMU's monitor: libvirt's figures from the bulk call
    stand in, and its sample says it was not compared, with the last comparison beside it,
    never "agree"."""
    opener = Opener(TURNS)
    with _events_collector(opener) as collector:
        first = collector.collect()
        w = opener.worlds[0]
        conn = w.conn
        assert sorted(_bulk_names(conn)[WITH_FIGURES]) == sorted(f"vbs-tb-rec-{n}" for n in TURNS)
        assert _bulk_names(conn)[STATE_ONLY] == []
        assert {s.crosscheck.result.value for s in first.samples} == {"agree"}
        compared: Dict[str, int] = {s.domain: 0 for s in first.samples}
        per_cycle = []
        for _ in range(8):
            before = len(conn.calls_to("domainListGetStats"))
            read = len(w.transport.commands("qom-get"))
            cycle = collector.collect()
            named = _bulk_names(conn, before)
            due = {s.domain for s in cycle.samples if s.crosscheck.result.value == "agree"}
            per_cycle.append(len(due))
            assert sorted(named[WITH_FIGURES]) == sorted(s.domain for s in cycle.samples)
            assert named[STATE_ONLY] == []
            # QEMU is read for the domains due (guest-stats), and for no other.
            assert len(w.transport.commands("qom-get")) - read == len(due)
            for s in cycle.samples:
                if s.domain in due:
                    compared[s.domain] += 1
                    assert s.crosscheck.at == s.sampled_at
                    continue
                assert s.crosscheck.result.value == "skipped" and s.crosscheck.checked == 0
                assert s.crosscheck.reason == NOT_THIS_TURN
                assert s.crosscheck.previous is not None
                assert s.crosscheck.previous.result.value == "agree"
                assert s.crosscheck.previous.at is not None and s.crosscheck.previous.at <= s.sampled_at
                # libvirt's figures, shown as QEMU's would be: the same as a reading of QEMU.
                dom = _dom(w, s.domain[len("vbs-tb-rec-"):])
                assert s.libvirt == dom.fixture["memory_stats"]
                alone = _world([dom.fixture["scenario"]]).client.sample(s.domain)
                assert (s.stats, s.status, s.qom_path, s.polling) == (
                    alone.stats, alone.status, alone.qom_path, alone.polling
                ), s.domain
            assert by_name(cycle) == _expected(TURNS)
    assert compared == {d: 2 for d in compared}, "each domain compared twice in eight cycles"
    assert max(per_cycle) <= 2, f"the turns bunch up: {per_cycle}"


def test_a_turn_without_libvirts_figures_takes_the_balloon_size_from_libvirts_event():
    """A guest whose figures libvirt has no name for (a Linux 6.12 guest on QEMU 10) is read from
    QEMU every cycle. Between comparisons its size is libvirt's, as its BALLOON_CHANGE event told
    it (libvirt keeps its own the same way), and QEMU is not asked for it (no query-balloon)."""
    opener = Opener(["virtio-hog", "nostats"], stack="next")
    with _events_collector(opener) as collector:
        w = None
        results: List[str] = []
        # Until a comparison after the first reading is followed by a turn without one: the
        # next two turns are without too (the first comparison's next turn depends on the order).
        while len(results) < 3 or results[-2:] != ["agree", "skipped"]:
            assert len(results) < 8, results
            cycle = collector.collect()
            w = opener.worlds[0]
            [s] = [s for s in cycle.samples if s.domain == "vbs-tb-rec-virtio-hog"]
            results.append(s.crosscheck.result.value)
        assert w is not None
        dom = _dom(w, "virtio-hog")
        before = s.actual_bytes
        assert before is not None
        queried = len(w.transport.commands("query-balloon"))
        # The recorded bulk figures keep the old size: only the event can tell the new one.
        smaller = before // 1024 - 4096
        assert w.conn.emit(libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, dom, smaller) == 1
        cycle = collector.collect()
    [s] = [s for s in cycle.samples if s.domain == dom.name()]
    assert s.crosscheck.result.value == "skipped"
    assert s.actual_bytes == smaller * 1024
    assert len(w.transport.commands("query-balloon")) == queried
    assert s.libvirt is None and s.get("stat-oom-kills") is not None  # QEMU's own figures


def test_between_turns_libvirts_figures_stand_in_until_something_changes():
    """A settled domain between its turns is read from libvirt's figures (no QMP). When they say
    something changed (here: the guest stopped updating, so the status is no longer ok), QEMU's
    live interval is read first, as a reading of QEMU would (it may have been lengthened behind
    the collector's back), and not QEMU's figures."""
    opener = Opener(["virtio-hog", "nostats"])
    with _events_collector(opener) as collector:
        results: List[str] = []
        # Two readings between turns in a row: the next is between turns too (one in four compares).
        while results[-2:] != ["skipped", "skipped"]:
            assert len(results) < 8, results
            w = opener.worlds[-1] if opener.worlds else None
            read = len(w.transport.commands(domain="vbs-tb-rec-virtio-hog")) if w else 0
            cycle = collector.collect()
            [s] = [s for s in cycle.samples if s.domain == "vbs-tb-rec-virtio-hog"]
            results.append(s.crosscheck.result.value)
        w = opener.worlds[0]
        dom = _dom(w, "virtio-hog")
        assert len(w.transport.commands(domain=dom.name())) == read  # libvirt's figures alone
        steady = cycle
        # libvirt's record now carries an update far older than the interval allows: stale.
        stale = {"balloon.last-update": dom.fixture["all_domain_stats"]["balloon.last-update"] - 3600}
        dom.fixture["all_domain_stats"] = dict(dom.fixture["all_domain_stats"], **stale)
        cycle = collector.collect()
    [before] = [s for s in steady.samples if s.domain == dom.name()]
    [changed] = [s for s in cycle.samples if s.domain == dom.name()]
    assert before.status is Status.OK and before.crosscheck.reason == NOT_THIS_TURN
    assert changed.crosscheck.reason == NOT_THIS_TURN and changed.status is Status.STALE
    asked = w.transport.commands(domain=dom.name())[read:]
    assert [c["arguments"]["property"] for c in asked] == ["guest-stats-polling-interval"]


def test_without_events_every_reading_is_crosschecked():
    """A one-off reading has no events to keep libvirt's balloon size: every domain compares."""
    w = _world(TURNS)
    with _collector(w, crosscheck_every=4) as collector:
        cycles = [collector.collect() for _ in range(3)]
    for cycle in cycles:
        assert {s.crosscheck.result.value for s in cycle.samples} == {"agree"}
    assert _bulk_names(w.conn)[STATE_ONLY] == []


def test_crosscheck_every_one_compares_every_cycle():
    opener = Opener(TURNS)
    with Collector([URI], opener=opener, events=True, timeout=TIMEOUT, crosscheck_every=1) as collector:
        cycles = [collector.collect() for _ in range(3)]
    for cycle in cycles:
        assert {s.crosscheck.result.value for s in cycle.samples} == {"agree"}


def test_a_mismatch_is_compared_again_the_next_cycle():
    """Anything but agreement is not left for three cycles: the next reading compares again."""
    opener = Opener(["virtio-hog", "nostats"])
    with _events_collector(opener) as collector:
        collector.collect()
        w = opener.worlds[0]
        dom = _dom(w, "virtio-hog")
        # libvirt now reports 7 pages swapped in, which QEMU's recorded figures never said.
        dom.fixture["all_domain_stats"] = dict(dom.fixture["all_domain_stats"], **{"balloon.swap_in": 7})
        dom.fixture["memory_stats"] = dict(dom.fixture["memory_stats"], swap_in=7)
        results = []
        for _ in range(3):
            cycle = collector.collect()
            [s] = [s for s in cycle.samples if s.domain == dom.name()]
            results.append(s.crosscheck.result.value)
    assert results[-2:] == ["mismatch", "mismatch"], results


def test_lifecycle_event_makes_the_next_cycle_list_domains_again():
    """A started domain is not seen until libvirt says so; then it is read in the next cycle."""
    names = ["virtio-hog", "nostats", "noos"]
    opener = Opener(names)
    with _events_collector(opener) as collector:
        collector.collect()
        w = opener.worlds[0]
        late = _dom(w, "noos")
        w.conn.destroy(late)
        w.conn.emit(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, late, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
        assert late.name() not in by_name(collector.collect())
        started = FakeDomain(late.fixture, dom_id=late.ID() + 10)
        w.conn.add(started)
        assert late.name() not in by_name(collector.collect())
        event = libvirt.VIR_DOMAIN_EVENT_STARTED
        assert w.conn.emit(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, started, event, 0) == 1
        cycle = collector.collect()
    assert by_name(cycle) == _expected(names)
    assert cycle.calls["listAllDomains"] == 1


def test_device_event_makes_the_domain_xml_and_qom_path_read_again():
    """A device added or removed may move the balloon: its XML and QOM path are looked at again."""
    names = ["virtio-hog", "nostats"]
    opener = Opener(names)
    with _events_collector(opener) as collector:
        collector.collect()
        w = opener.worlds[0]
        dom = _dom(w, "virtio-hog")
        w.conn.emit(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, dom, "balloon0")
        cycle = collector.collect()
    assert by_name(cycle) == _expected(names)
    assert cycle.calls["XMLDesc"] == 1 and len(dom.calls_to("XMLDesc")) == 2
    intervals = [c for c in w.transport.commands("qom-get", domain=dom.name())
                 if c["arguments"]["property"] == POLLING_PROPERTY]
    assert len(intervals) == 2  # a fresh memo: the interval (and the path) read again


def test_close_callback_makes_the_collector_reconnect_and_register_again():
    """libvirt says the connection closed: the next cycle opens a new one, with its events."""
    names = ["virtio-hog"]
    opener = Opener(names)
    with _events_collector(opener) as collector:
        collector.collect()
        old = opener.worlds[0].conn
        assert old.emit_close(libvirt.VIR_CONNECT_CLOSE_REASON_EOF) == 1
        cycle = collector.collect()
        assert old.closed
        new = opener.worlds[1].conn
    assert opener.calls == [URI, URI]
    assert cycle.hosts[URI].up
    assert by_name(cycle) == _expected(names)
    assert len(new.calls_to("registerCloseCallback")) == 1


def test_close_callback_with_libvirtd_still_down_says_why():
    """The reason libvirt gave for the close is in the host's message while it stays down."""
    names = ["virtio-hog"]
    opener = Opener(names)
    with _events_collector(opener) as collector:
        collector.collect()
        opener.refuse = 1
        opener.worlds[0].conn.emit_close(libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE)
        cycle = collector.collect()
    _assert_down(cycle, names)
    assert "libvirt closed the connection: keepalive" in cycle.hosts[URI].message


# -- one connection per call (lanes) -------------------------------------------------------------------
#
# The fake models one libvirt connection as a client sees it (RPCModel): libvirtd serves 5 calls per
# connection at once, and a call made while another on the same connection is held by a hung QEMU
# waits until that one returns (the lost wake-up of libvirt's RPC client, in its worst case). With
# lanes each call has a connection to itself and neither can bite; without them both do.

#: Healthy domains of these tests: the "virtio" recording under names of their own, all ``ok``
#: under one clock.
LANE_HEALTHY = 6

#: Cycles in a row that must each get every healthy domain read.
LANE_CYCLES = 4

#: Seconds after which the hung QEMUs answer whatever the test does: a scheduler that makes the
#: collector's own thread wait on them fails the test instead of hanging it.
WATCHDOG = 20.0


def _copy_of(scenario: str, name: str, number: int) -> Dict[str, Any]:
    """A recorded scenario under another name, UUID and id (the testbed recorded one domain of each)."""
    fixture = load(scenario)
    fixture["domain"].update(name=name, uuid=f"00000000-0000-4000-8000-{number:012d}", id=100 + number)
    return fixture


@contextlib.contextmanager
def _hung_host(
    hung: int, *, lanes: bool, rpc: RPCModel = RPCModel(), named: bool = False
) -> Iterator[Tuple[World, List[FakeDomain], Collector, List[threading.Event]]]:
    """Healthy domains and ``hung`` more whose QEMU does not answer; released and stopped whatever happens.

    ``named``: the collector is given the domains as Guests, so that its own thread makes no call
    during a cycle (on one shared connection, its listing would wait for the hung call too).
    """
    fired = threading.Event()
    fixtures = [_copy_of("virtio", f"vbs-tb-rec-virtio-{i}", i) for i in range(LANE_HEALTHY)]
    fixtures += [_copy_of(HUNG, f"vbs-tb-rec-{HUNG}-{i}", 50 + i) for i in range(hung)]
    w = World(fixtures, now=now_for(fixtures[0]), rpc=rpc, lanes=lanes)
    for dom in w.domains:
        _keep_interval(w, dom)
    stopped = [dom for dom in w.domains if dom.fixture["scenario"] == HUNG]
    domains = w.client.guests() if named else None
    releases = [dom.hang() for dom in stopped]

    def release_all() -> None:
        for release in releases:
            release.set()

    def watchdog_fired() -> None:
        fired.set()
        release_all()

    watchdog = threading.Timer(WATCHDOG, watchdog_fired)
    watchdog.daemon = True
    collector = Collector(clients=[w.client], domains=domains, timeout=HUNG_TIMEOUT, workers=WORKERS)
    watchdog.start()
    try:
        yield w, stopped, collector, releases
        assert not fired.is_set(), "the hung QEMUs had to be released for the test to go on"
    finally:
        watchdog.cancel()
        release_all()
        collector.stop()


def _split(cycle: Cycle, stopped: List[FakeDomain]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The statuses of the hung domains, and of the healthy ones."""
    statuses = by_name(cycle)
    return {d.name(): statuses.pop(d.name()) for d in stopped}, statuses


def _healthy_ok() -> Dict[str, str]:
    return {f"vbs-tb-rec-virtio-{i}": "ok" for i in range(LANE_HEALTHY)}


def _open_connections(w: World) -> int:
    return sum(1 for conn in w.conn.connections if not conn.closed)


def _gauges(text: str) -> Dict[str, Dict[str, float]]:
    """The exposition's gauges with a ``uri`` label: name -> uri -> value."""
    out: Dict[str, Dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type == "gauge" and set(sample.labels) == {"uri"}:
                out.setdefault(sample.name, {})[sample.labels["uri"]] = sample.value
    return out


@pytest.mark.parametrize("hung", [1, 5], ids=["one-hung", "five-hung"])
def test_with_lanes_hung_qemus_cost_no_healthy_domain_its_cycle(hung):
    """Each call on a connection of its own: the hung QEMUs' calls hold their own lanes and nothing else.

    Every healthy domain is ``ok`` in every cycle, no connection ever carries two calls at once, and no
    call ever waits for a lost wake-up or for one of libvirtd's slots. At the end of each cycle only the
    hung calls are in flight, each holding its lane.
    """
    with _hung_host(hung, lanes=True) as (w, stopped, collector, _releases):
        cycles = [collector.collect() for _ in range(LANE_CYCLES)]
        conns = list(w.conn.connections)
        assert all(dom.held() == 1 for dom in stopped)
        assert sorted(conn.hung for conn in conns) == [0] * (len(conns) - hung) + [1] * hung
        assert set(w.conn.served) == {"listAllDomains"}  # the collector's own connection: no domain's call
        assert [conn.peak for conn in conns] == [1] * len(conns)
        assert sum(conn.delayed + conn.queued for conn in conns) == 0
        for cycle in cycles:
            stuck, healthy = _split(cycle, stopped)
            assert set(stuck.values()) == {"unresponsive"}
            assert healthy == _healthy_ok()
            lanes = cycle.hosts[URI].lanes
            assert lanes is not None and lanes.in_flight == hung
        assert cycles[-1].hosts[URI].lanes.connections == _open_connections(w) - 1
    opened = sum(cycle.calls.get("open", 0) for cycle in cycles)
    assert opened == len(conns) - 1 > hung


@pytest.mark.parametrize(
    "hung, rpc, waited",
    [(1, RPCModel(), "delayed"), (5, RPCModel(lost_wakeup=False), "queued")],
    ids=["lost-wake-up", "five-slots-held"],
)
def test_without_lanes_hung_qemus_cost_the_healthy_domains_their_cycle(hung, rpc, waited):
    """The old scheduling, every call on one connection: the model bites, so the lanes test means something.

    One hung call loses the next calls their wake-up; five take all of libvirtd's slots. Once the hung
    calls are held (first cycle), every healthy domain's call waits behind them: none is ``ok``.
    """
    with _hung_host(hung, lanes=False, rpc=rpc, named=True) as (w, stopped, collector, _releases):
        collector.collect()
        assert all(dom.wait_held() for dom in stopped)
        cycle = collector.collect()
        stuck, healthy = _split(cycle, stopped)
        assert set(stuck.values()) == {"unresponsive"}
        assert set(healthy.values()) == {"unresponsive"}, healthy
        assert getattr(w.conn, waited) > 0
        assert w.conn.hung == hung and w.conn.peak > 1
        assert w.conn.connections == [w.conn]
    assert cycle.hosts[URI].up and cycle.hosts[URI].lanes is None
    assert "virt_balloon_libvirt_calls_in_flight" not in _gauges(render(cycle, collector.totals))


def test_stuck_calls_are_in_the_cycle_and_the_metrics():
    """HostState.lanes and the exporter's series: the hung call in flight, stuck past the deadline."""
    with _hung_host(1, lanes=True) as (w, stopped, collector, _releases):
        collector.collect()
        time.sleep(HUNG_TIMEOUT)  # a lower bound: the hung call has now run longer than the deadline
        cycle = collector.collect()
        open_now = _open_connections(w)
    lanes = cycle.hosts[URI].lanes
    assert lanes is not None
    assert (lanes.in_flight, lanes.stuck) == (1, 1)
    assert lanes.oldest_seconds > HUNG_TIMEOUT
    assert lanes.connections == open_now - 1 >= 2  # the stuck lane, and at least one serving
    gauges = _gauges(render(cycle, collector.totals))
    assert gauges["virt_balloon_libvirt_calls_in_flight"] == {URI: 1}
    assert gauges["virt_balloon_libvirt_calls_stuck"] == {URI: 1}
    assert gauges["virt_balloon_libvirt_oldest_call_seconds"] == {URI: round(lanes.oldest_seconds, 3)}
    assert gauges["virt_balloon_libvirt_connections"] == {URI: open_now}


def test_a_stuck_lane_serves_again_once_its_call_returns():
    """QEMU answers again: the stuck calls return, their lanes serve again, idle lanes are bounded."""
    with _hung_host(5, lanes=True) as (w, stopped, collector, releases):
        collector.collect()
        time.sleep(HUNG_TIMEOUT)  # a lower bound: the hung calls have now run longer than the deadline
        before = collector.collect().hosts[URI].lanes
        assert before is not None and before.stuck == 5
        for release in releases:
            release.set()
        expected = {**_healthy_ok(), **{dom.name(): EXPECTED_STATUS[HUNG] for dom in stopped}}

        def settled() -> bool:
            cycle = collector.collect()
            return by_name(cycle) == expected and cycle.hosts[URI].lanes.in_flight == 0

        assert wait_until(settled)
        lanes = collector.last.hosts[URI].lanes
        assert (lanes.stuck, lanes.oldest_seconds) == (0, 0.0)
        assert lanes.connections <= w.host.lanes.keep
        assert lanes.connections == _open_connections(w) - 1
        assert [conn.peak for conn in w.conn.connections] == [1] * len(w.conn.connections)


def test_a_collector_that_opens_its_own_connection_reads_in_lanes(monkeypatch):
    """``Collector([uri])`` (the CLI, the exporter) opens its lanes the way it opened its connection."""
    fixture = load("virtio")
    w = World([fixture], now=now_for(fixture), rpc=RPCModel())
    opened: List[str] = []

    def open_(uri: str) -> Any:
        opened.append(uri)
        return w.conn if len(opened) == 1 else w.conn.another()

    monkeypatch.setattr(libvirt, "open", open_)
    with Collector([URI], source="libvirt", timeout=TIMEOUT) as collector:
        cycle = collector.collect()
    (sample,) = cycle.samples
    # Read (the recording is old, so against today's clock its figures are stale).
    assert sample.error is None and sample.libvirt is not None and sample.status is Status.STALE
    lanes = cycle.hosts[URI].lanes
    assert lanes is not None and lanes.connections >= 1
    assert opened == [URI] * len(w.conn.connections)
    # The connection it opened first served no call that names a domain.
    assert w.conn.served.get("memoryStats", 0) == 0 and w.conn.served.get("domainListGetStats", 0) == 0


def test_a_lane_whose_connection_was_lost_is_never_used_again():
    """Only a lane's connection died (libvirtd is fine): its domain is read on a new lane next cycle."""
    fixture = load("virtio")
    w = World([fixture], now=now_for(fixture), rpc=RPCModel(), lanes=True)
    _keep_interval(w, w.domain)
    with Collector(clients=[w.client], timeout=TIMEOUT, workers=1) as collector:
        assert by_name(collector.collect()) == {w.domain.name(): "ok"}
        lanes = w.conn.connections[1:]
        for conn in lanes:
            conn.lose()
        statuses = [by_name(collector.collect()) for _ in range(3)]
    # The cycle that met the dead lane reports it; the lane is closed, not handed out again.
    assert statuses[-2:] == [{w.domain.name(): "ok"}] * 2, statuses
    assert all(conn.closed for conn in lanes)
    assert len(w.conn.connections) > 1 + len(lanes)


def test_a_settled_domain_that_hangs_between_its_turns_holds_up_no_other_domain():
    """Between its turns a settled domain is not read through QEMU first, so a QEMU stopped then
    holds the bulk call it is in: after the cutoff the others in that call ask libvirt on their
    own, on time; it alone is unresponsive, and is not asked again while its call is out."""
    opener = Opener(HUNG_SET)
    with _events_collector(opener, timeout=HUNG_TIMEOUT) as collector:
        first = collector.collect()
        assert by_name(first) == _expected(HUNG_SET)
        w = opener.worlds[0]
        dom = _dom(w, HUNG)
        # Its turn (compared), after the first cycle: the next three readings are between turns.
        for _ in range(5):
            [s] = [s for s in collector.collect().samples if s.domain == dom.name()]
            if s.crosscheck.result.value == "agree":
                break
        else:
            raise AssertionError("no turn in five cycles")
        releases = [dom.hang(m) for m in ("domainListGetStats", "memoryStats", "qemuMonitorCommand", "state")]
        try:
            cycles = [_timed_collect(collector) for _ in range(3)]
        finally:
            for release in releases:
                release.set()
    healthy = _expected([n for n in HUNG_SET if n != HUNG])
    for cycle in cycles:
        assert by_name(cycle)[dom.name()] == "unresponsive"
        assert _healthy(cycle) == healthy
    # No QMP read first: the bulk call it held, then its own memoryStats() after the cutoff, which
    # it held too; nothing more while that is out.
    held = {m: dom.held(m) for m in ("domainListGetStats", "memoryStats", "qemuMonitorCommand")}
    assert held == {"domainListGetStats": 1, "memoryStats": 1, "qemuMonitorCommand": 0}


def test_a_qemu_that_names_figures_libvirt_has_no_name_for_is_read_every_cycle():
    """QEMU 10 names six figures libvirt 11 does not: only QEMU can say whether the guest fills
    them in (a guest whose driver comes back after a reset does, at once), so such a domain is
    read from QEMU every cycle, even while it reports them unsupported, and between its turns
    its bulk call asks for its state only."""
    names = ["noos", "nodriver"]
    opener = Opener(names, stack="next")
    with _events_collector(opener) as collector:
        cycles = [collector.collect() for _ in range(4)]
    w = opener.worlds[0]
    between = [s for c in cycles[1:] for s in c.samples if s.crosscheck.reason == NOT_THIS_TURN]
    assert len(between) >= 4
    for s in between:
        assert s.stats is not None and "stat-oom-kills" in s.stats.values  # QEMU's own reading
        assert s.stats.values["stat-oom-kills"] is None and s.libvirt is None
    for name in names:
        reads = w.transport.commands("qom-get", f"vbs-tb-rec-{name}")
        assert sum(c["arguments"]["property"] == "guest-stats" for c in reads) >= len(cycles)
    assert _bulk_names(w.conn)[STATE_ONLY]

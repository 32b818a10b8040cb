"""tests.fakelibvirt: its model of how calls share a libvirt connection.

The collector's lane tests lean on it (tests/unit/test_collector.py), so
what it claims is checked here on its own: more connections to one fake
hypervisor, their per-connection handles, libvirtd's slots per connection
and the lost wake-up. Held calls wait on a hang gate that the test sets in
a ``finally``; waits have generous bounds, only so that a broken fake fails
instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterator

import libvirt
import pytest

from tests.fakelibvirt import DomainHandle, RPCModel
from tests.unit.conftest import World, load, wait_until

#: Upper bound for anything that should happen at once.
PATIENCE = 5.0

ACTIVE = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE


@pytest.fixture
def threads() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for calls that wait; a test releases what holds them before this ends."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


def test_another_connection_sees_the_same_domains_through_handles_of_its_own():
    """A domain found on another connection is a handle: its calls go through that connection."""
    w = World([load("virtio")])
    dom = w.domain
    other = w.conn.another()
    assert w.conn.connections == [w.conn, other] and other.number == 1
    [handle] = other.listAllDomains(ACTIVE)
    assert isinstance(handle, DomainHandle)
    assert handle.domain is dom and handle.connection is other
    assert other.lookupByUUIDString(dom.UUIDString()).domain is dom
    assert other.lookupByName(dom.name()).domain is dom
    assert w.conn.lookupByName(dom.name()) is dom  # on its own connection, the domain itself
    assert handle.memoryStats() == dom.fixture["memory_stats"]
    assert other.served["memoryStats"] == 1 and "memoryStats" not in w.conn.served
    assert dom.calls_to("memoryStats") == [()]  # one domain, whatever the connection
    w.conn.destroy(dom)
    with pytest.raises(libvirt.libvirtError) as err:
        handle.memoryStats()
    assert err.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert other.listAllDomains(ACTIVE) == []


def test_bulk_stats_go_through_the_domains_connection_and_refuse_a_mix():
    """As libvirt's: the call takes the connection of the domains named, which must be one."""
    w = World([load("virtio"), load("nostats")])
    other = w.conn.another()
    handles = other.listAllDomains(ACTIVE)
    records = other.domainListGetStats(handles, libvirt.VIR_DOMAIN_STATS_STATE)
    assert [dom for dom, _ in records] == handles
    assert other.served["domainListGetStats"] == 1 and "domainListGetStats" not in w.conn.served
    with pytest.raises(libvirt.libvirtError) as err:
        other.domainListGetStats([handles[0], w.domains[1]], libvirt.VIR_DOMAIN_STATS_STATE)
    assert err.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
    assert "single connection" in str(err.value)


def test_a_connection_serves_max_requests_calls_at_once(threads):
    """Five calls held: a sixth on that connection waits until one returns; another connection does not."""
    w = World([load("virtio")], rpc=RPCModel(lost_wakeup=False))
    release = w.domain.hang("memoryStats")
    try:
        held = [threads.submit(w.domain.memoryStats) for _ in range(5)]
        assert w.domain.wait_held("memoryStats", count=5)
        sixth = threads.submit(w.conn.getLibVersion)
        assert wait_until(lambda: w.conn.queued == 1, within=PATIENCE)
        assert not sixth.done()
        assert w.conn.another().getLibVersion() == 9000000
        assert w.conn.in_flight == 6
    finally:
        release.set()
    assert sixth.result(PATIENCE) == 9000000
    assert all(f.result(PATIENCE) == w.domain.fixture["memory_stats"] for f in held)
    assert (w.conn.in_flight, w.conn.peak, w.conn.delayed) == (0, 6, 0)


@pytest.mark.parametrize("lost_wakeup", [True, False])
def test_a_call_made_while_another_is_held_waits_for_it_only_with_the_lost_wake_up(threads, lost_wakeup):
    """One hung call: the next call on that connection waits until it returns, if wake-ups are lost."""
    w = World([load("virtio")], rpc=RPCModel(lost_wakeup=lost_wakeup))
    release = w.domain.hang("memoryStats")
    try:
        hung = threads.submit(w.domain.memoryStats)
        assert w.domain.wait_held("memoryStats")
        assert w.conn.hung == 1
        later = threads.submit(w.domain.state)
        assert w.conn.another().lookupByName(w.domain.name()).state() == w.domain.fixture["domain"]["state"]
        if lost_wakeup:
            assert wait_until(lambda: w.conn.delayed == 1, within=PATIENCE)
            assert not later.done()
        else:
            assert later.result(PATIENCE) == w.domain.fixture["domain"]["state"]
    finally:
        release.set()
    assert later.result(PATIENCE) == w.domain.fixture["domain"]["state"]
    hung.result(PATIENCE)
    assert (w.conn.hung, w.conn.in_flight, w.conn.queued) == (0, 0, 0)
    assert w.conn.delayed == int(lost_wakeup)


def test_without_a_model_calls_are_counted_but_never_wait(threads):
    """The default: any number of calls at once, each answered at once; the counters still count."""
    w = World([load("virtio")])
    release = w.domain.hang("memoryStats")
    try:
        hung = threads.submit(w.domain.memoryStats)
        assert w.domain.wait_held("memoryStats")
        assert w.domain.state() == w.domain.fixture["domain"]["state"]
        assert (w.conn.in_flight, w.conn.peak, w.conn.hung) == (1, 2, 1)
    finally:
        release.set()
    hung.result(PATIENCE)
    assert (w.conn.in_flight, w.conn.delayed, w.conn.queued) == (0, 0, 0)

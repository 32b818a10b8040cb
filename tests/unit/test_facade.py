"""virt_balloon_stats.facade: sample_many over one connection, and the scripts' BalloonStats.

The readings go through the real client, collector, host, transport and QMP
layers over fake libvirt domains and recorded QMP replies (see conftest).
"""

from __future__ import annotations

import subprocess
import sys

import libvirt
import pytest

import virt_balloon_stats
from tests.unit.conftest import EXPECTED_STATUS, World, load, now_for
from virt_balloon_stats import client, facade
from virt_balloon_stats.crosscheck import Result
from virt_balloon_stats.errors import DomainNotFound, InvalidArgument
from virt_balloon_stats.facade import sample_many

#: One of each status the clock does not decide, plus one fresh domain: a single
#: clock cannot make the recordings of different moments all fresh (or all stale).
MANY = ["virtio-hog", "nostats", "nodriver", "noos", "paused", "none"]


def _many(stack="debian12", **kwargs):
    fixtures = [load(n, stack) for n in MANY]
    return World(fixtures, now=now_for(fixtures[0]), stack=stack, **kwargs), fixtures


def test_sample_many_makes_one_bulk_call_for_all_domains():
    """N domains: one domainListGetStats (NOWAIT), results in the order asked."""
    w, fixtures = _many()
    names = [f["domain"]["name"] for f in fixtures]
    samples = sample_many(w.client, names)
    calls = w.conn.calls_to("domainListGetStats")
    assert len(calls) == 1
    assert len(calls[0][0]) == len(fixtures)
    assert calls[0][2] & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert [s.domain for s in samples] == names
    assert w.client.rpc_counts["domainListGetStats"] == 1


def test_sample_many_statuses(stack):
    """Each domain keeps its own status when sampled together (in a thread pool)."""
    w, fixtures = _many(stack)
    samples = sample_many(w.client, [f["domain"]["name"] for f in fixtures])
    assert {s.domain: s.status.value for s in samples} == {
        f["domain"]["name"]: EXPECTED_STATUS[f["scenario"]] for f in fixtures
    }


@pytest.mark.parametrize("name", [n for n in MANY if n != "none"])
def test_sample_many_uses_the_bulk_figures(name, stack):
    """A domain the bulk call covered needs no memoryStats() of its own."""
    w, fixtures = _many(stack)
    sample_many(w.client, [f["domain"]["name"] for f in fixtures])
    dom = next(d for d in w.domains if d.fixture["scenario"] == name)
    assert dom.calls_to("memoryStats") == []


def test_sample_many_busy_domain_falls_back_to_its_own_memory_stats():
    """NOWAIT leaves a busy domain without figures; only that domain calls memoryStats()."""
    fixtures = [load("virtio"), load("virtio-hog")]
    busy = fixtures[1]["domain"]["uuid"]
    w = World(fixtures, busy=[busy], now=now_for(fixtures[0]))
    samples = sample_many(w.client, [f["domain"]["name"] for f in fixtures])
    assert [len(d.calls_to("memoryStats")) for d in w.domains] == [0, 1]
    assert all(s.crosscheck.result is Result.AGREE for s in samples)


def test_sample_many_without_names_samples_every_running_domain():
    """No names: listAllDomains(ACTIVE), sorted by name."""
    w, fixtures = _many()
    samples = sample_many(w.client)
    assert [s.domain for s in samples] == sorted(f["domain"]["name"] for f in fixtures)
    assert w.conn.calls_to("listAllDomains") == [(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,)]


def test_sample_many_source_qmp_asks_the_bulk_call_for_states_only():
    """With QMP alone, the bulk call carries the states (no state() per domain), no balloon figures."""
    w, fixtures = _many()
    sample_many(w.client, [f["domain"]["name"] for f in fixtures], source="qmp")
    [(_doms, stats, _flags)] = w.conn.calls_to("domainListGetStats")
    assert stats == libvirt.VIR_DOMAIN_STATS_STATE
    assert all(d.calls_to("memoryStats") == [] and d.calls_to("state") == [] for d in w.domains)


def test_sample_many_refuses_zero_workers():
    """At least one worker."""
    w, _ = _many()
    with pytest.raises(InvalidArgument):
        sample_many(w.client, workers=0)


def test_sample_many_of_an_empty_list_samples_nothing():
    """An empty list is no domain, never "every domain" (names that all failed to resolve)."""
    w, _ = _many()
    assert sample_many(w.client, []) == []
    assert w.conn.calls == []
    assert w.transport.sent == []


def test_sample_many_of_every_domain_forgets_paths_of_domains_gone():
    """Sampling every running domain drops cached QOM paths of domains that went away."""
    fixtures = [load("virtio"), load("transitional")]
    w = World(fixtures, now=now_for(fixtures[0]))
    gone, kept = w.guest(0), w.guest(1)
    sample_many(w.client)
    assert w.client.paths.get(gone) is not None
    w.conn.domains.remove(w.domains[0])
    sample_many(w.client)
    assert w.client.paths.get(gone) is None
    assert w.client.paths.get(kept).path == fixtures[1]["balloon_path"]


def test_sample_many_of_a_name_that_does_not_exist_raises():
    """A name that resolves to nothing is the caller's mistake, raised as a script expects."""
    w, _ = _many()
    with pytest.raises(DomainNotFound):
        sample_many(w.client, ["no-such-domain"])


# -- the scripts' BalloonStats ----------------------------------------------------


def test_the_package_balloon_stats_is_the_facade():
    """``from virt_balloon_stats import BalloonStats`` gives the client with sample_many()."""
    assert virt_balloon_stats.BalloonStats is facade.BalloonStats
    assert issubclass(facade.BalloonStats, client.BalloonStats)
    assert not hasattr(client.BalloonStats, "sample_many")  # the client never reaches up to the collector


def test_the_method_is_the_function():
    """BalloonStats.sample_many(...) is sample_many(client, ...): one bulk call, the order asked."""
    w, fixtures = _many()
    reader = facade.BalloonStats(w.host, w.client.qmp, clock=w.client.clock)
    names = [f["domain"]["name"] for f in fixtures]
    assert [s.domain for s in reader.sample_many(names)] == names
    assert len(w.conn.calls_to("domainListGetStats")) == 1


def test_open_and_with_give_the_class_they_are_called_on():
    """A script's ``with BalloonStats.open() as client`` has sample_many()."""
    with facade.BalloonStats.open("test:///default") as reader:
        assert type(reader) is facade.BalloonStats


def test_importing_the_facade_does_not_import_the_collector():
    """A script that reads one domain at a time pays for no collector."""
    code = (
        "import sys, virt_balloon_stats.facade;"
        "sys.exit('virt_balloon_stats.collector' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

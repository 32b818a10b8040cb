"""The collector against real libvirtd and QEMU: hung QEMU, domain churn, call counts, interval changes.

Faults are real: a QEMU process stopped with SIGSTOP (what a hung QEMU looks
like to libvirt), domains created and destroyed under a running collector,
and the polling interval changed through QMP behind the collector's back.
Every fault is undone in a ``finally``, even when the test fails. Expected
figures come from ``virsh``, never from the package itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.integration.conftest import URI, Domains
from tests.integration.test_cli import qmp, qom_path_by_alias, vbs, virsh
from virt_balloon_stats.collector import Collector, Cycle
from virt_balloon_stats.errors import QEMUUnresponsive
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import Status

#: Deadline given to one-shot commands in these tests, and the slack allowed
#: for the process to start (imports) and exit.
TIMEOUT = 5
STARTUP_SLACK = 3.0


def qemu_pid(name: str) -> int:
    """The QEMU process of a running domain, from libvirt's pid file."""
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


@contextlib.contextmanager
def stopped(name: str) -> Iterator[int]:
    """SIGSTOP the domain's QEMU for the block; SIGCONT it whatever happens."""
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def create_many(domains: Domains, count: int, variant: str, tag: str, *options: str, wait: bool) -> List[str]:
    """Create ``count`` domains at once (their boots overlap); return their names."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(domains.create, variant, f"{tag}{i}", *options, wait_stats=wait) for i in range(count)
        ]
        return sorted(f.result() for f in futures)


@pytest.fixture(scope="module")
def four_guests(conn) -> Iterator[List[str]]:
    """Four real guests whose balloon driver answers (stats period 2)."""
    domains = Domains()
    try:
        yield create_many(domains, 4, "virtio", "col", wait=True)
    finally:
        domains.destroy_all()


def by_name(cycle: Cycle) -> Dict[str, str]:
    return {s.domain: s.status.value for s in cycle.samples}


# -- a hung QEMU --------------------------------------------------------------------------


def test_stats_all_reports_the_others_on_time_with_one_qemu_stopped(four_guests):
    hung, healthy = four_guests[0], four_guests[1:]
    with stopped(hung):
        began = time.monotonic()
        proc = vbs("stats", "--all", "--timeout", str(TIMEOUT), "--format", "json", timeout=60)
        took = time.monotonic() - began
    assert took < TIMEOUT + STARTUP_SLACK, f"took {took:.1f} s"
    assert proc.returncode == 1, proc.stderr
    docs = {d["domain"]: d for d in json.loads(proc.stdout)}
    assert docs[hung]["status"] == "unresponsive"
    assert docs[hung]["message"].startswith(f"QEMU did not answer within {TIMEOUT} s")
    assert docs[hung]["stats"] == {}
    for name in healthy:
        assert docs[name]["status"] == "ok", docs[name]
    assert [line for line in proc.stderr.splitlines() if line.startswith(f"{hung}:")] == [
        f"{hung}: {docs[hung]['message']}"
    ]
    assert not [d for d in docs.values() if d["status"] == "unresponsive" and d["domain"] != hung]
    assert "Traceback" not in proc.stderr

    # QEMU moves again: the next run is all ok.
    proc = vbs("stats", "--timeout", str(TIMEOUT), "--format", "json", *four_guests)
    assert proc.returncode == 0, proc.stderr
    assert {d["domain"]: d["status"] for d in json.loads(proc.stdout)} == {n: "ok" for n in four_guests}


def test_check_all_is_critical_for_a_stopped_qemu_and_ends_on_time(four_guests):
    hung = four_guests[1]
    with stopped(hung):
        began = time.monotonic()
        proc = vbs("check", "--all", "--timeout", str(TIMEOUT), timeout=60)
        took = time.monotonic() - began
    assert took < TIMEOUT + STARTUP_SLACK, f"took {took:.1f} s"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first, *details = proc.stdout.splitlines()
    assert first.startswith("BALLOON CRITICAL - "), first
    assert f"{hung} unresponsive" in first
    assert [d for d in details if d.startswith(f"CRITICAL: {hung}: ")] == [
        f"CRITICAL: {hung}: unresponsive: QEMU did not answer within {TIMEOUT} s; it may be hung or stopped"
    ]
    for name in four_guests:
        if name != hung:
            assert any(line.startswith(f"OK: {name}: ok: ") for line in details), details

    proc = vbs("check", "--timeout", str(TIMEOUT), *four_guests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("BALLOON OK - ")


def test_long_running_collector_keeps_its_pace_with_one_qemu_stopped(four_guests):
    """At most one outstanding call for the hung domain: thread count stays put, cycles stay short."""
    hung = four_guests[2]
    workers = 4
    with Collector([URI], domains=four_guests, events=True, workers=workers, timeout=2) as collector:
        assert set(by_name(collector.collect()).values()) == {"ok"}
        with stopped(hung):
            cycles = [collector.collect() for _ in range(5)]
            threads = collector.threads
        for cycle in cycles:
            assert cycle.duration < 2 + 1.0, cycle.duration
            statuses = by_name(cycle)
            assert statuses.pop(hung) == "unresponsive"
            assert set(statuses.values()) == {"ok"}
        # The first cycle waited for the hung domain; the later ones did not ask it again.
        assert all(c.duration < 1.0 for c in cycles[1:]), [c.duration for c in cycles]
        hung_sample = next(s for s in cycles[-1].samples if s.domain == hung)
        assert isinstance(hung_sample.error, QEMUUnresponsive)
        assert "not asked again until it answers" in hung_sample.message
        assert threads <= workers + 1, threads

        # SIGCONT: the stuck call returns and the domain is read again, with no restart of anything.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if by_name(collector.collect()).get(hung) == "ok":
                break
            time.sleep(0.5)
        assert by_name(collector.last)[hung] == "ok"


# -- steady state ---------------------------------------------------------------------------


def test_steady_cycles_make_one_qmp_call_per_domain_and_no_xml_or_state(four_guests, conn):
    with Collector([URI], domains=four_guests, events=True) as collector:
        first = collector.collect()
        assert first.calls.get("XMLDesc") == len(four_guests)
        cycles = []
        for _ in range(5):
            time.sleep(0.5)
            cycles.append(collector.collect())
    for cycle in cycles:
        assert set(by_name(cycle).values()) == {"ok"}
        assert cycle.calls.get("XMLDesc", 0) == 0 and cycle.calls.get("state", 0) == 0, cycle.calls
        assert cycle.calls.get("domainListGetStats") == 1, cycle.calls
        assert "listAllDomains" not in cycle.calls and "lookupByName" not in cycle.calls
    monitor = sum(c.calls.get("qemuMonitorCommand", 0) for c in cycles)
    per_domain = monitor / (len(cycles) * len(four_guests))
    assert per_domain <= 1.1, [dict(c.calls) for c in cycles]
    # The one re-read the collector keeps: memoryStats() of a domain whose
    # guest answered between the QMP read and the bulk call.
    re_reads = sum(c.calls.get("memoryStats", 0) for c in cycles)
    assert re_reads <= len(cycles) * len(four_guests) // 4, re_reads


# -- churn -------------------------------------------------------------------------------------


def test_domains_come_and_go_under_a_running_collector(conn, domains):
    """Started: in the next cycle; destroyed: gone without an error; restarted: resolved again."""
    first, second = create_many(domains, 2, "noos", "churn", wait=False)

    def mine(cycle: Cycle) -> Dict[str, Sample]:
        return {s.domain: s for s in cycle.samples if s.domain.startswith("vbs-tb-churn")}

    with Collector([URI], events=True, timeout=5) as collector:
        cycle = collector.collect()
        assert set(mine(cycle)) == {first, second}
        old_id = mine(cycle)[first].id

        third = domains.create("noos", "churn2")
        time.sleep(1.5)  # libvirt delivers the lifecycle event within about a second
        cycle = collector.collect()
        assert set(mine(cycle)) == {first, second, third}
        assert not cycle.problems

        subprocess.run(["virsh", "-c", URI, "destroy", second], check=True, capture_output=True)
        time.sleep(1.5)
        cycle = collector.collect()
        assert set(mine(cycle)) == {first, third}
        assert not cycle.problems and all(s.error is None for s in mine(cycle).values())

        # Same name, new incarnation: destroy and create again under the same name.
        subprocess.run(["virsh", "-c", URI, "destroy", first], check=True, capture_output=True)
        domains.create("noos", "churn", name=first)
        time.sleep(1.5)
        cycle = collector.collect()
        assert set(mine(cycle)) == {first, third}
        again = mine(cycle)[first]
        assert again.id != old_id and again.id == int(virsh("domid", first).strip())
        assert again.status is Status.NEVER_UPDATED and again.error is None


# -- the interval changed behind the collector's back ---------------------------------------


def _wait_status(collector: Collector, name: str, status: str, interval: int, within: float) -> float:
    """Cycle every 0.5 s until ``name`` has ``status`` with QEMU interval ``interval``; return when."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        sample = next(s for s in collector.collect().samples if s.domain == name)
        if sample.status.value == status and sample.polling.qemu_interval == interval:
            return time.monotonic() - began
        time.sleep(0.5)
    last = next(s for s in collector.last.samples if s.domain == name)  # type: ignore[union-attr]
    pytest.fail(
        f"{name}: still {last.status.value} with interval {last.polling.qemu_interval} after {within} s "
        f"(wanted {status} with {interval})"
    )


def test_interval_changed_behind_the_collectors_back_is_noticed(domains):
    name = domains.create("virtio", "behind", wait_stats=True)
    path = qom_path_by_alias(name)

    def qom_set(value: int) -> None:
        qmp(name, "qom-set", path=path, property="guest-stats-polling-interval", value=value)

    grace = 5
    with Collector([URI], domains=[name], events=True, grace=grace) as collector:
        assert _wait_status(collector, name, "ok", 2, 5) < 1
        # Lengthened 2 -> 30: fresh figures look stale under the cached 2 s, which
        # makes the collector read the interval again; the status stays ok.
        qom_set(30)
        statuses = set()
        began = time.monotonic()
        while time.monotonic() - began < 2 * 2 + grace + 3:
            sample = collector.collect().samples[0]
            statuses.add(sample.status.value)
            if sample.polling.qemu_interval == 30:
                break
            time.sleep(0.5)
        assert collector.last is not None and collector.last.samples[0].polling.qemu_interval == 30
        assert statuses <= {"ok"}, statuses
        # Shortened 30 -> 2: last-update moves faster than 30 s allows.
        qom_set(2)
        _wait_status(collector, name, "ok", 2, 10)
        # Disabled: figures stop; polling_disabled, not stale, within 2 x 2 + grace + a cycle.
        qom_set(0)
        assert _wait_status(collector, name, "polling_disabled", 0, 2 * 2 + grace + 3) > 0

"""The collector against real libvirtd and QEMU: hung QEMU, domain churn, call counts, interval changes.

Faults are real: a QEMU process stopped with SIGSTOP (what a hung QEMU looks
like to libvirt), domains created and destroyed under a running collector,
and the polling interval changed through QMP behind the collector's back.
Every fault is undone in a ``finally``, even when the test fails. Expected
figures come from ``virsh``, never from the package itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from typing import Dict, Iterator, List

import pytest

from tests.integration.conftest import QEMU_RUN_DIR, URI, create_many, wait_for
from tests.integration.conftest import testbed as run_testbed
from tests.integration.test_cli import CLI, WATCH_HEADER, dommemstat, qmp, qom_path_by_alias, vbs, virsh
from virt_balloon_stats.collector import LOST_CONNECTION, Collector, Cycle
from virt_balloon_stats.errors import QEMUUnresponsive
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import Status, has_libvirt_name

#: Deadline given to one-shot commands in these tests, and the slack allowed
#: for the process to start (imports) and exit.
TIMEOUT = 5
STARTUP_SLACK = 3.0


def qemu_pid(name: str) -> int:
    """The QEMU process of a running domain, from libvirt's pid file."""
    return int((QEMU_RUN_DIR / f"{name}.pid").read_text().strip())


@contextlib.contextmanager
def stopped(name: str) -> Iterator[int]:
    """SIGSTOP the domain's QEMU for the block; SIGCONT it whatever happens."""
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


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
    others = {d["domain"]: (d["status"], d["message"]) for d in docs.values() if d["domain"] != hung}
    late = {name: message for name, (status, message) in others.items() if status == "unresponsive"}
    assert not late, (late, proc.stderr)
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


def test_one_stopped_domain_alone_is_unresponsive_on_time(four_guests):
    """One domain on its own is read without a collector, within the same deadline, with the same verdicts."""
    hung = four_guests[2]
    with stopped(hung):
        began = time.monotonic()
        stats = vbs("stats", "--timeout", str(TIMEOUT), "--format", "json", hung, timeout=60)
        took_stats = time.monotonic() - began
        began = time.monotonic()
        check = vbs("check", "--timeout", str(TIMEOUT), hung, timeout=60)
        took_check = time.monotonic() - began
    message = f"QEMU did not answer within {TIMEOUT} s; it may be hung or stopped"
    assert took_stats < TIMEOUT + STARTUP_SLACK, f"took {took_stats:.1f} s"
    assert stats.returncode == 1, stats.stderr
    (doc,) = json.loads(stats.stdout)
    assert (doc["domain"], doc["status"], doc["message"], doc["stats"]) == (hung, "unresponsive", message, {})
    assert doc["uuid"] == virsh("domuuid", hung).strip()
    assert stats.stderr.splitlines() == [f"{hung}: {message}"]
    assert took_check < TIMEOUT + STARTUP_SLACK, f"took {took_check:.1f} s"
    assert check.returncode == 2, check.stdout + check.stderr
    assert f"CRITICAL: {hung}: unresponsive: {message}" in check.stdout.splitlines()

    # QEMU moves again: the same command reads it.
    proc = vbs("stats", "--timeout", str(TIMEOUT), "--format", "json", hung)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["status"] == "ok"


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


def _qemu_only(s: Sample) -> bool:
    """Whether QEMU names figures libvirt has no name for (QEMU 10 names six)."""
    values = s.stats.values if s.stats is not None else {}
    return not all(has_libvirt_name(n) for n in values)


def test_steady_cycles_read_qemu_in_turns_and_no_xml_or_state(four_guests, conn):
    """Each domain is compared one cycle in four; between its turns a settled domain is read from
    libvirt's bulk figures alone, and QEMU through its monitor only when QEMU names figures
    libvirt has no name for."""
    with Collector([URI], domains=four_guests, events=True) as collector:
        first = collector.collect()
        assert first.calls.get("XMLDesc") == len(four_guests)
        cycles = []
        for _ in range(5):
            time.sleep(0.5)
            cycles.append(collector.collect())
    qemu_only = {s.domain: _qemu_only(s) for s in first.samples}
    for cycle in cycles:
        assert set(by_name(cycle).values()) == {"ok"}
        assert cycle.calls.get("XMLDesc", 0) == 0 and cycle.calls.get("state", 0) == 0, cycle.calls
        # One call with libvirt's figures (and, while some domain reads QEMU between its turns,
        # one with the others' state).
        assert cycle.calls.get("domainListGetStats") in (1, 2), cycle.calls
        assert "listAllDomains" not in cycle.calls and "lookupByName" not in cycle.calls
        for s in cycle.samples:
            # Compared (to a verdict, or inconclusive when the guest answered between the two
            # reads), or not this turn, and then never called "agree".
            assert s.crosscheck.result.value in ("agree", "inconclusive", "skipped"), s.crosscheck
            if s.crosscheck.result.value == "skipped":
                assert s.crosscheck.checked == 0
                assert s.crosscheck.previous is not None and not s.crosscheck.previous.mismatches
                # libvirt's figures stand in for QEMU's, unless QEMU has some libvirt cannot say.
                assert (s.libvirt is None) is qemu_only[s.domain], (s.domain, s.libvirt)
    compared = {name: 0 for name in four_guests}
    for cycle in cycles:
        for s in cycle.samples:
            compared[s.domain] += s.crosscheck.result.value != "skipped"
    # Five cycles, one in four compared: every domain at least once, none every time.
    assert all(1 <= n <= 4 for n in compared.values()), compared
    monitor = sum(c.calls.get("qemuMonitorCommand", 0) for c in cycles)
    # QEMU read in a domain's turns (a re-read when the guest answered between the two reads),
    # and every cycle for a domain whose figures libvirt cannot all say.
    every_cycle = len(cycles) * sum(qemu_only.values())
    turns = sum(n for name, n in compared.items() if not qemu_only[name])
    assert monitor <= every_cycle + 2 * turns, [dict(c.calls) for c in cycles]
    if not any(qemu_only.values()):
        assert monitor < len(cycles) * len(four_guests) / 2, [dict(c.calls) for c in cycles]
    # The one re-read the collector keeps: memoryStats() of a domain whose
    # guest answered between the QMP read and the bulk call.
    re_reads = sum(c.calls.get("memoryStats", 0) for c in cycles)
    assert re_reads <= len(cycles) * len(four_guests) // 4, re_reads


def test_between_its_turns_a_domains_balloon_size_is_libvirts_after_a_setmem(four_guests):
    """Between its turns the size is libvirt's, after ``virsh setmem`` what ``dommemstat`` says:
    from the bulk call with the rest of libvirt's figures, or, for a domain read from QEMU every
    cycle (QEMU names figures libvirt has no name for), from libvirt's BALLOON_CHANGE events,
    with no ``query-balloon``."""
    guest = four_guests[0]
    before = dommemstat(guest)["actual"]
    target = before - 32 * 1024
    with Collector([URI], domains=[guest], events=True, crosscheck_every=1000) as collector:
        # The first reading compares, and so does the next (its turn, at phase 0); then none.
        for _ in range(2):
            first = collector.collect().samples[0]
            assert first.crosscheck.result.value in ("agree", "inconclusive")
        try:
            virsh("setmem", guest, f"{target}K", "--live")
            wait_for(lambda: dommemstat(guest)["actual"] == target, timeout=60, what="the balloon to settle")
            time.sleep(1.0)  # the last BALLOON_CHANGE event on its way
            cycle = collector.collect()
            [s] = cycle.samples
            assert s.crosscheck.result.value == "skipped", s.crosscheck
            assert s.actual_bytes == target * 1024 == dommemstat(guest)["actual"] * 1024
            # guest-stats only, or nothing through QEMU's monitor.
            assert cycle.calls.get("qemuMonitorCommand", 0) == int(_qemu_only(first)), cycle.calls
        finally:
            virsh("setmem", guest, f"{before}K", "--live")
            wait_for(lambda: dommemstat(guest)["actual"] == before, timeout=60, what="the balloon back")


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


# -- libvirtd restarted ---------------------------------------------------------------------------


@contextlib.contextmanager
def libvirtd_stopped() -> Iterator[None]:
    """Stop libvirtd (its QEMUs keep running); start it again whatever happens."""
    run_testbed("libvirtd-stop")
    try:
        yield
    finally:
        run_testbed("libvirtd-start")


def test_collector_survives_a_libvirtd_restart(four_guests):
    guest = four_guests[0]
    interval = 2.0
    cycles: List[Cycle] = []
    collector = Collector([URI], domains=[guest], events=True)
    collector.start(interval, cycles.append)
    try:
        wait_for(lambda: bool(cycles) and by_name(cycles[-1]) == {guest: "ok"}, timeout=10, what="ok")
        with libvirtd_stopped():
            wait_for(lambda: not cycles[-1].hosts[URI].up, timeout=3 * interval + 3, what="the loss")
            down = cycles[-1]
            assert down.hosts[URI].message.startswith(LOST_CONNECTION)
            [sample] = down.samples
            assert (sample.domain, sample.status) == (guest, Status.UNREACHABLE)
            assert sample.message == LOST_CONNECTION
            time.sleep(interval * 2)  # a few cycles with libvirtd away
            assert all(not c.hosts[URI].up for c in cycles[-2:])
        answering = time.time()
        wait_for(
            lambda: cycles[-1].hosts[URI].up and cycles[-1].samples[0].status is Status.OK,
            timeout=2 * interval + 1,
            what="fresh figures within two intervals of libvirtd answering",
        )
        fresh = cycles[-1].samples[0]
        assert fresh.sampled_at >= answering
        assert dommemstat(guest)["last_update"] >= (fresh.last_update or 0) - 2 * 2
    finally:
        collector.stop()
    assert not any("Traceback" in s.message for c in cycles for s in c.samples)


def test_watch_shows_a_libvirtd_restart_and_recovers(four_guests):
    guest = four_guests[1]
    interval = 2
    proc = subprocess.Popen(
        [CLI, "watch", "--interval", str(interval), "--count", "9", guest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        blocks: List[str] = []
        current: List[str] = []
        restarted = False
        for line in proc.stdout:
            if line.startswith(WATCH_HEADER) and current:
                blocks.append("".join(current))
                current = []
            current.append(line)
            if len(blocks) == 2 and not restarted:
                restarted = True
                with libvirtd_stopped():
                    time.sleep(2.5 * interval)
        blocks.append("".join(current))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    rows = [_row(block, guest) for block in blocks]
    statuses = [row[1] for row in rows]
    assert statuses[0] == "ok" and statuses[-1] == "ok", statuses
    lost = [i for i, s in enumerate(statuses) if s == "unreachable"]
    assert lost, statuses
    for i in lost:
        assert f"{URI}: {LOST_CONNECTION}" in blocks[i], blocks[i]
        assert rows[i][6:10] == ["-", "-", "-", "-"], rows[i]  # no rate without figures
    # Fresh again within two frames of libvirtd answering, and from then on.
    assert "ok" in statuses[lost[-1] + 1:lost[-1] + 3], statuses
    assert len(lost) == lost[-1] - lost[0] + 1, statuses  # one outage, no flapping


def _row(block: str, name: str) -> List[str]:
    """The watch row of ``name`` in one block, split on runs of two or more spaces."""
    line = next(line for line in block.splitlines() if line.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())

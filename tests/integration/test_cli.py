"""The installed ``virt-balloon-stats`` command against real libvirt, QEMU and guests.

Every test runs the console script as a subprocess, the way a user or a
monitoring system does, and checks what it prints and how it exits. The
expected figures come from ``virsh`` in the same test (``dommemstat``,
``dumpxml``, ``qemu-monitor-command``), never from the package itself.
Shared guests are only read; a test that changes a domain creates its own.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ci import unavailable
from tests.integration.conftest import STACK, TCP_URI, URI, wait_for
from virt_balloon_stats.cli.control import DEFAULT_ENABLE_PERIOD

CLI = shutil.which("virt-balloon-stats") or str(Path(sys.executable).parent / "virt-balloon-stats")
COMMANDS = ("stats", "period", "enable", "disable", "path", "check", "watch", "rearm")
MISSING = "nosuchdomain-vbs-tb-x"
WATCH_HEADER = "virt-balloon-stats watch"
ENTER_SCREEN, LEAVE_SCREEN = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"

#: Documented keys of one ``stats --format json`` object (README, "The JSON document").
JSON_KEYS = {
    "domain", "uuid", "id", "state", "source", "qom_path", "qom_type", "polling_interval",
    "libvirt_period", "last_update", "age", "status", "message", "actual", "stats", "libvirt",
    "crosscheck",
}

#: Added by QEMU 9.2, filled by a Linux 6.12 guest, mapped by no libvirt release.
QEMU_9_2_STATS = (
    "stat-oom-kills", "stat-alloc-stalls", "stat-async-scans",
    "stat-direct-scans", "stat-async-reclaims", "stat-direct-reclaims",
)
#: The memory figures whose libvirt value is QEMU's bytes // 1024.
KIB_FIGURES = {
    "stat-free-memory": "unused",
    "stat-total-memory": "available",
    "stat-available-memory": "usable",
}


# -- helpers ------------------------------------------------------------------


def vbs(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the installed console script."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def virsh(*args: str, uri: str = URI) -> str:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def dommemstat(name: str) -> Dict[str, int]:
    """``virsh dommemstat``: libvirt's memoryStats() as ``key value`` lines."""
    out = {}
    for line in virsh("dommemstat", name).splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = int(value)
    return out


def memballoon(name: str) -> ET.Element:
    element = ET.fromstring(virsh("dumpxml", name)).find("./devices/memballoon")
    assert element is not None, f"{name} has no <memballoon>"
    return element


def libvirt_period(name: str) -> Optional[int]:
    """``<memballoon><stats period>`` from libvirt's live XML; ``None`` when absent."""
    stats = memballoon(name).find("./stats")
    period = None if stats is None else stats.get("period")
    return None if period is None else int(period)


def qom_path_by_alias(name: str) -> str:
    alias = memballoon(name).find("./alias")
    assert alias is not None
    return f"/machine/peripheral/{alias.get('name')}"


def qmp(name: str, command: str, **arguments: Any) -> Any:
    """One QMP command through ``virsh qemu-monitor-command``; its ``return`` value."""
    command_json = json.dumps({"execute": command, "arguments": arguments})
    reply = json.loads(virsh("qemu-monitor-command", name, command_json))
    assert "return" in reply, reply
    return reply["return"]


def qemu_interval(name: str) -> int:
    return int(qmp(name, "qom-get", path=qom_path_by_alias(name), property="guest-stats-polling-interval"))


def age_seconds(name: str) -> float:
    last = dommemstat(name).get("last_update", 0)
    return time.time() - last if last else 0.0


def stderr_lines(proc: subprocess.CompletedProcess) -> List[str]:
    return proc.stderr.splitlines()


def assert_one_error_line(proc: subprocess.CompletedProcess, what: str) -> str:
    """Exactly one stderr line, ``WHAT: ...``, and no traceback."""
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{what}: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def json_of(proc: subprocess.CompletedProcess) -> List[Dict[str, Any]]:
    assert proc.stdout.strip(), proc.stderr
    doc = json.loads(proc.stdout)
    assert isinstance(doc, list)
    return doc


def same_update(
    read: Callable[[], Tuple[Optional[int], Dict[str, int]]], attempts: int = 6
) -> Dict[str, int]:
    """Retry ``read`` (our last_update, virsh's dommemstat) until both saw the same guest update.

    The guest answers every couple of seconds, so two reads a few ms apart
    straddle an update now and then; values are compared only for one update.
    """
    seen = []
    for _ in range(attempts):
        ours, theirs = read()
        if ours is not None and ours == theirs.get("last_update"):
            return theirs
        seen.append((ours, theirs.get("last_update")))
        time.sleep(0.7)
    pytest.fail(f"never read the same guest update twice: {seen}", pytrace=False)


def table_row(text: str, first: str) -> List[str]:
    """The cells (split on two or more spaces) of the table row that starts with ``first``."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


@pytest.fixture(scope="session", autouse=True)
def _installed_cli() -> None:
    assert os.access(CLI, os.X_OK), f"console script not installed: {CLI} (pip install -e .)"


@pytest.fixture(scope="module")
def tcp_uri(libvirt_conn: Any) -> str:
    """The testbed daemon over TCP (``vbs-testbed up --tcp``): fail under CI, else skip."""
    proc = subprocess.run(["virsh", "-c", TCP_URI, "uri"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        unavailable(
            f"{TCP_URI} does not answer ({proc.stderr.strip()}); run: contrib/testbed/vbs-testbed up --tcp"
        )
    return TCP_URI


# -- the command itself ----------------------------------------------------------


def test_version_is_the_installed_distribution():
    proc = vbs("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"virt-balloon-stats {importlib.metadata.version('virt_balloon_stats')}\n"


def test_python_dash_m_help_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "virt_balloon_stats", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: virt-balloon-stats")
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.M), f"{command} missing from --help"


@pytest.mark.parametrize(
    "args, message",
    [
        (["stats"], "name at least one domain, or use --all"),
        (["check"], "name at least one domain, or use --all"),
        (["stats", "--all", MISSING], "give domains or --all, not both"),
        (["path", "--format", "prometheus", MISSING], "--format prometheus applies to 'stats' and 'advise'"),
        (["check", "--format", "json", MISSING], "--format does not apply"),
        (["check", "--max-age", "0", MISSING], "argument --max-age"),
        (["watch", "--interval", "0", MISSING], "argument --interval"),
    ],
    ids=["no-domain", "check-no-domain", "all-and-domain", "prometheus-path", "check-json", "max-age-0",
         "interval-0"],
)
def test_usage_errors_exit_2(args, message):
    proc = vbs(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "usage: virt-balloon-stats" in proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# -- stats ----------------------------------------------------------------------------


def test_stats_json_matches_virsh_dommemstat(driver_guest):
    first: Dict[str, Any] = {}

    def read():
        proc = vbs("stats", "--format", "json", driver_guest)
        assert proc.returncode == 0, proc.stderr
        docs = json_of(proc)
        assert len(docs) == 1  # a list even for one domain
        first.update(docs[0])
        theirs = dommemstat(driver_guest)
        assert set(docs[0]["libvirt"]) == set(theirs)  # the keys, whatever the timing
        return docs[0]["last_update"], theirs

    theirs = same_update(read)
    doc = first
    assert JSON_KEYS <= set(doc), JSON_KEYS - set(doc)
    assert {"result", "checked", "mismatches"} <= set(doc["crosscheck"])
    assert doc["domain"] == driver_guest
    assert doc["uuid"] == virsh("domuuid", driver_guest).strip()
    assert doc["id"] == int(virsh("domid", driver_guest).strip())
    assert doc["state"] == "running" and doc["source"] == "both" and doc["status"] == "ok"
    assert doc["qom_path"] == qom_path_by_alias(driver_guest)
    assert doc["libvirt_period"] == libvirt_period(driver_guest) == doc["polling_interval"]
    # rss is the QEMU process's host memory, read from /proc at each call: it moves on its own.
    assert {k: v for k, v in doc["libvirt"].items() if k != "rss"} == {
        k: v for k, v in theirs.items() if k != "rss"
    }
    for qemu_name, libvirt_name in KIB_FIGURES.items():
        assert doc["stats"][qemu_name] // 1024 == theirs[libvirt_name], qemu_name
    assert doc["actual"] // 1024 == theirs["actual"]
    assert doc["crosscheck"]["result"] == "agree" and doc["crosscheck"]["mismatches"] == []
    # Every figure libvirt has a name for, and actual; QEMU 9.2's six (the
    # next stack) have none, and are listed as QEMU's alone.
    mapped = [name for name in doc["stats"] if name not in QEMU_9_2_STATS]
    assert doc["crosscheck"]["checked"] == len(mapped) + 1
    assert doc["crosscheck"]["qmp_only"] == [name for name in QEMU_9_2_STATS if name in doc["stats"]]


def test_stats_json_has_every_figure_qemu_reports(driver_guest):
    """Each guest-stats member QEMU reports is in the JSON document with QEMU's value, at one last-update.

    On the next stack (QEMU 10 + a Linux 6.12 guest) that includes QEMU 9.2's
    six figures, as integers, though libvirt maps none of them; on QEMU 7.2
    QEMU reports none of them, and neither does the document.
    """
    path = qom_path_by_alias(driver_guest)
    for _ in range(6):
        doc = json_of(vbs("stats", "--format", "json", driver_guest))[0]
        direct = qmp(driver_guest, "qom-get", path=path, property="guest-stats")
        if doc["last_update"] == direct["last-update"]:
            break
        time.sleep(0.7)
    else:
        pytest.fail("never read the same guest update twice", pytrace=False)
    reported = {name: value for name, value in direct["stats"].items() if value not in (-1, 2**64 - 1)}
    assert {name: v for name, v in doc["stats"].items() if v is not None} == reported
    if STACK == "next":
        assert set(QEMU_9_2_STATS) <= set(reported), direct["stats"]
        assert all(type(doc["stats"][name]) is int for name in QEMU_9_2_STATS)
    else:
        assert not set(QEMU_9_2_STATS) & set(direct["stats"])


def test_stats_table_shows_libvirt_beside_qemu(driver_guest):
    out: Dict[str, str] = {}

    def read():
        proc = vbs("stats", "--bytes", driver_guest)
        assert proc.returncode == 0, proc.stderr
        out["text"] = proc.stdout
        stamp = re.search(r"Last update: (.+) UTC", proc.stdout)
        assert stamp, proc.stdout
        when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
        return int(when.replace(tzinfo=datetime.timezone.utc).timestamp()), dommemstat(driver_guest)

    theirs = same_update(read)
    text = out["text"]
    dom_id = virsh("domid", driver_guest).strip()
    assert text.splitlines()[0] == f"Domain: {driver_guest} (id {dom_id}, running)"
    assert re.search(r"^\s+Status:\s+ok: ", text, re.M)
    assert f"QOM path:    {qom_path_by_alias(driver_guest)} " in text
    for qemu_name, libvirt_name in KIB_FIGURES.items():
        cells = table_row(text, qemu_name)
        assert cells[2] == libvirt_name and cells[4] == "agree", cells
        assert int(cells[1]) // 1024 == theirs[libvirt_name], cells
        assert cells[3] == f"{theirs[libvirt_name]} KiB", cells


def _metrics(text: str) -> Dict[Tuple[str, str], float]:
    """Prometheus text format, read by prometheus_client's parser: (sample name, labels) -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[(sample.name, "{" + labels + "}")] = float(sample.value)
    return samples


def _value(metrics: Dict[Tuple[str, str], float], name: str, *labels: str) -> Optional[float]:
    found = [v for (n, lab), v in metrics.items() if n == name and all(x in lab for x in labels)]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_stats_prometheus(driver_guest, nodriver_guest):
    seen: Dict[str, Any] = {}

    def read():
        proc = vbs("stats", "--format", "prometheus", driver_guest, nodriver_guest)
        assert proc.returncode == 0, proc.stderr
        seen["metrics"] = metrics = _metrics(proc.stdout)
        last = _value(metrics, "virt_balloon_last_update_seconds", f'domain="{driver_guest}"')
        return None if last is None else int(last), dommemstat(driver_guest)

    theirs = same_update(read)
    metrics = seen["metrics"]
    drv, nodrv = f'domain="{driver_guest}"', f'domain="{nodriver_guest}"'
    assert _value(metrics, "virt_balloon_up", f'uri="{URI}"') == 1
    assert _value(metrics, "virt_balloon_status", drv, 'status="ok"') == 1
    assert _value(metrics, "virt_balloon_status", drv, 'status="stale"') == 0
    assert _value(metrics, "virt_balloon_status", nodrv, 'status="never_updated"') == 1
    assert _value(metrics, "virt_balloon_free_memory_bytes", drv) // 1024 == theirs["unused"]
    assert _value(metrics, "virt_balloon_actual_bytes", drv) // 1024 == theirs["actual"]
    # No driver: libvirt leaves the figures out, and so must the exporter (never a fake 0).
    assert "unused" not in dommemstat(nodriver_guest)
    assert _value(metrics, "virt_balloon_free_memory_bytes", nodrv) is None
    assert _value(metrics, "virt_balloon_last_update_seconds", nodrv) is None
    assert _value(metrics, "virt_balloon_actual_bytes", nodrv) // 1024 == dommemstat(nodriver_guest)["actual"]


def test_a_failing_domain_among_good_ones(driver_guest, nostats_guest):
    proc = vbs("stats", driver_guest, MISSING, nostats_guest)
    assert proc.returncode == 1
    assert_one_error_line(proc, MISSING)
    headers = re.findall(r"^Domain: (\S+) ", proc.stdout, re.M)
    assert headers == [driver_guest, nostats_guest]

    as_json = vbs("stats", "--format", "json", driver_guest, MISSING, nostats_guest)
    assert as_json.returncode == 1
    assert [d["domain"] for d in json_of(as_json)] == [driver_guest, nostats_guest]
    assert_one_error_line(as_json, MISSING)

    debug = vbs("--debug", "stats", driver_guest, MISSING, nostats_guest)
    assert debug.returncode == 1
    assert stderr_lines(debug)[0] == stderr_lines(proc)[0]
    assert "Traceback (most recent call last)" in debug.stderr
    assert re.findall(r"^Domain: (\S+) ", debug.stdout, re.M) == [driver_guest, nostats_guest]


def test_read_only_connection(driver_guest):
    doc: Dict[str, Any] = {}

    def read():
        proc = vbs("-r", "stats", "--source", "libvirt", "--format", "json", driver_guest)
        assert proc.returncode == 0, proc.stderr
        doc.update(json_of(proc)[0])
        return doc["last_update"], dommemstat(driver_guest)

    theirs = same_update(read)
    assert doc["source"] == "libvirt" and doc["status"] == "ok"
    assert doc["qom_path"] is None and doc["polling_interval"] is None  # QEMU was not asked
    assert doc["libvirt_period"] == libvirt_period(driver_guest)
    assert doc["crosscheck"]["result"] == "skipped"
    for qemu_name, libvirt_name in KIB_FIGURES.items():
        assert doc["stats"][qemu_name] == theirs[libvirt_name] * 1024

    after = vbs("stats", "-r", "--source", "libvirt", driver_guest)  # global options after the command
    assert after.returncode == 0 and after.stdout.startswith(f"Domain: {driver_guest} "), after.stderr

    for source in (["--source", "qmp"], [], ["--source", "both"]):
        refused = vbs("-r", "stats", *source, driver_guest)
        assert refused.returncode == 2, (source, refused.stderr)
        assert refused.stdout == ""
        assert "--source libvirt" in refused.stderr and "usage:" in refused.stderr


def test_read_only_error_advice_is_usable(driver_guest):
    """On a read-only connection ``path`` is refused up front; what it tells the user to do must work."""
    proc = vbs("-r", "path", driver_guest)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "drop -r" in proc.stderr and "usage:" in proc.stderr
    advised = vbs("path", driver_guest)
    assert advised.returncode == 0 and "/machine/peripheral/balloon0" in advised.stdout, advised.stderr


# -- several hosts ------------------------------------------------------------------


def test_connect_twice_labels_every_row(driver_guest, tcp_uri):
    table = vbs("-c", URI, "-c", tcp_uri, "stats", driver_guest)
    assert table.returncode == 0, table.stderr
    labels = re.findall(rf"^Domain: {re.escape(driver_guest)} \(.*\) on (\S+)$", table.stdout, re.M)
    assert labels == [URI, tcp_uri]

    docs = json_of(vbs("-c", URI, "-c", tcp_uri, "stats", "--format", "json", driver_guest))
    assert [d["uri"] for d in docs] == [URI, tcp_uri]
    assert {d["uuid"] for d in docs} == {virsh("domuuid", driver_guest, uri=tcp_uri).strip()}

    period = vbs("-c", URI, "-c", tcp_uri, "period", driver_guest)
    assert period.returncode == 0, period.stderr
    for uri in (URI, tcp_uri):
        assert table_row(period.stdout, f"{driver_guest}@{uri}")[1] == f"{libvirt_period(driver_guest)} s"


def test_connect_before_and_after_the_command_adds_up(driver_guest, tcp_uri):
    """``-c`` is repeatable and global options may follow the command: both hosts count."""
    proc = vbs("-c", URI, "stats", "--format", "json", "-c", tcp_uri, driver_guest)
    assert proc.returncode == 0, proc.stderr
    assert [d["uri"] for d in json_of(proc)] == [URI, tcp_uri]


# -- check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guest, code, state",
    [
        ("driver_guest", 0, "OK"),
        ("nodriver_guest", 1, "WARNING"),
        ("stale_guest", 2, "CRITICAL"),
        ("none_guest", 3, "UNKNOWN"),
    ],
)
def test_check_exit_codes(request, guest, code, state):
    name = request.getfixturevalue(guest)
    proc = vbs("check", name)
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"BALLOON {state} - "), lines[0]
    assert lines[1].startswith(f"{state}: {name}: "), lines[1]
    assert proc.stderr == ""


def test_check_is_unknown_when_a_domain_cannot_be_read(driver_guest):
    proc = vbs("check", driver_guest, MISSING)
    assert proc.returncode == 3
    assert proc.stdout.startswith("BALLOON UNKNOWN - ")
    assert f"OK: {driver_guest}: " in proc.stdout
    assert_one_error_line(proc, MISSING)


def test_check_max_age(domains):
    name = domains.create("virtio", "maxage", wait_stats=True)
    # A long interval re-arms QEMU's timer that far ahead: the figures stay
    # "ok" (2 x 60 s + grace) while their age grows past a few seconds.
    slow = libvirt_period(name) + 58
    assert vbs("period", name, str(slow)).returncode == 0
    assert qemu_interval(name) == slow
    assert vbs("check", name).returncode == 0
    wait_for(lambda: age_seconds(name) > 4, timeout=30, what="the figures to be 4 s old")
    age = age_seconds(name)

    young = vbs("check", "--max-age", f"{age + 600:.0f}", name)
    assert young.returncode == 0, young.stdout
    assert young.stdout.startswith("BALLOON OK - ")

    old = vbs("check", "--max-age", f"{age - 2:.1f}", name)
    assert old.returncode == 2, old.stdout
    assert old.stdout.startswith("BALLOON CRITICAL - ")
    assert f"{name} figures are" in old.stdout and "over --max-age" in old.stdout

    # Paused figures are frozen on purpose: --max-age does not make them CRITICAL.
    virsh("suspend", name)
    paused = vbs("check", "--max-age", f"{age - 2:.1f}", name)
    assert paused.returncode == 0, paused.stdout
    assert f"OK: {name}: paused: " in paused.stdout


# -- polling interval ----------------------------------------------------------------


def test_period_show_and_set_with_read_back(domains):
    name = domains.create("virtio", "period", wait_stats=True)
    start = libvirt_period(name)
    shown = json_of(vbs("period", "--format", "json", name))
    assert [(r["domain"], r["polling_interval"], r["libvirt_period"], r["drift"]) for r in shown] == [
        (name, qemu_interval(name), start, False)
    ]

    by_libvirt = start + 1
    proc = vbs("period", name, str(by_libvirt))
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, name) == [
        name, "libvirt", f"{start} s", f"{by_libvirt} s", f"{by_libvirt} s", "no"
    ]
    assert (libvirt_period(name), qemu_interval(name)) == (by_libvirt, by_libvirt)

    by_qmp = by_libvirt + 1
    proc = vbs("period", "--format", "json", "--via", "qmp", "--set", str(by_qmp), name)
    assert proc.returncode == 0, proc.stderr
    row = json_of(proc)[0]
    assert (row["via"], row["changed_from"], row["polling_interval"]) == ("qmp", by_libvirt, by_qmp)
    assert row["libvirt_period"] == by_libvirt and row["drift"] is True
    # qom-set behind libvirt's back: QEMU moved, libvirt's XML did not.
    assert (libvirt_period(name), qemu_interval(name)) == (by_libvirt, by_qmp)

    proc = vbs("period", name)
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, name) == [name, f"{by_qmp} s", f"{by_libvirt} s", "yes"]
    assert re.search(rf"^{re.escape(name)}: .*drift", proc.stdout, re.M)


@pytest.mark.parametrize(
    "args",
    [
        ["period", "--set", "-1"],
        ["period", "--set", "1.5"],
        ["period", "-1"],
        ["period", "1.5"],
        ["enable", "--period", "-1"],
        ["enable", "--period", "1.5"],
    ],
    ids=["set-negative", "set-fraction", "negative", "fraction", "enable-negative", "enable-fraction"],
)
def test_bad_seconds_is_a_usage_error_and_changes_nothing(driver_guest, args):
    before = (libvirt_period(driver_guest), qemu_interval(driver_guest))
    # The domain goes right after the command word: "period DOMAIN SECONDS", "enable DOMAIN --period N".
    proc = vbs(args[0], driver_guest, *args[1:])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "seconds" in proc.stderr and "Traceback" not in proc.stderr
    assert (libvirt_period(driver_guest), qemu_interval(driver_guest)) == before


def test_enable_disable_and_rearm_force(domains):
    name = domains.create("virtio", "enable", wait_stats=True)
    start = qemu_interval(name)
    chosen = start + 5
    proc = vbs("enable", "--period", str(chosen), name)
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, name)[1:4] == ["libvirt", f"{start} s", f"{chosen} s"]
    assert (libvirt_period(name), qemu_interval(name)) == (chosen, chosen)

    proc = vbs("disable", "--format", "json", name)
    assert proc.returncode == 0, proc.stderr
    row = json_of(proc)[0]
    assert (row["changed_from"], row["polling_interval"], row["drift"]) == (chosen, 0, False)
    assert qemu_interval(name) == 0 and row["libvirt_period"] == libvirt_period(name)
    assert json_of(vbs("stats", "--format", "json", name))[0]["status"] == "polling_disabled"

    refused = vbs("rearm", "--force", name)  # no timer to re-arm
    assert refused.returncode == 1
    assert "polling is disabled" in assert_one_error_line(refused, name)
    assert qemu_interval(name) == 0

    proc = vbs("enable", name)
    assert proc.returncode == 0, proc.stderr
    assert (libvirt_period(name), qemu_interval(name)) == (DEFAULT_ENABLE_PERIOD, DEFAULT_ENABLE_PERIOD)

    before = dommemstat(name)["last_update"]
    proc = vbs("rearm", "--force", "--format", "json", name)
    assert proc.returncode == 0, proc.stderr
    entry = json_of(proc)[0]
    assert entry["rearmed"] is True and entry["status_before"] == "ok" and entry["status_after"] == "ok"
    assert entry["last_update_before"] >= before
    assert entry["last_update_after"] > entry["last_update_before"]
    assert entry["last_update_after"] <= dommemstat(name)["last_update"]
    assert "the guest answered again" in entry["message"]


# -- path -------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", ["driver_guest", "transitional_guest"])
def test_path(request, guest):
    name = request.getfixturevalue(guest)
    expected = qom_path_by_alias(name)
    parent, _, child = expected.rpartition("/")
    listing = {p["name"]: p["type"] for p in qmp(name, "qom-list", path=parent)}
    qom_type = re.fullmatch(r"child<(.+)>", listing[child]).group(1)

    proc = vbs("path", name)
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, name) == [name, expected, qom_type, "alias"]

    proc = vbs("path", "--format", "json", name)
    assert proc.returncode == 0, proc.stderr
    rows = json_of(proc)
    assert [(r["domain"], r["qom_path"], r["qom_type"], r["method"]) for r in rows] == [
        (name, expected, qom_type, "alias")
    ]
    assert rows[0]["uuid"] == virsh("domuuid", name).strip()


def test_path_without_a_balloon(none_guest):
    assert memballoon(none_guest).get("model") == "none"
    proc = vbs("path", none_guest)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "no balloon" in assert_one_error_line(proc, none_guest)


# -- watch -------------------------------------------------------------------------------


def _read_pty(fd: int, until: Callable[[str], bool], timeout: float, buf: List[str]) -> None:
    """Append what the terminal shows to ``buf`` until ``until(text)`` or EOF or the timeout."""
    deadline = time.monotonic() + timeout
    while not until("".join(buf)) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return
        if not chunk:
            return
        buf.append(chunk.decode("utf-8", "replace"))


def _wait_exit(pid: int, timeout: float) -> Optional[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def test_watch_in_a_terminal_quits_cleanly_on_ctrl_c(driver_guest):
    env = dict(os.environ, TERM="xterm")
    argv = [CLI, "watch", "--interval", "1", driver_guest]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        try:
            os.execve(CLI, argv, env)
        finally:
            os._exit(127)
    buf: List[str] = []
    code: Optional[int] = None
    try:
        _read_pty(fd, lambda text: text.count(WATCH_HEADER) >= 3, 30, buf)
        assert "".join(buf).count(WATCH_HEADER) >= 3, "".join(buf)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground group
        _read_pty(fd, lambda text: False, 10, buf)  # until the child closes the terminal
        code = _wait_exit(pid, 10)
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    screen = "".join(buf)
    assert code == 0, screen[-500:]
    assert screen.startswith(ENTER_SCREEN)
    assert screen.endswith(LEAVE_SCREEN), repr(screen[-80:])
    assert re.search(rf"^{re.escape(driver_guest)}\s+ok\s", screen, re.M)
    assert "Traceback" not in screen


def test_watch_piped_prints_plain_blocks(driver_guest):
    proc = vbs("watch", "--count", "2", "--interval", "1", driver_guest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(WATCH_HEADER) == 2
    assert "\x1b" not in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(driver_guest + " ")]
    assert len(rows) == 2 and all(re.split(r"\s{2,}", r)[1] == "ok" for r in rows)


# -- rearm ---------------------------------------------------------------------------------


def test_rearm_a_stale_guest_that_does_not_answer(stale_guest):
    before = dommemstat(stale_guest)["last_update"]
    proc = vbs("rearm", stale_guest)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    interval = qemu_interval(stale_guest)
    assert lines[0].startswith(f"{stale_guest}: stale -> stale: re-armed the {interval} s timer"), lines[0]
    assert "not responding" in lines[0]
    assert dommemstat(stale_guest)["last_update"] == before


def test_rearm_an_ok_guest_has_nothing_to_do(driver_guest):
    proc = vbs("rearm", driver_guest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{driver_guest}: ok") and proc.stdout.count("\n") == 1, proc.stdout
    assert "nothing to re-arm" in proc.stdout

    proc = vbs("rearm", "--format", "json", driver_guest)
    assert proc.returncode == 0, proc.stderr
    entry = json_of(proc)[0]
    assert (entry["domain"], entry["status_before"], entry["rearmed"], entry["status_after"]) == (
        driver_guest, "ok", False, None
    )
    assert entry["uuid"] == virsh("domuuid", driver_guest).strip()

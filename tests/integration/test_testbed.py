"""The testbed itself tells the truth: raw libvirt calls, none of our code.

These prove the ground the rest stands on: a guest whose balloon driver
answers, one without a driver, one without a balloon, as libvirt and QEMU
report them with nothing of virt_balloon_stats in between.
"""

from __future__ import annotations

import json
import subprocess

import libvirt
import libvirt_qemu

from tests.integration.conftest import URI, wait_for

UNSUPPORTED = 2**64 - 1

# Figures libvirt reports in KiB, keyed by QEMU name (GROUND_TRUTH section 3).
KIB = {
    "stat-swap-in": "swap_in",
    "stat-swap-out": "swap_out",
    "stat-free-memory": "unused",
    "stat-total-memory": "available",
    "stat-available-memory": "usable",
    "stat-disk-caches": "disk_caches",
}
COUNTS = {
    "stat-major-faults": "major_fault",
    "stat-minor-faults": "minor_fault",
    "stat-htlb-pgalloc": "hugetlb_pgalloc",
    "stat-htlb-pgfail": "hugetlb_pgfail",
}


def _dommemstat(name: str) -> dict:
    out = subprocess.run(["virsh", "-c", URI, "dommemstat", name], capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines() if line.strip())}


def _qmp(dom: "libvirt.virDomain", cmd: dict) -> dict:
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0))


def test_driver_guest_reports_and_qmp_agrees_with_libvirt(conn, driver_guest):
    wait_for(
        lambda: _dommemstat(driver_guest).get("last_update", 0) > 0,
        timeout=30,
        what="virsh dommemstat to show a last_update",
    )
    dom = conn.lookupByName(driver_guest)
    for _ in range(5):  # the guest may answer between the two reads
        reply = _qmp(
            dom,
            {
                "execute": "qom-get",
                "arguments": {"path": "/machine/peripheral/balloon0", "property": "guest-stats"},
            },
        )
        libvirt_stats = dom.memoryStats()
        if reply["return"]["last-update"] == libvirt_stats["last_update"]:
            break
    stats = reply["return"]["stats"]
    assert reply["return"]["last-update"] == libvirt_stats["last_update"] > 0
    for qemu, key in KIB.items():
        assert stats[qemu] // 1024 == libvirt_stats[key], qemu
    for qemu, key in COUNTS.items():
        assert stats[qemu] == libvirt_stats[key], qemu
    assert stats["stat-total-memory"] > stats["stat-free-memory"] > 0


def test_nodriver_guest_reports_every_stat_unsupported(conn, nodriver_guest):
    dom = conn.lookupByName(nodriver_guest)
    reply = _qmp(
        dom,
        {
            "execute": "qom-get",
            "arguments": {"path": "/machine/peripheral/balloon0", "property": "guest-stats"},
        },
    )
    assert reply["return"]["last-update"] == 0
    assert set(reply["return"]["stats"].values()) == {UNSUPPORTED}
    assert reply["return"]["stats"].keys() >= set(KIB) | set(COUNTS)


def test_none_guest_has_no_balloon(conn, none_guest):
    dom = conn.lookupByName(none_guest)
    reply = _qmp(dom, {"execute": "query-balloon"})
    assert reply["error"]["class"] == "DeviceNotActive"
    assert set(dom.memoryStats()) == {"rss"}

"""What differs between the testbed's stacks, checked on the stack the run is against.

The same tests run on both stacks (``tox -e integration`` on Debian 12's
libvirt 9.0 + QEMU 7.2, ``tox -e integration-next`` on libvirt 11 + QEMU 10
with a Linux 6.12 guest); where QEMU behaves differently, the test says which
behaviour it expects on which stack:

* QEMU 9.2 and later report six more guest-stats figures, which a Linux 6.12
  guest fills and no libvirt release maps (test_cli checks them in JSON);
* QEMU 10.0 and later set ``last-update`` to 0 and every figure to
  "unsupported" when the machine resets; QEMU 7.2 keeps the last figures
  until the rebooted guest's driver answers with counters started afresh.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any, Dict, List, Optional

from tests.integration.conftest import STACK, wait_for
from tests.integration.test_cli import CLI, virsh
from tests.integration.test_exporter import exporter, status_of, value

#: Whether a reset clears the figures (QEMU 10.0 and later: the next stack).
RESET_CLEARS = STACK == "next"
#: Counters the exporter serves for every guest (and, on the next stack, QEMU 9.2's).
#: (The Linux driver reports the scans and reclaims in bytes, as it does swap traffic.)
COUNTERS = ["virt_balloon_minor_faults_total", "virt_balloon_major_faults_total"] + (
    [
        "virt_balloon_oom_kills_total", "virt_balloon_alloc_stalls_total",
        "virt_balloon_async_scans_bytes_total", "virt_balloon_direct_scans_bytes_total",
        "virt_balloon_async_reclaims_bytes_total", "virt_balloon_direct_reclaims_bytes_total",
    ]
    if STACK == "next" else []
)


def _counters(series: Any, domain: str) -> Dict[str, Optional[float]]:
    return {name: value(series, name, domain=domain) for name in COUNTERS}


def test_a_guest_reset_reads_as_the_stack_reports_it(domains):
    """``virsh reset`` of a guest under a running exporter, stream and watch.

    On QEMU 10 the guest is ``never_updated`` (no figures, no counters
    served) until its driver answers again, then ``ok``. On both stacks: no
    cross-check mismatch in any line, no negative rate in ``watch``, and no
    counter served with QEMU's "unsupported" value.
    """
    name = domains.create("virtio", "reset", wait_stats=True)
    with exporter("--interval", "1", name) as running:
        running.wait_ready()
        wait_for(lambda: status_of(running.scrape(), name) == "ok", timeout=30, what=f"{name} ok")
        stream = subprocess.Popen(
            [CLI, "stream", "--interval", "1", name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        watch = subprocess.Popen(
            [CLI, "watch", "--interval", "1", "--count", "25", name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            time.sleep(5)  # a few answers before the reset, so watch has rates to show
            reset_at = time.time()
            virsh("reset", name)
            scrapes: List[Dict[str, Any]] = []

            def back_to_ok() -> bool:
                series = running.scrape()
                scrapes.append({"status": status_of(series, name), "counters": _counters(series, name)})
                if not RESET_CLEARS:  # nothing to see but the rebooted guest's new figures
                    return time.time() - reset_at > 15
                cleared = any(s["status"] == "never_updated" for s in scrapes)
                return cleared and scrapes[-1]["status"] == "ok"

            wait_for(back_to_ok, timeout=60, step=0.5, what=f"{name} to answer again after the reset")
            time.sleep(2)
        finally:
            stream.terminate()
            lines, stream_err = stream.communicate(timeout=30)
            watched, watch_err = watch.communicate(timeout=60)
    docs = [json.loads(line) for line in lines.splitlines()]
    assert docs, stream_err
    assert not [doc["crosscheck"] for doc in docs if doc["crosscheck"]["result"] == "mismatch"]
    if RESET_CLEARS:
        cleared = [doc for doc in docs if doc["status"] == "never_updated"]
        assert cleared, [doc["status"] for doc in docs]
        assert all(doc["last_update"] is None for doc in cleared)
        assert all(v is None for doc in cleared for v in doc["stats"].values()), cleared
        assert docs[-1]["status"] == "ok" and docs[-1]["last_update"] > reset_at
        never = [s for s in scrapes if s["status"] == "never_updated"]
        assert never and all(v is None for s in never for v in s["counters"].values()), never
    ok = [s for s in scrapes if s["status"] == "ok"]
    assert ok and all(v is not None for v in ok[-1]["counters"].values()), ok[-1:]
    assert all(v is None or v < 2**63 for s in scrapes for v in s["counters"].values())
    assert watch.returncode == 0, watch_err
    negative = re.findall(r"(?<![\w.:-])-\d[\d.]*", watched)
    assert not negative, watched
    rows = _watch_rows(watched, name)
    assert [row for row in rows if row["MINFLT/s"] not in ("-", "0.0")], rows  # rates were shown
    if RESET_CLEARS:
        # No rate from the guest's last boot while it has none from this one.
        cleared = [row for row in rows if row["STATUS"] == "never_updated"]
        assert cleared and all(row[rate] == "-" for row in cleared for rate in RATES), cleared


#: watch's rate columns.
RATES = ("MAJFLT/s", "MINFLT/s", "SWAPIN/s", "SWAPOUT/s")


def _watch_rows(text: str, domain: str) -> List[Dict[str, str]]:
    """The domain's rows of every block ``watch`` printed, by column title."""
    rows = []
    titles: List[str] = []
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == "DOMAIN":
            titles = cells
        elif cells[0] == domain and titles:
            rows.append(dict(zip(titles, cells)))
    return rows

"""B10 and B11: the exporter beside Debian's collectd (its virt plugin), on the same domains, in one run.

What a user would run instead of this project on a hypervisor is collectd's
virt plugin, which reads ``virDomainMemoryStats`` for every domain each
interval (``ExtraStats "memory"``) and writes it with the csv plugin. Both
are run here, one after the other, on the same domains at the same
interval, each for the same time:

- **B10, cost.** Host CPU (the client's and libvirtd's, from ``/proc``)
  per domain-cycle, the exporter's over collectd's: with ``--source
  libvirt`` (the figures collectd reads) and with the default.
- **B11, a stopped QEMU.** One QEMU is SIGSTOPped for 40 s (SIGCONT in a
  ``finally``). The longest gap between two readings of any *other* domain
  is measured from each tool's own output: collectd's csv lines, and the
  exporter's ``virt_balloon_status`` at each new
  ``virt_balloon_cycle_timestamp_seconds`` (scraped every 0.5 s there; once
  an interval, as Prometheus would, where its CPU is compared): a domain
  was read in a cycle unless its status was ``unresponsive`` or
  ``unreachable``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

#: How long a QEMU is stopped in B11, and when, after the measuring starts.
STOP_SECONDS = 40.0
STOP_AFTER = 8.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_seconds(pid: int) -> float:
    """CPU seconds of the threads ``pid`` has now, to the nanosecond (``schedstat``).

    Exact for a process whose threads live through the run (libvirtd's
    workers and its per-domain event threads, collectd's): a thread that
    exits takes its share with it.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


class ProcessCPU:
    """One process's CPU seconds so far, as exactly as this host allows.

    ``/proc/PID/stat`` counts in 10 ms ticks, and a 40 s run of the
    exporter over 30 domains costs it 5 to 15 of them: one tick is up to a
    fifth of the figure. A control group made for the process counts
    nanoseconds, its exited threads included (the exporter answers each
    scrape in a thread of its own): cgroup v1's ``cpuacct``, else v2's
    ``cpu.stat``. Without either (no permission), the ticks.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.how = "ticks"
        self._group: Optional[Path] = None
        for root, counter in ((Path("/sys/fs/cgroup/cpuacct"), "cpuacct.usage"),
                              (Path("/sys/fs/cgroup"), "cpu.stat")):
            if not (root / counter).exists() and not (root / "cgroup.procs").exists():
                continue
            group = root / f"vbs-bench-{pid}"
            try:
                group.mkdir()
                (group / "cgroup.procs").write_text(str(pid))  # every thread, and those it starts
            except OSError:
                with contextlib.suppress(OSError):
                    group.rmdir()
                continue
            self._group, self._counter, self.how = group, counter, f"cgroup {counter}"
            break

    def seconds(self) -> float:
        if self._group is None:
            return cpu_seconds(self.pid)
        text = (self._group / self._counter).read_text()
        if self._counter == "cpuacct.usage":
            return int(text) / 1e9
        return int(re.search(r"^usage_usec (\d+)$", text, re.M)[1]) / 1e6  # type: ignore[index]

    def close(self) -> None:
        """Remove the group (once the process has ended)."""
        if self._group is not None:
            with contextlib.suppress(OSError):
                self._group.rmdir()


def libvirtd_pid() -> int:
    """The host's libvirtd: the one whose root is "/" (the next stack's runs in a root of its own)."""
    proc = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True)
    mine = []
    for pid in proc.stdout.split():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/root") == "/":
                mine.append(int(pid))
    if len(mine) != 1:
        raise SystemExit(f"bench: expected one libvirtd of this host's root, found {len(mine)}")
    return mine[0]


def longest_gap(times: Sequence[float], since: float, until: float) -> float:
    """The longest time without a reading inside ``[since, until]`` (its ends count as readings' bounds)."""
    inside = sorted(t for t in times if since <= t <= until)
    marks = [since, *inside, until]
    return max(b - a for a, b in zip(marks, marks[1:]))


@contextlib.contextmanager
def stopped_qemu(pid: Optional[int], after: float) -> Iterator[Dict[str, float]]:
    """SIGSTOP ``pid`` ``after`` seconds into the block, for :data:`STOP_SECONDS`; SIGCONT whatever happens.

    Yields the window it was stopped in (``since``, ``until``), filled in as it happens.
    """
    window: Dict[str, float] = {}
    if pid is None:
        yield window
        return
    import threading

    done = threading.Event()

    def run() -> None:
        if done.wait(after):
            return
        os.kill(pid, signal.SIGSTOP)
        window["since"] = time.time()
        try:
            done.wait(STOP_SECONDS)
        finally:
            os.kill(pid, signal.SIGCONT)
            window["until"] = time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield window
    finally:
        done.set()
        thread.join(STOP_SECONDS + 5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def measured(client: ProcessCPU, seconds: float, poll: Callable[[], None], stop: Optional[int],
             every: float = 0.5) -> Dict[str, Any]:
    """Run ``poll`` every ``every`` s for ``seconds`` while the CPU of ``client`` and libvirtd is counted."""
    daemon = libvirtd_pid()
    cpu0, t0 = client.seconds(), time.monotonic()
    lcpu0, lticks0 = threads_cpu_seconds(daemon), cpu_seconds(daemon)
    began = time.time()
    with stopped_qemu(stop, STOP_AFTER) as window:
        while time.monotonic() - t0 < seconds:
            poll()
            time.sleep(every)
    daemon_cpu, daemon_ticks = threads_cpu_seconds(daemon) - lcpu0, cpu_seconds(daemon) - lticks0
    # A libvirtd thread that ended during the run took its nanoseconds with
    # it; the ticks then say more than two ticks' rounding: take the ticks.
    exact = daemon_ticks - daemon_cpu <= 0.02
    return {
        "client_cpu_s": client.seconds() - cpu0,
        "libvirtd_cpu_s": daemon_cpu if exact else daemon_ticks,
        "seconds": time.monotonic() - t0,
        "began": began,
        "window": dict(window),
        "cpu_counted_by": {"client": client.how, "libvirtd": "threads' schedstat" if exact else "ticks"},
    }


# -- collectd ------------------------------------------------------------------------------------------


def collectd_conf(folder: Path, uri: str, names: Sequence[str], interval: float) -> Path:
    """A collectd.conf in ``folder``: the virt plugin (these domains' memory stats) and the csv writer."""
    domains = "\n".join(f'  Domain "{name}"' for name in names)
    text = f"""Hostname "bench"
FQDNLookup false
Interval {interval:g}
BaseDir "{folder}"
PIDFile "{folder}/collectd.pid"
AutoLoadPlugin false
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File "{folder}/collectd.log"
  Timestamp true
</Plugin>
LoadPlugin virt
<Plugin virt>
  Connection "{uri}"
  RefreshInterval 60
{domains}
  IgnoreSelected false
  HostnameFormat name
  ExtraStats "memory"
</Plugin>
LoadPlugin csv
<Plugin csv>
  DataDir "{folder}/csv"
  StoreRates false
</Plugin>
"""
    path = folder / "collectd.conf"
    path.write_text(text)
    return path


def collectd_times(csv: Path) -> Dict[str, List[float]]:
    """Each domain's reading times, from the csv files of its ``memory`` figures (one folder a domain)."""
    times: Dict[str, List[float]] = {}
    for path in csv.glob("*/*/memory-*"):
        seen = times.setdefault(path.parent.parent.name, [])
        for line in path.read_text().splitlines()[1:]:
            with contextlib.suppress(ValueError):
                seen.append(float(line.split(",", 1)[0]))
    # One reading writes several files within the same second.
    return {domain: sorted({round(x) for x in t}) for domain, t in times.items()}


def collectd_run(uri: str, names: Sequence[str], seconds: float, interval: float,
                 stop: Optional[int] = None) -> Dict[str, Any]:
    """collectd over ``names`` for ``seconds`` (after two intervals of warming up)."""
    with tempfile.TemporaryDirectory(prefix="vbs-bench-collectd-") as tmp:
        folder = Path(tmp)
        conf = collectd_conf(folder, uri, names, interval)
        proc = subprocess.Popen(["collectd", "-f", "-C", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        cpu = ProcessCPU(proc.pid)
        try:
            time.sleep(2 * interval)
            if proc.poll() is not None:
                said = proc.stderr.read() if proc.stderr else ""
                raise SystemExit(f"bench: collectd did not start: {said}")
            run = measured(cpu, seconds, lambda: None, stop)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            cpu.close()
        run["times"] = collectd_times(folder / "csv")
        log = (folder / "collectd.log").read_text(errors="replace")
        run["log_lines"] = len(log.splitlines())
        run["slow_reads"] = re.findall(r"read-function of the `[^']+' plugin took [0-9.]+ seconds", log)[:5]
        run["errors"] = sorted(set(re.findall(r"\[error\] (.{0,80})", log)))[:5]
    return run


# -- the exporter --------------------------------------------------------------------------------------


_LINE = re.compile(r'^virt_balloon_status\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def exporter_run(cli: str, port: int, names: Sequence[str], seconds: float, interval: float,
                 source: Optional[str] = None, stop: Optional[int] = None) -> Dict[str, Any]:
    """The exporter over ``names`` for ``seconds``, scraped for the domains each cycle read.

    For its cost (no ``stop``) it is scraped once an interval, as a
    Prometheus with that scrape interval would: a scrape renders every
    domain's series, and collectd, writing csv, has no such reader. For the
    gaps it is scraped every 0.5 s, and its CPU is not compared.
    """
    argv = [cli, "exporter", "--listen", f"127.0.0.1:{port}", "--interval", f"{interval:g}"]
    proc = subprocess.Popen([*argv, *(["--source", source] if source else []), *names],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu = ProcessCPU(proc.pid)
    url = f"http://127.0.0.1:{port}/metrics"
    times: Dict[str, List[float]] = {}
    last = [0.0]

    def scrape() -> None:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return
        stamp = re.search(r"^virt_balloon_cycle_timestamp_seconds (\S+)$", text, re.M)
        if stamp is None or float(stamp.group(1)) == last[0]:
            return
        last[0] = float(stamp.group(1))
        for line in text.splitlines():
            match = _LINE.match(line)
            status = re.search(r'status="([^"]*)"', match["labels"]) if match else None
            # Read this cycle: any status but the two that say QEMU or libvirt did not answer. The
            # no-OS domains never have guest figures ("never"), yet their QEMU answered.
            if match and status and status.group(1) not in ("unresponsive", "unreachable") \
                    and float(match["value"]) == 1:
                domain = re.search(r'domain="([^"]*)"', match["labels"])
                if domain:
                    times.setdefault(domain.group(1), []).append(last[0])

    try:
        deadline = time.monotonic() + 30
        while not last[0]:
            scrape()
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bench: the exporter did not come up")
            time.sleep(0.2)
        time.sleep(interval)
        run = measured(cpu, seconds, scrape, stop, every=interval if stop is None else 0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        cpu.close()
    run["times"] = times
    return run


def gaps(run: Dict[str, Any], healthy: Sequence[str]) -> Dict[str, float]:
    """Each healthy domain's longest gap between readings while the QEMU was stopped."""
    window = run["window"]
    since, until = window["since"], window["until"]
    return {name: longest_gap(run["times"].get(name, []), since, until) for name in healthy}


def per_domain_cycle(run: Dict[str, Any], domains: int, interval: float) -> float:
    """Host CPU seconds (client + libvirtd) per domain per cycle."""
    cycles = run["seconds"] / interval
    return (run["client_cpu_s"] + run["libvirtd_cpu_s"]) / (domains * cycles)

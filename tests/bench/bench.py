"""Benchmarks: every path of virt_balloon_stats against the raw libvirt floor, as ratios in one run.

Run as root with ``tox -e bench -- --json PATH`` (or ``python tests/bench/bench.py``).
It brings the testbed up (``contrib/testbed/vbs-testbed up``), creates N light
no-OS domains plus two real guests whose balloon driver answers (all named
``vbs-tb-bench-*``, destroyed at the end), measures, prints a table and writes
the same figures as JSON. Machines here are shared and noisy, so every target
is a ratio of two figures measured in the same run, interleaved, each the
median of several repetitions.

B1  floors: the fewest libvirt calls that yield the same figures, bare
    (checked: a floor whose bulk call left any domain's figures out stops the run)
B2  a steady collector cycle with the cross-check, against the floor
B3  default workers against one worker
B4  libvirt calls per domain per steady cycle
B5  growth from N/3 to N domains
B6  the exporter: CPU, peak RSS, scrape latency
B7  a cold ``stats DOMAIN --format json`` against a bare script making the same libvirt calls
    (and, for reference, against the bare imports)
B8  the same against ``virsh dommemstat``
B9  ``stats --all --timeout 5`` with one QEMU stopped
B10 host CPU per domain-cycle, the exporter over Debian's collectd (virt plugin), same domains and interval
B11 with one QEMU stopped for 40 s, the longest gap in any other domain's figures: the exporter's, collectd's
B12 scale: the steady cycle at 100 domains over N, and the exporter's peak RSS at 100
B13 a collector cycle recorded in a history file (``exporter --history``) against one not
B14 ``advise --all`` over 8 days of history a domain, scaled to 100 domains
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import libvirt
import libvirt_qemu

from virt_balloon_stats.rounds import BULK_CHUNKS

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "contrib" / "testbed" / "vbs-testbed"
URI = "qemu:///system"
PREFIX = "vbs-tb-bench-"
CLI = shutil.which("virt-balloon-stats") or str(Path(sys.executable).parent / "virt-balloon-stats")
GUEST_STATS = (
    '{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}'
)
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
BALLOON = libvirt.VIR_DOMAIN_STATS_BALLOON


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- the testbed ---------------------------------------------------------------------------------------


def testbed(*args: str) -> str:
    proc = subprocess.run([str(TESTBED), *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"bench: vbs-testbed {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def domains(light: int) -> Iterator[List[str]]:
    """``light`` no-OS domains and two guests, all created at once; destroyed afterwards."""
    names = [f"{PREFIX}g{i}" for i in range(2)] + [f"{PREFIX}n{i:02d}" for i in range(light)]
    stale = [d for d in libvirt.open(URI).listAllDomains() if d.name().startswith(PREFIX)]
    if stale:
        testbed("destroy", *[d.name() for d in stale])
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            guest = ("create", "virtio", "--wait-stats", "120", "--name")
            jobs = [pool.submit(testbed, *guest, n) for n in names[:2]]
            jobs += [pool.submit(testbed, "create", "noos", "--name", n) for n in names[2:]]
            for job in jobs:
                job.result()
        yield names
    finally:
        subprocess.run([str(TESTBED), "destroy", *names], capture_output=True, timeout=300)


# -- measuring ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def interleaved(runs: int, **contenders: Callable[[], Any]) -> Dict[str, List[float]]:
    """Each contender once per round, ``runs`` rounds, in turn: drift hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def summary(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Floors:
    """B1: bare loops of the fewest calls that yield the same figures."""

    def __init__(self, conn: Any, names: Sequence[str]) -> None:
        self.conn = conn
        self.doms = [conn.lookupByName(n) for n in names]
        self.pools = {t: concurrent.futures.ThreadPoolExecutor(t) for t in (4, 8)}

    def bulk_then_qmp(self) -> None:
        self._complete(self.conn.domainListGetStats(self.doms, BALLOON, NOWAIT))
        for dom in self.doms:
            libvirt_qemu.qemuMonitorCommand(dom, GUEST_STATS, 0)

    def qmp_and_memory_stats(self) -> None:
        for dom in self.doms:
            libvirt_qemu.qemuMonitorCommand(dom, GUEST_STATS, 0)
            dom.memoryStats()

    def bulk_alongside(self, threads: int) -> None:
        # Not NOWAIT: alongside the qom-gets the domains' jobs are often held,
        # and NOWAIT then leaves their figures out (up to 19 of 30 domains per
        # call were seen without figures): not the same figures.
        pool = self.pools[threads]
        bulk = pool.submit(self.conn.domainListGetStats, self.doms, BALLOON, 0)
        list(pool.map(lambda d: libvirt_qemu.qemuMonitorCommand(d, GUEST_STATS, 0), self.doms))
        self._complete(bulk.result())

    def _complete(self, records: List[Any]) -> None:
        missing = sum(1 for _dom, stats in records if "balloon.last-update" not in stats)
        if missing or len(records) != len(self.doms):
            raise SystemExit(f"bench: a floor's bulk call left out {missing} domains' figures")

    def per_domain(self, threads: int) -> None:
        def one(dom: Any) -> None:
            libvirt_qemu.qemuMonitorCommand(dom, GUEST_STATS, 0)
            dom.memoryStats()
        list(self.pools[threads].map(one, self.doms))

    def contenders(self) -> Dict[str, Callable[[], Any]]:
        return {
            "floor bulk+qom-get, 1 thread": self.bulk_then_qmp,
            "floor qom-get+memoryStats, 1 thread": self.qmp_and_memory_stats,
            "floor bulk alongside qom-get, 4 threads": lambda: self.bulk_alongside(4),
            "floor bulk alongside qom-get, 8 threads": lambda: self.bulk_alongside(8),
            "floor qom-get+memoryStats, 4 threads": lambda: self.per_domain(4),
            "floor qom-get+memoryStats, 8 threads": lambda: self.per_domain(8),
        }


def steady(collector: Any, calls: Optional[List[Dict[str, int]]] = None) -> Callable[[], None]:
    """One collector cycle; checks every domain was read, keeps its calls."""
    def run() -> None:
        cycle = collector.collect()
        bad = [s for s in cycle.samples if s.status.value not in ("ok", "never_updated")]
        if bad:
            first = bad[0]
            raise SystemExit(f"bench: {first.domain} was not read: {first.status.value}: {first.message}")
        if calls is not None:
            calls.append(dict(cycle.calls))
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def exporter_run(names: Sequence[str], seconds: float, interval: float) -> Dict[str, Any]:
    """B6: the exporter over the domains, scraped every interval for ``seconds``."""
    port = free_port()
    proc = subprocess.Popen(
        [CLI, "exporter", "--listen", f"127.0.0.1:{port}", "--interval", str(interval), *names],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if b"virt_balloon_up" in reply.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bench: the exporter did not come up")
            time.sleep(0.2)
        cpu0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        latencies = []
        while time.monotonic() - t0 < seconds:
            began = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as reply:
                reply.read()
            latencies.append(time.perf_counter() - began)
            time.sleep(max(0.0, interval - (time.perf_counter() - began)))
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        wall = time.monotonic() - t0
        rss = proc_peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {"cpu_share": cpu / wall, "peak_rss_mb": rss, "scrape_p99_s": p99, "scrapes": len(latencies)}


def record_cost(collector: Any, runs: int) -> Dict[str, Any]:
    """B13: the CPU of a steady cycle, and of one whose samples the exporter's recorder writes.

    ``process_time`` (every thread of this process, to the microsecond): a
    cycle costs a few milliseconds, which ``/proc``'s 10 ms ticks cannot
    tell apart over a minute. The recorder writes one point per domain into
    a real history file, downsampling once a minute, as ``exporter
    --history`` does after each cycle.
    """
    from virt_balloon_stats.history import History
    from virt_balloon_stats.recorder import Recorder

    cpu: Dict[str, List[float]] = {"cycle": [], "cycle and record": []}
    with tempfile.TemporaryDirectory(prefix="vbs-bench-") as folder, \
            History.open(f"{folder}/history.sqlite", writer=True) as history:
        recorder = Recorder(history, 5.0)
        recorder.record(collector.collect())  # the file and its domains exist, as in a running exporter
        for _ in range(runs):
            began = time.process_time()
            collector.collect()
            cpu["cycle"].append(time.process_time() - began)
            began = time.process_time()
            recorder.record(collector.collect())
            cpu["cycle and record"].append(time.process_time() - began)
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {"ratio": medians["cycle and record"] / medians["cycle"],
            "cpu_ms": {name: round(value * 1000, 2) for name, value in medians.items()}}


#: 8 days at a 5 s interval, as the history file keeps it: what is downsampled anyway is written
#: at the coarser interval (the same file, written in seconds rather than minutes).
HISTORY_SEGMENTS = ((8 * 86400, 300), (86400, 60), (6 * 3600, 5))


def advise_run(conn: Any, names: Sequence[str], runs: int) -> Dict[str, Any]:
    """B14: the installed ``advise`` over ``names``, each with 8 days of synthetic history.

    The history is written through the real recording code, ending now; the
    command reads every domain's XML from libvirt and its 8 days from the
    file, as ``advise --all`` does. Its time grows with the domains, so the
    time for 100 is that for N, times 100 / N (start-up included, which
    only overstates it).
    """
    from history_size import fill  # beside this script, on its sys.path

    ids = [(conn.lookupByName(name).UUIDString(), name) for name in names]
    with tempfile.TemporaryDirectory(prefix="vbs-bench-") as folder:
        path = f"{folder}/history.sqlite"
        began = time.perf_counter()
        points = fill(path, len(ids), HISTORY_SEGMENTS, end=int(time.time()) // 300 * 300, ids=ids)
        filled = time.perf_counter() - began
        argv = [CLI, "advise", "--history", path, "--format", "json", *names]
        took = interleaved(runs, advise=lambda: run_quiet(argv))["advise"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    docs = json.loads(proc.stdout or "[]")
    advised = sum(1 for doc in docs if doc["recommended"] is not None)
    if proc.returncode or advised != len(names):
        raise SystemExit(f"bench: advise advised {advised} of {len(names)} domains: {proc.stderr[-500:]}")
    median = statistics.median(took)
    return {"domains": len(names), "median_s": median, "scaled_s": median * 100 / len(names),
            "points_written": points, "fill_s": round(filled, 1), "runs": summary(took)}


def run_quiet(argv: Sequence[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# -- the report -----------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def add(self, bid: str, what: str, value: float, unit: str, target: str = "",
            ok: Optional[bool] = None, detail: Optional[Dict[str, Any]] = None) -> None:
        verdict = "reference" if ok is None and not target else ("met" if ok else "MISSED")
        self.rows.append({"id": bid, "what": what, "value": value, "unit": unit, "target": target,
                          "verdict": verdict, "detail": detail or {}})

    def table(self) -> str:
        lines = [f"{'id':4} {'what':62} {'value':>12} {'target':>14}  verdict"]
        for r in self.rows:
            value = f"{r['value']:.3g}{r['unit']}"
            lines.append(f"{r['id']:4} {r['what'][:62]:62} {value:>12} {r['target']:>14}  {r['verdict']}")
        return "\n".join(lines)

    @property
    def missed(self) -> List[str]:
        return [r["id"] for r in self.rows if r["verdict"] == "MISSED"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--domains", type=int, default=30, help="N: domains in all, two of them guests (30)")
    parser.add_argument("--runs", type=int, default=15, help="repetitions of each timed measurement (15)")
    parser.add_argument("--exporter-seconds", type=float, default=60.0, help="length of B6 (60)")
    parser.add_argument("--peer-seconds", type=float, default=40.0, help="length of each B10 run (40)")
    parser.add_argument("--peer-rounds", type=int, default=3,
                        help="B10 rounds, each running the three side by side in turn (3)")
    parser.add_argument("--scale", type=int, default=100, help="domains in all for B12 (100)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it starts libvirtd and creates domains)")
    if shutil.which("collectd") is None:
        raise SystemExit(
            "bench: collectd is missing (Debian's collectd-core); contrib/run-tests bench installs it"
        )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    from virt_balloon_stats.client import DEFAULT_WORKERS
    from virt_balloon_stats.collector import Collector

    default_name = f"collector, default ({DEFAULT_WORKERS} workers)"

    testbed("up")
    conn = libvirt.open(URI)
    qemu = conn.getVersion()
    env = {
        "libvirt": conn.getLibVersion(),
        "libvirt_text": "%d.%d.%d" % (conn.getLibVersion() // 1000000, conn.getLibVersion() // 1000 % 1000,
                                      conn.getLibVersion() % 1000),
        "qemu_text": "%d.%d.%d" % (qemu // 1000000, qemu // 1000 % 1000, qemu % 1000),
        "accel": "TCG (domain type 'qemu'; nested KVM does not boot here)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "domains": args.domains,
        "runs": args.runs,
    }
    log(f"libvirt {env['libvirt_text']}, QEMU {env['qemu_text']}, guests under TCG, {env['cpus']} CPUs")
    report = Report()
    with domains(args.domains - 2) as names:
        time.sleep(2)
        small = names[: max(3, args.domains // 3)]
        floors = Floors(conn, names)
        with Collector([URI], domains=names, events=True) as default, \
                Collector([URI], domains=names, events=True, workers=1) as single, \
                Collector([URI], domains=small, events=True) as few:
            for warm in (default, single, few):
                warm.collect()
                warm.collect()
            calls: List[Dict[str, int]] = []
            contenders = dict(floors.contenders())
            contenders[default_name] = steady(default, calls)
            contenders["collector, 1 worker"] = steady(single)
            contenders[f"collector, default, N={len(small)}"] = steady(few)
            log(f"B1-B5: {args.runs} interleaved rounds over {len(names)} domains")
            times = interleaved(args.runs, **contenders)
            log(f"B13: a collector cycle with and without recording it, {args.runs} interleaved rounds")
            thirteen = record_cost(default, args.runs)
        medians = {name: statistics.median(values) for name, values in times.items()}
        floor_names = [n for n in medians if n.startswith("floor")]
        floor = min(floor_names, key=lambda n: medians[n])
        serial = min((n for n in floor_names if "1 thread" in n), key=lambda n: medians[n])
        for name in floor_names:
            tag = " (the floor)" if name == floor else " (the serial floor)" if name == serial else ""
            report.add("B1", name + tag, medians[name] * 1000, " ms", detail=summary(times[name]))
        ours = medians[default_name]
        ratio = ours / medians[floor]
        report.add("B2", f"steady collector cycle, N={len(names)}, over the floor", ratio, "x", "<= 1.15x",
                   ratio <= 1.15, {"cycle": summary(times[default_name]), "floor": floor})
        gain = medians["collector, 1 worker"] / ours
        report.add("B3", "default workers over one worker (speed-up)", gain, "x", ">= 1.6x", gain >= 1.6,
                   {"one_worker": summary(times["collector, 1 worker"])})
        per_cycle: Dict[str, float] = {}
        for c in calls:
            for k, v in c.items():
                per_cycle[k] = per_cycle.get(k, 0) + v / len(calls)
        per_cycle = {k: round(v, 6) for k, v in per_cycle.items()}  # sums of fractions: 6.000000000000001
        bulk = per_cycle.get("domainListGetStats", 0.0)
        per_domain = (sum(per_cycle.values()) - bulk) / len(names)
        xml_state = per_cycle.get("XMLDesc", 0.0) + per_cycle.get("state", 0.0)
        report.add("B4", "libvirt calls per domain per steady cycle (+ the bulk calls)", per_domain, "",
                   "<= 1.1", per_domain <= 1.1, {"calls_per_cycle": per_cycle})
        # Per chunk, one call for the domains due for their cross-check and one for the others' state.
        report.add("B4", "bulk calls per steady cycle", bulk, "", f"<= {2 * BULK_CHUNKS}",
                   bulk <= 2 * BULK_CHUNKS)
        report.add("B4", "XMLDesc + state per steady cycle", xml_state, "", "0", xml_state == 0)
        growth = ours / medians[f"collector, default, N={len(small)}"]
        report.add("B5", f"steady cycle N={len(names)} over N={len(small)}", growth, "x", "<= 3.3x",
                   growth <= 3.3)

        log(f"B6: the exporter for {args.exporter_seconds:g} s")
        six = exporter_run(names, args.exporter_seconds, 5.0)
        report.add("B6", "exporter CPU, share of one core", six["cpu_share"] * 100, " %", "<= 2 %",
                   six["cpu_share"] <= 0.02, six)
        report.add("B6", "exporter peak RSS", six["peak_rss_mb"], " MB", "<= 60 MB", six["peak_rss_mb"] <= 60)
        report.add("B6", "exporter scrape latency p99", six["scrape_p99_s"] * 1000, " ms", "<= 50 ms",
                   six["scrape_p99_s"] <= 0.05)

        report.add("B13", "CPU per cycle recording history over without", thirteen["ratio"], "x", "<= 1.1x",
                   thirteen["ratio"] <= 1.1, thirteen)

        log("B14: advise over 8 days of history a domain")
        fourteen = advise_run(conn, names, args.runs)
        report.add("B14", f"'advise' over 8 days a domain, N={len(names)} scaled to 100",
                   fourteen["scaled_s"], " s", "<= 2 s", fourteen["scaled_s"] <= 2.0, fourteen)

        guest = names[0]
        log("B7-B8: cold commands")
        cold = interleaved(
            args.runs,
            stats=lambda: run_quiet([CLI, "stats", guest, "--format", "json"]),
            floor=lambda: run_quiet([sys.executable, "-c", BARE_STATS.format(uri=URI, name=guest)]),
            imports=lambda: run_quiet([sys.executable, "-c", "import libvirt, libvirt_qemu, lxml.etree"]),
            virsh=lambda: run_quiet(["virsh", "-c", URI, "dommemstat", guest]),
        )
        cm = {k: statistics.median(v) for k, v in cold.items()}
        seven = cm["stats"] / cm["floor"]
        report.add("B7", "cold 'stats DOMAIN --format json' over a bare script, same calls", seven, "x",
                   "<= 1.4x", seven <= 1.4, {k: summary(v) for k, v in cold.items()})
        report.add("B7", "the same over the bare imports", cm["stats"] / cm["imports"], "x")
        report.add("B8", "the same over 'virsh dommemstat DOMAIN'", cm["stats"] / cm["virsh"], "x",
                   detail={"stats_ms": cm["stats"] * 1000, "virsh_ms": cm["virsh"] * 1000})

        log("B9: one QEMU stopped")
        hung = names[-1]
        pid = int(Path(f"/run/libvirt/qemu/{hung}.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            proc = subprocess.run([CLI, "stats", "--timeout", "5", "--format", "json", *names],
                                  capture_output=True, text=True, timeout=120)
            took = time.monotonic() - began
        finally:
            os.kill(pid, signal.SIGCONT)
        docs = json.loads(proc.stdout or "[]")
        others = [d for d in docs if d["domain"] != hung]
        read = [d for d in others if d["status"] not in ("unresponsive", "unreachable")]
        hung_status = next((d["status"] for d in docs if d["domain"] == hung), None)
        good = took <= 5.5 and len(read) == len(names) - 1 and hung_status == "unresponsive"
        report.add("B9", f"'stats --timeout 5', 1 of {len(names)} QEMUs stopped: exit time", took, " s",
                   "<= 5.5 s", good, {"others_read": len(read), "stopped_status": hung_status})

        peer_rows(report, names, args.peer_seconds, hung, args.peer_rounds)
        scale_rows(report, names, args.scale, args.runs, args.exporter_seconds)

    print(f"virt_balloon_stats benchmarks: libvirt {env['libvirt_text']}, QEMU {env['qemu_text']}, "
          f"guests under TCG, {env['cpus']} CPUs, median of {args.runs}")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": report.rows}, indent=2) + "\n")
        log(f"wrote {args.json}")
    if report.missed:
        log(f"targets missed: {', '.join(report.missed)}")
        return 1
    return 0


def qemu_rss_mb(name: str) -> float:
    """The resident memory of a domain's QEMU, MB."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable")


def scale_rows(report: "Report", names: Sequence[str], total: int, runs: int, seconds: float) -> None:
    """B12: more no-OS domains up to ``total``; the steady cycle over N's, and the exporter's RSS.

    What the QEMUs need is measured first, on the no-OS domains running: the
    run stops before creating more if they would take over half the memory
    the host has available.
    """
    from virt_balloon_stats.collector import Collector

    light = [n for n in names if n.startswith(f"{PREFIX}n")]
    per_qemu = statistics.median(qemu_rss_mb(n) for n in light)
    more = [f"{PREFIX}m{i:03d}" for i in range(total - len(names))]
    need, have = per_qemu * len(more), mem_available_mb()
    report.add("B12", "a no-OS domain's QEMU, resident memory", per_qemu, " MB",
               detail={"more_domains": len(more), "need_mb": need, "available_mb": have})
    if need > have / 2:
        raise SystemExit(f"bench: {len(more)} more QEMUs need about {need:.0f} MB, over half of the "
                         f"{have:.0f} MB available; give a smaller --scale")
    log(f"B12: {len(more)} more no-OS domains ({need:.0f} MB of the {have:.0f} MB available)")
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda n: testbed("create", "noos", "--name", n), more))
        every = [*names, *more]
        with Collector([URI], domains=every, events=True) as big, \
                Collector([URI], domains=list(names), events=True) as base:
            for warm in (big, base, big, base):
                warm.collect()
            times = interleaved(runs, big=steady(big), base=steady(base))
        growth = statistics.median(times["big"]) / statistics.median(times["base"])
        # At most 8 % over linear: 3.6x for 100 domains over 30 (linear, 3.33x).
        linear = len(every) / len(names)
        report.add("B12", f"steady cycle N={len(every)} over N={len(names)}", growth, "x",
                   f"<= {1.08 * linear:.1f}x", growth <= 1.08 * linear,
                   {"big": summary(times["big"]), "base": summary(times["base"]), "linear": linear})
        log(f"B12: the exporter over {len(every)} domains for {seconds:g} s")
        run = exporter_run(every, seconds, 5.0)
        report.add("B12", f"exporter peak RSS, N={len(every)}", run["peak_rss_mb"], " MB", "<= 70 MB",
                   run["peak_rss_mb"] <= 70, run)
    finally:
        subprocess.run([str(TESTBED), "destroy", *more], capture_output=True, timeout=600)


#: B7's floor: what ``stats DOMAIN --format json`` asks of libvirt, with nothing of ours
#: (the imports, connect, look-up, the XML parsed, QEMU's interval, figures and
#: balloon size, memoryStats and the state, one JSON document printed).
BARE_STATS = """
import json, libvirt, libvirt_qemu, lxml.etree
libvirt.registerErrorHandler(lambda c, e: None, None)
conn = libvirt.open("{uri}")
d = conn.lookupByName("{name}")
lxml.etree.fromstring(d.XMLDesc(0))
q = lambda c: json.loads(libvirt_qemu.qemuMonitorCommand(d, json.dumps(c), 0))
p = "/machine/peripheral/balloon0"
q({{"execute": "qom-get", "arguments": {{"path": p, "property": "guest-stats-polling-interval"}}}})
s = q({{"execute": "qom-get", "arguments": {{"path": p, "property": "guest-stats"}}}})
print(json.dumps([s, q({{"execute": "query-balloon"}}), d.memoryStats(), d.state()]))
conn.close()
"""


def peer_rows(report: "Report", names: Sequence[str], seconds: float, hung: str, rounds: int = 3) -> None:
    """B10 and B11 (see :mod:`peers`): the exporter and collectd, one after the other, 5 s intervals.

    B10 runs the three in turn, ``rounds`` times, and takes the median of
    each round's ratio: the machine's own load drifts between runs, so one
    run of each (as first written) swung collectd's cost by 30 %. The CPU
    is counted in nanoseconds (:class:`peers.ProcessCPU`, and libvirtd's
    threads), not in ``/proc``'s 10 ms ticks, of which a 40 s run of the
    exporter costs 5 to 15.
    """
    import peers  # beside this script, on its sys.path

    interval = 5.0
    contenders = ("collectd", "exporter --source libvirt", "exporter (default --source both)")
    log(f"B10: collectd, the exporter with --source libvirt and with the default, {seconds:g} s each, "
        f"{rounds} rounds")
    costs: Dict[str, List[float]] = {name: [] for name in contenders}
    detail: Dict[str, Any] = {"rounds": []}
    for _ in range(rounds):
        runs = {
            "collectd": peers.collectd_run(URI, names, seconds, interval),
            "exporter --source libvirt":
                peers.exporter_run(CLI, free_port(), names, seconds, interval, "libvirt"),
            "exporter (default --source both)":
                peers.exporter_run(CLI, free_port(), names, seconds, interval),
        }
        for name, run in runs.items():
            costs[name].append(peers.per_domain_cycle(run, len(names), interval))
        detail["rounds"].append({name: {**{k: v for k, v in run.items() if k != "times"},
                                        "cpu_per_domain_cycle_ms": costs[name][-1] * 1000}
                                 for name, run in runs.items()})
    for name, target in (("exporter --source libvirt", 0.6), ("exporter (default --source both)", 1.0)):
        ratios = [mine / theirs for mine, theirs in zip(costs[name], costs["collectd"])]
        ratio = statistics.median(ratios)
        report.add("B10", f"host CPU per domain-cycle, {name} over collectd", ratio, "x", f"<= {target}x",
                   ratio <= target, {**detail, "ratios": ratios,
                                     "median_ms": {n: statistics.median(c) * 1000 for n, c in costs.items()}})
    length = peers.STOP_AFTER + peers.STOP_SECONDS + 2 * interval
    log(f"B11: collectd and the exporter, one of {len(names)} QEMUs stopped for {peers.STOP_SECONDS:g} s")
    healthy = [n for n in names if n != hung]
    stop_pid = int(Path(f"/run/libvirt/qemu/{hung}.pid").read_text())
    stalled = {
        "collectd": peers.collectd_run(URI, names, length, interval, stop=stop_pid),
        "exporter": peers.exporter_run(CLI, free_port(), names, length, interval, stop=stop_pid),
    }
    worst = {name: max(peers.gaps(run, healthy).values()) for name, run in stalled.items()}
    timeout = interval  # the exporter's default --timeout: its interval
    report.add("B11", "longest gap in a healthy domain's figures, the exporter", worst["exporter"], " s",
               f"<= {interval + timeout:g} s", worst["exporter"] <= interval + timeout,
               {"window": stalled["exporter"]["window"]})
    report.add("B11", "the same, collectd's virt plugin", worst["collectd"], " s",
               detail={key: stalled["collectd"][key] for key in ("window", "slow_reads", "errors")})


if __name__ == "__main__":
    sys.exit(main())

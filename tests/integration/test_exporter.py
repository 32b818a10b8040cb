"""The exporter, ``stream`` and ``--textfile`` against real libvirtd, QEMU and guests.

The exporter runs as users run it (the installed command, in its own
process), is scraped over HTTP and read with prometheus_client's own parser.
Expected figures come from ``virsh`` at the same moment. Faults are real: a
QEMU stopped with SIGSTOP, libvirtd stopped and started again; each is undone
in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import URI, wait_for
from tests.integration.test_cli import CLI, dommemstat
from tests.integration.test_collector import libvirtd_stopped, stopped

Series = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Exporter:
    """The installed exporter in its own process, with its log kept."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = list(args)
        if not any(a.startswith("--listen") for a in args):
            self.args += ["--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            [CLI, "exporter", *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(
        self, path: str = "/metrics", context: Optional[ssl.SSLContext] = None, url: str = ""
    ) -> Tuple[int, str]:
        try:
            with urllib.request.urlopen((url or self.url) + path, timeout=5, context=context) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def scrape(self) -> Series:
        status, text = self.get()
        assert status == 200, text
        return parse(text)

    def wait_ready(self, timeout: float = 20) -> Series:
        """Until a scrape has a finished cycle (virt_balloon_up present)."""
        def ready() -> bool:
            try:
                return any(name == "virt_balloon_up" for name, _ in self.scrape())
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, self.stop()
                return False
        wait_for(ready, timeout=timeout, what="the exporter's first cycle")
        return self.scrape()

    def stop(self) -> str:
        """SIGTERM; return its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@contextlib.contextmanager
def exporter(*args: str) -> Iterator[Exporter]:
    running = Exporter(*args)
    try:
        yield running
    finally:
        running.stop()


def parse(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def value(series: Series, name: str, **labels: str) -> Optional[float]:
    found = [v for (n, lab), v in series.items() if n == name and set(labels.items()) <= set(lab)]
    assert len(found) <= 1, found
    return found[0] if found else None


def status_of(series: Series, domain: str) -> str:
    hot = [dict(lab)["status"] for (n, lab), v in series.items()
           if n == "virt_balloon_status" and dict(lab)["domain"] == domain and v == 1]
    assert len(hot) == 1, hot
    return hot[0]


# -- figures ----------------------------------------------------------------------------------------


def test_exporter_serves_what_virsh_reads(driver_guest, nodriver_guest):
    with exporter("--interval", "1", driver_guest, nodriver_guest) as running:
        series = running.wait_ready()
        assert value(series, "virt_balloon_up", uri=URI) == 1
        for _ in range(6):
            # The same guest update on both sides: exporter's last_update == virsh's.
            series = running.scrape()
            theirs = dommemstat(driver_guest)
            ours = value(series, "virt_balloon_last_update_seconds", domain=driver_guest)
            if ours == theirs["last_update"]:
                break
            time.sleep(0.3)
        else:
            pytest.fail("never saw the exporter and virsh on the same guest update")
        assert value(series, "virt_balloon_free_memory_bytes", domain=driver_guest) == theirs["unused"] * 1024
        available = value(series, "virt_balloon_available_memory_bytes", domain=driver_guest)
        assert available == theirs["usable"] * 1024
        assert value(series, "virt_balloon_minor_faults_total", domain=driver_guest) == theirs["minor_fault"]
        assert status_of(series, driver_guest) == "ok"
        assert status_of(series, nodriver_guest) == "never_updated"
        assert value(series, "virt_balloon_free_memory_bytes", domain=nodriver_guest) is None
        assert value(series, "virt_balloon_domains", uri=URI, status="ok") == 1
        assert value(series, "virt_balloon_libvirt_calls_total", call="qemuMonitorCommand") > 0
        # Each figure is the one read in the cycle it is served with.
        cycle_at = value(series, "virt_balloon_cycle_timestamp_seconds")
        sampled = value(series, "virt_balloon_sample_timestamp_seconds", domain=driver_guest)
        assert cycle_at <= sampled <= cycle_at + 1 + value(series, "virt_balloon_cycle_duration_seconds")


def test_default_listen_is_loopback_and_unknown_paths_are_404(driver_guest):
    """No --listen: 127.0.0.1:9474 only; nothing but / and /metrics is served, nothing is echoed."""
    proc = subprocess.Popen(
        [CLI, "exporter", "--interval", "5", driver_guest], stderr=subprocess.PIPE, text=True
    )
    try:
        def bound() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return _listening(9474) != []
        wait_for(bound, timeout=15, what="the exporter to listen")
        assert _listening(9474) == ["127.0.0.1"]
        probe = "/<b>nope</b>?x=%3Cscript%3E"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:9474{probe}", timeout=5)
        body = err.value.read().decode()
        assert err.value.code == 404 and body == "404 Not Found\n"
        with urllib.request.urlopen("http://127.0.0.1:9474/", timeout=5) as reply:
            assert 'href="/metrics"' in reply.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _listening(port: int) -> List[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return sorted(found)


def test_tls_with_a_self_signed_certificate(driver_guest, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    with exporter("--interval", "1", "--tls-cert", str(cert), "--tls-key", str(key), driver_guest) as running:
        context = ssl.create_default_context(cafile=str(cert))
        https = f"https://127.0.0.1:{running.port}"

        def answers() -> bool:
            try:
                return running.get("/metrics", context, https)[0] == 200
            except urllib.error.URLError:
                return False
        wait_for(answers, timeout=20, what="HTTPS")
        status, text = running.get("/metrics", context, https)
        assert status == 200 and value(parse(text), "virt_balloon_up", uri=URI) == 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{running.port}/metrics", timeout=5).read()


# -- faults -------------------------------------------------------------------------------------------


def test_scrapes_stay_fast_with_one_qemu_stopped(domains, driver_guest):
    # One new guest to stop; the healthy one is the session's, long booted (fewer boots at once).
    hung, healthy = domains.create("virtio", "exphung", wait_stats=True), driver_guest
    names = [hung, healthy]
    # A 3 s deadline: TCG guests on a loaded 2-core machine can take over 1 s to answer.
    with exporter("--interval", "1", "--timeout", "3", *names) as running:
        running.wait_ready()
        with stopped(hung):
            wait_for(lambda: status_of(running.scrape(), hung) == "unresponsive", timeout=10,
                     what=f"{hung} unresponsive")
            latencies = []
            for _ in range(10):
                began = time.monotonic()
                series = running.scrape()
                latencies.append(time.monotonic() - began)
                assert status_of(series, healthy) == "ok"
                time.sleep(0.2)
            assert max(latencies) < 0.5, latencies
            age = time.time() - value(series, "virt_balloon_last_update_seconds", domain=healthy)
            assert age < 2 * 2 + 5, age
        wait_for(lambda: status_of(running.scrape(), hung) == "ok", timeout=15, what=f"{hung} ok again")
        log = running.stop()
    assert log.count(f"{hung}: QEMU did not answer within") == 1, log
    assert log.count(f"{hung}: QEMU answers again") == 1, log
    assert "Traceback" not in log


def test_exporter_survives_a_libvirtd_restart(driver_guest):
    guest = driver_guest
    interval = 1.0
    with exporter("--interval", str(interval), guest) as running:
        running.wait_ready()
        with libvirtd_stopped():
            wait_for(lambda: value(running.scrape(), "virt_balloon_up", uri=URI) == 0, timeout=10,
                     what="virt_balloon_up 0")
            series = running.scrape()  # the exporter keeps answering
            assert status_of(series, guest) == "unreachable"
        answering = time.time()
        wait_for(
            lambda: value(running.scrape(), "virt_balloon_up", uri=URI) == 1
            and status_of(running.scrape(), guest) == "ok",
            timeout=2 * interval + 2,
            what="fresh figures within two intervals",
        )
        assert value(running.scrape(), "virt_balloon_cycle_timestamp_seconds") >= answering - interval
        log = running.stop()
    assert log.count("lost the libvirt connection; reconnecting") == 1, log
    assert log.count("reconnected") == 1, log
    assert "Traceback" not in log


def test_sigterm_stops_the_exporter_within_a_second(driver_guest):
    running = Exporter("--interval", "1", driver_guest)
    try:
        running.wait_ready()
        began = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        code = running.proc.wait(timeout=10)
        took = time.monotonic() - began
    finally:
        log = running.stop()
    assert code == 0 and took < 1.0, (code, took, log)


# -- textfile and stream ---------------------------------------------------------------------------------


def test_textfile_is_never_seen_partial(driver_guest, nodriver_guest, tmp_path):
    """A reader polling the file while it is rewritten many times always reads a whole, parseable file."""
    target = tmp_path / "virt_balloon_stats.prom"
    subprocess.run([CLI, "stats", "--textfile", str(target), driver_guest], check=True, timeout=60)
    seen: Dict[str, int] = {}  # each distinct content read, and how often
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            text = target.read_text()
            seen[text] = seen.get(text, 0) + 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(15):
            proc = subprocess.run(
                [CLI, "stats", "--textfile", str(target), driver_guest, nodriver_guest],
                capture_output=True, text=True, timeout=60,
            )
            assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    finally:
        done.set()
        thread.join()
    assert sum(seen.values()) > 15 and len(seen) > 5  # many reads, across many rewrites
    for text in seen:
        series = parse(text)
        assert value(series, "virt_balloon_up", uri=URI) == 1
        assert text.endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left


def test_stream_prints_parseable_lines_each_cycle(driver_guest, nostats_guest):
    proc = subprocess.run(
        [CLI, "stream", "--interval", "1", "--count", "3", driver_guest, nostats_guest],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["domain"] for d in docs] == [driver_guest, nostats_guest] * 3
    assert {d["status"] for d in docs if d["domain"] == driver_guest} == {"ok"}
    stamps = [d["sampled_at"] for d in docs if d["domain"] == driver_guest]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 1.5


def test_stream_into_head_exits_0_quietly(driver_guest, nostats_guest):
    proc = subprocess.run(
        f"{CLI} stream --interval 1 {driver_guest} {nostats_guest} | head -1",
        shell=True, capture_output=True, text=True, timeout=60, executable="/bin/bash",
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["domain"] == driver_guest
    piped = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {CLI} stream --interval 1 {driver_guest} | head -1 >/dev/null"],
        capture_output=True, text=True, timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert "Traceback" not in piped.stderr and "Broken pipe" not in piped.stderr


def test_stream_ends_after_the_current_line_on_sigterm(driver_guest):
    proc = subprocess.Popen(
        [CLI, "stream", "--interval", "1", driver_guest],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    assert first.endswith("\n") and (rest == "" or rest.endswith("\n"))
    for line in [first] + rest.splitlines():
        assert json.loads(line)["domain"] == driver_guest  # whole lines only


def test_read_only_exporter_serves_libvirts_figures_without_tainting(domains):
    """``-r exporter --source libvirt``: a read-only connection, no passthrough, so no taint."""
    name = domains.create("virtio", "ro", wait_stats=True)
    port = free_port()
    proc = subprocess.Popen(
        [CLI, "-r", "exporter", "--source", "libvirt", "--interval", "1", "--listen", f"127.0.0.1:{port}",
         name],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        def ok() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    series = parse(reply.read().decode())
            except OSError:
                return False
            return any(n == "virt_balloon_status" for n, _ in series) and status_of(series, name) == "ok"
        wait_for(ok, timeout=20, what="the read-only exporter's figures")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            series = parse(reply.read().decode())
        theirs = dommemstat(name)
        assert value(series, "virt_balloon_actual_bytes", domain=name) == theirs["actual"] * 1024
        assert value(series, "virt_balloon_libvirt_calls_total", call="qemuMonitorCommand") is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    info = subprocess.run(["virsh", "-c", URI, "dominfo", name], capture_output=True, text=True).stdout
    assert "tainted" not in info, info

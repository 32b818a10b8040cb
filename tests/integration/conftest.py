"""Integration fixtures: real libvirtd, real QEMU, real guests from contrib/testbed.

Every domain made here is transient and named with the testbed prefix
(``vbs-tb-``), and destroyed when its test or session ends. Nothing else on
the host is touched. Under ``CI=true`` a testbed that cannot be reached fails
the test; elsewhere it is skipped with the command that brings it up.

``--count N`` runs each fault-trial test (those taking ``repetition``) N
times: ``tox -e stress -- --count N``. The run ends with one line counting
their trials and the healthy-domain readings they checked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import libvirt
import pytest

from tests.ci import unavailable

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "contrib" / "testbed" / "vbs-testbed"
PREFIX = "vbs-tb-"
#: Which testbed stack the run is against (contrib/testbed/vbs-testbed --stack):
#: debian12 (the host's libvirt 9.0 + QEMU 7.2) or next (libvirt 11 + QEMU 10).
STACK = os.environ.get("VBS_TESTBED_STACK") or "debian12"


#: Whether the tests run inside the next stack's own root, with that root's
#: libvirt client (contrib/testbed/run-in-root): the testbed marks its roots
#: with a stamp at their "/", and its script knows that stack there too.
IN_STACK_ROOT = Path("/.vbs-testbed-root.json").exists()


def _stack_info() -> Dict[str, str]:
    """The testbed's own account of the stack: its header line, URIs and root."""
    try:
        proc = subprocess.run(
            [str(TESTBED), "stack", "--uris"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    info = dict(line.partition(": ")[::2] for line in proc.stdout.splitlines())
    if proc.returncode != 0:
        info["error"] = proc.stderr.strip()
    return info


STACK_INFO = _stack_info()
if STACK != "debian12" and "uri" in STACK_INFO:
    # Every client the tests start (the CLI, virsh, libvirt.open) then talks
    # to the chosen stack's daemon without being told. Inside the stack's
    # root its daemon is the local one.
    os.environ["LIBVIRT_DEFAULT_URI"] = "qemu:///system" if IN_STACK_ROOT else STACK_INFO["uri"]
URI = os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
TCP_URI = STACK_INFO.get("tcp") or "qemu+tcp://127.0.0.1/system"
#: The stack's root as this process sees it.
STACK_ROOT = Path("/" if IN_STACK_ROOT else STACK_INFO.get("root") or "/")
#: Where the stack's libvirtd keeps each QEMU's pid file, and each QEMU's log.
QEMU_RUN_DIR = STACK_ROOT / "run" / "libvirt" / "qemu"
QEMU_LOG_DIR = STACK_ROOT / "var" / "log" / "libvirt" / "qemu"


def _binding_version() -> str:
    try:
        return importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:  # a binding installed without metadata
        return "?"


def pytest_report_header(config: Any) -> List[str]:
    """The stack under test, as its daemon reports it, and the client library on this side."""
    client = libvirt.getVersion()
    line = STACK_INFO.get("stack") or f"unknown ({STACK_INFO.get('error', 'no answer')})"
    return [
        f"stack: {line}",
        f"client: libvirt {client // 1000000}.{client // 1000 % 1000}.{client % 1000}, "
        f"libvirt-python {_binding_version()}, Python {platform.python_version()}",
    ]


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--count", type=int, default=1, metavar="N",
        help="run each fault-trial test of the isolation tests N times (tox -e stress -- --count N)",
    )


def pytest_generate_tests(metafunc: Any) -> None:
    """A test that takes ``repetition`` runs ``--count`` times, as ``[round1]``, ``[round2]``..."""
    if "repetition" in metafunc.fixturenames:
        count = metafunc.config.getoption("count")
        if count < 1:
            raise pytest.UsageError(f"--count must be 1 or more, not {count}")
        metafunc.parametrize("repetition", range(1, count + 1), ids=lambda n: f"round{n}")


@dataclasses.dataclass
class Tally:
    """What the fault trials checked, summed over the run for its closing line."""

    trials: int = 0
    sigstops: int = 0
    healthy_checked: int = 0
    healthy_not_ok: int = 0
    slowest_recovery: float = 0.0
    slowest_trial: str = ""


ISOLATION = Tally()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ISOLATION.trials:
        terminalreporter.write_line(
            f"isolation: {ISOLATION.trials} trials, {ISOLATION.sigstops} SIGSTOPs, "
            f"{ISOLATION.healthy_checked} healthy-domain readings checked, "
            f"{ISOLATION.healthy_not_ok} not ok; "
            f"slowest return to ok after SIGCONT {ISOLATION.slowest_recovery:.1f} s "
            f"({ISOLATION.slowest_trial})"
        )


def _unreachable(reason: str) -> None:
    unavailable(f"testbed unreachable ({reason}); run: sudo {TESTBED} setup && sudo {TESTBED} up --tcp")


def testbed(*args: str, timeout: float = 180) -> str:
    """Run the testbed script; return its stdout, fail the test on error."""
    proc = subprocess.run(
        [str(TESTBED), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"vbs-testbed {' '.join(args)} failed: {proc.stderr.strip()}", pytrace=False)
    return proc.stdout.strip()


@pytest.fixture(scope="session", autouse=True)
def _silence_libvirt() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Connection:
    """The session's libvirt connection, opened again when a test restarted libvirtd.

    Fault tests stop and start libvirtd; running domains survive that, but a
    connection does not, and the tests after them need a live one.
    """

    def __init__(self) -> None:
        self._conn: "Optional[libvirt.virConnect]" = None

    def get(self) -> "libvirt.virConnect":
        if self._conn is not None:
            # isAlive() trusts the socket until a write fails; one cheap round trip tells.
            try:
                self._conn.getLibVersion()
                return self._conn
            except libvirt.libvirtError:
                self.close()
        try:
            self._conn = libvirt.open(URI)
        except libvirt.libvirtError as err:
            _unreachable(str(err))
            raise
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Connection]:
    """The testbed's libvirtd must answer; tests take a live connection from here."""
    holder = Connection()
    holder.get()
    yield holder
    holder.close()


@pytest.fixture
def conn(libvirt_conn: Connection) -> "libvirt.virConnect":
    """A read-write connection to the testbed's libvirtd, live at the start of the test."""
    return libvirt_conn.get()


def _name(tag: str) -> str:
    return f"{PREFIX}{tag}-{uuid.uuid4().hex[:6]}"


class Domains:
    """Creates testbed domains and destroys exactly those afterwards."""

    def __init__(self) -> None:
        self.names: List[str] = []

    def create(self, variant: str, tag: str, *options: str, wait_stats: bool = False, name: str = "") -> str:
        name = name or _name(tag)
        args = ["create", variant, "--name", name, *options]
        if wait_stats:
            args += ["--wait-stats", "90"]
        self.names.append(name)
        testbed(*args)
        return name

    def destroy_all(self) -> None:
        if self.names:
            subprocess.run([str(TESTBED), "destroy", *self.names], capture_output=True, timeout=120)
            self.names.clear()


@pytest.fixture(scope="session")
def session_domains(libvirt_conn: Connection) -> Iterator[Domains]:
    d = Domains()
    yield d
    d.destroy_all()


@pytest.fixture
def domains(conn: "libvirt.virConnect") -> Iterator[Domains]:
    """Per-test domains, for tests that change them (suspend, setmem, period)."""
    d = Domains()
    yield d
    d.destroy_all()


# Shared guests that tests only read: created once per test session, destroyed
# at its end.


@pytest.fixture(scope="session")
def driver_guest(session_domains: Domains) -> str:
    """virtio balloon, stats period 2, driver answering."""
    return session_domains.create("virtio", "drv", wait_stats=True)


@pytest.fixture(scope="session")
def nodriver_guest(session_domains: Domains) -> str:
    """Balloon device present, no driver in the guest."""
    return session_domains.create("virtio", "nodrv", "--guest", "nodriver")


@pytest.fixture(scope="session")
def nostats_guest(session_domains: Domains) -> str:
    """virtio balloon without a <stats> element: polling interval 0."""
    return session_domains.create("nostats", "nostats", wait_stats=True)


@pytest.fixture(scope="session")
def transitional_guest(session_domains: Domains) -> str:
    """virtio-transitional with the user alias ua-mybal."""
    return session_domains.create("transitional", "trans", wait_stats=True)


@pytest.fixture(scope="session")
def none_guest(session_domains: Domains) -> str:
    """<memballoon model='none'/>."""
    return session_domains.create("none", "none")


@pytest.fixture(scope="session")
def stale_guest(session_domains: Domains) -> str:
    """Driver answers for 6 s, then stops: last-update freezes, interval stays 2."""
    name = session_domains.create("virtio", "stale", "--guest", "stop", "--stop-after", "6", wait_stats=True)
    wait_for(lambda: _age(name) > 2 * 2 + 5 + 2, timeout=60, what=f"{name} to go stale")
    return name


def _age(name: str) -> float:
    out = subprocess.run(["virsh", "-c", URI, "dommemstat", name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "last_update" and int(value) > 0:
            return time.time() - int(value)
    return 0.0


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, step: float = 0.5) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)


def create_many(domains: Domains, count: int, variant: str, tag: str, *options: str, wait: bool) -> List[str]:
    """Create ``count`` domains at once (their boots overlap); return their names."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(domains.create, variant, f"{tag}{i}", *options, wait_stats=wait) for i in range(count)
        ]
        return sorted(f.result() for f in futures)


@pytest.fixture(scope="module")
def four_guests(libvirt_conn) -> Iterator[List[str]]:
    """Four real guests whose balloon driver answers (stats period 2)."""
    domains = Domains()
    try:
        yield create_many(domains, 4, "virtio", "col", wait=True)
    finally:
        domains.destroy_all()

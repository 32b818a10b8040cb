"""Loading the recorded testbed fixtures, and wiring them into the real package.

Scenarios and what a sample of each must say are listed once here, so every
test module iterates over the same recordings.

There are two recorded sets, one per testbed stack (:data:`STACKS`):
``debian12`` (libvirt 9.0, QEMU 7.2, a Linux 6.1 guest) in
``tests/fixtures/recorded/`` and ``next`` (libvirt 11.3, QEMU 10.0, a Linux
6.12 guest) in ``tests/fixtures/recorded/next/``. Every loader takes the
stack and defaults to ``debian12``; the tests about what libvirt and QEMU
answered run over both, through :func:`stack_scenarios` or the ``stack``
fixture.
"""

from __future__ import annotations

import atexit
import collections
import copy
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import libvirt
import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from tests.ci import unavailable
from tests.fakelibvirt import FakeConnect, FakeDomain, RecordedTransport, RPCModel, error_from_record
from virt_balloon_stats.client import BalloonStats
from virt_balloon_stats.domxml import parse_balloon
from virt_balloon_stats.events import start_event_loop
from virt_balloon_stats.host import Guest, Host
from virt_balloon_stats.transport import QMPClient

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "recorded"
URI = "qemu:///system"

#: The testbed stacks with a recorded set, and where each set is.
RECORDED_SETS: Dict[str, Path] = {"debian12": RECORDED, "next": RECORDED / "next"}
STACKS: Tuple[str, ...] = tuple(RECORDED_SETS)

#: Scenario -> the status a sample must give, with the clock pinned at the
#: moment the recorder read memoryStats() (the file's ``memory_stats_at``).
#: The same on both stacks. ``reset`` is in the next set only (the debian12
#: set predates the scenario): read right after a machine reset, QEMU 10.0
#: says last-update 0 and every figure unsupported.
EXPECTED_STATUS: Dict[str, str] = {
    "virtio": "ok",
    "virtio-hog": "ok",
    "transitional": "ok",
    "nostats": "polling_disabled",
    "nodriver": "never_updated",
    "noos": "never_updated",
    "stale": "stale",
    "paused": "paused",
    "none": "no_balloon",
    "reset": "never_updated",
    "step": "ok",  # as recorded before its step; the step and what followed are under "set_memory"
}


@functools.lru_cache(maxsize=None)
def _read(name: str, stack: str) -> Any:
    return json.loads((RECORDED_SETS[stack] / f"{name}.json").read_text())


def load(name: str, stack: str = "debian12") -> Dict[str, Any]:
    """A fresh copy of one recorded scenario of one stack (tests may edit their copy)."""
    return copy.deepcopy(_read(name, stack))


@functools.lru_cache(maxsize=None)
def _scenario_names(stack: str) -> Tuple[str, ...]:
    folder = RECORDED_SETS[stack]
    return tuple(sorted(p.stem for p in folder.glob("*.json") if p.stem != "libvirt-errors"))


def scenario_names(stack: str = "debian12") -> List[str]:
    """Every recorded domain scenario of one stack (not the libvirt error cases)."""
    return list(_scenario_names(stack))


def stack_scenarios(
    only: Optional[Collection[str]] = None, exclude: Collection[str] = ()
) -> List[Any]:
    """``(stack, name)`` parameters over every recorded set, with ids like ``next-virtio``.

    :param only: Just these scenarios (where a stack has them), else all.
    :param exclude: Scenarios left out.
    """
    return [
        pytest.param(stack, name, id=f"{stack}-{name}")
        for stack in STACKS
        for name in scenario_names(stack)
        if (only is None or name in only) and name not in exclude
    ]


@pytest.fixture(params=STACKS)
def stack(request: Any) -> str:
    """Each recorded set in turn: the test runs once per stack, as ``[debian12]`` and ``[next]``."""
    return str(request.param)


def libvirt_errors(stack: str = "debian12") -> List[Dict[str, Any]]:
    """The libvirt errors recorded on one stack of the testbed, one per case."""
    return copy.deepcopy(_read("libvirt-errors", stack))


def libvirt_error_record(case: str, stack: str = "debian12") -> Dict[str, Any]:
    """One recorded libvirt error case by name."""
    for record in libvirt_errors(stack):
        if record["case"] == case:
            return record
    raise KeyError(case)


def recorded_error(case: str, stack: str = "debian12") -> Any:
    """The real ``libvirtError`` of one recorded case."""
    return error_from_record(libvirt_error_record(case, stack))


def qmp_replies(fixture: Mapping[str, Any], command: Mapping[str, Any]) -> List[Any]:
    """The parsed replies recorded for one command dict, in order."""
    return [json.loads(q["reply"]) for q in fixture["qmp"] if q["command"] == command]


def balloon(fixture: Mapping[str, Any], inactive: bool = False) -> Any:
    """The recorded XML's balloon device, through the package's parser."""
    return parse_balloon(fixture["xml_inactive" if inactive else "xml_live"])


def now_for(fixture: Mapping[str, Any]) -> float:
    """The pinned clock of a scenario: when the recorder read memoryStats() on the testbed."""
    return float(fixture["memory_stats_at"])


class World:
    """Fake libvirt domains and connection, the recorded QMP replies, and the real client on top.

    :param rpc: How the fake connections serve calls made at once (see
        :class:`~tests.fakelibvirt.RPCModel`); default: any number at once.
    :param lanes: The host opens more connections to the fake hypervisor for
        its lanes (:meth:`FakeConnect.another` as its ``reopen``).
    :param stack: The recorded set whose "domain not found" error the fake
        connection gives.
    """

    def __init__(
        self,
        fixtures: Iterable[Mapping[str, Any]],
        *,
        domains: Optional[List[FakeDomain]] = None,
        qmp_raises: Iterable[Tuple[Mapping[str, Any], Any]] = (),
        busy: Iterable[str] = (),
        now: float = 0.0,
        rpc: Optional[RPCModel] = None,
        lanes: bool = False,
        stack: str = "debian12",
    ) -> None:
        self.fixtures = list(fixtures)
        self.domains = domains if domains is not None else [FakeDomain(f) for f in self.fixtures]
        # The host's memory as recorded with the step scenario, by any fixture that has it.
        node = next((f["node_memory_stats"] for f in self.fixtures if "node_memory_stats" in f), None)
        self.conn = FakeConnect(
            self.domains, not_found=libvirt_error_record("unknown-domain", stack), busy=busy, rpc=rpc,
            node_memory_stats=node,
        )
        self.transport = RecordedTransport(*self.fixtures, raises=tuple(qmp_raises))
        self.host = Host(self.conn, URI, reopen=self.conn.another if lanes else None)
        self.client = BalloonStats(self.host, QMPClient(self.transport), clock=lambda: now)

    @property
    def domain(self) -> FakeDomain:
        """The first (often only) domain."""
        return self.domains[0]

    def guest(self, index: int = 0) -> Guest:
        """A Guest on one fake domain, counted on the host's counter."""
        return Guest(self.domains[index], self.host.counter)


def world(name: str, stack: str = "debian12", **kwargs: Any) -> World:
    """A World of one recorded scenario of one stack, its clock pinned for that scenario."""
    fixture = load(name, stack)
    kwargs.setdefault("now", now_for(fixture))
    return World([fixture], stack=stack, **kwargs)


def missing(what: str) -> None:
    """A tool a test needs is absent: fail under ``CI=true`` (contrib/run-tests installs it), else skip."""
    unavailable(f"{what} is missing; contrib/run-tests installs it")


def wait_until(predicate: Callable[[], object], within: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``within`` seconds pass; its last answer."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


@pytest.fixture
def virtio() -> Dict[str, Any]:
    """The plain, healthy scenario."""
    return load("virtio")


# -- property-based tests ------------------------------------------------------------------

# Fresh cases on every run, none kept: no example database, and Hypothesis'
# caches go to a scratch directory instead of .hypothesis/. print_blob makes a
# failure reproducible all the same (@reproduce_failure).
settings.register_profile("ci", database=None, deadline=None, derandomize=False, print_blob=True)
settings.load_profile("ci")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="vbs-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

#: Cases run by each property-based test (see :func:`counted`), summed at the end of the run.
PROPERTY_CASES: "collections.Counter[str]" = collections.Counter()


def counted(test: Callable[..., None]) -> Callable[..., None]:
    """Count every case Hypothesis runs through ``test``; put it under ``@given``."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        PROPERTY_CASES[test.__name__] += 1
        test(*args, **kwargs)

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The total the reliability issue asks for: at least 10,000 per CI run."""
    total = sum(PROPERTY_CASES.values())
    if total:
        terminalreporter.write_line(f"property-based cases generated: {total}")


@pytest.fixture
def ticks() -> Iterator[List[float]]:
    """libvirt's own event loop running (no daemon needed), with a 5 ms timer counting its turns."""
    start_event_loop()
    seen: List[float] = []
    timer = libvirt.virEventAddTimeout(5, lambda _timer, _opaque: seen.append(time.monotonic()), None)
    try:
        assert wait_until(lambda: len(seen) > 3, within=5.0), "libvirt's event loop does not run"
        yield seen
    finally:
        libvirt.virEventRemoveTimeout(timer)

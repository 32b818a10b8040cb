"""The package's floors: every import runs down, and the API scripts use stays as it is.

:data:`LAYERS` is the architecture in one table, lowest floor first. A
module imports only modules on floors below its own, and one on its own
floor only where the floor says so. Every import counts, wherever it
stands: at the top, inside a function (the lazy ones that keep start-up
fast) or under ``TYPE_CHECKING``. A new module goes on a floor here before
its tests pass.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Set, Tuple

import pytest

import virt_balloon_stats

PACKAGE = "virt_balloon_stats"
ROOT = Path(virt_balloon_stats.__file__).resolve().parent


class Floor(NamedTuple):
    what: str
    modules: FrozenSet[str]
    #: (importer, imported) pairs allowed within the floor.
    sideways: FrozenSet[Tuple[str, str]] = frozenset()


#: Module names are relative to the package; ``__init__`` is the package itself.
LAYERS: Tuple[Floor, ...] = (
    Floor("the exception tree", frozenset({"errors"})),
    Floor(
        "call scheduling, worker threads, libvirt's event loop: nothing of the package but its errors",
        frozenset({"lanes", "pool", "events"}),
    ),
    Floor(
        "pure QMP messages, domain XML, stat table and interval checks; the libvirt edge",
        frozenset({"qmp", "domxml", "stats", "polling", "host"}),
    ),
    Floor(
        "the QMP passthrough (the only importer of libvirt_qemu); QEMU's figures against libvirt's; "
        "reclaim advice from a domain's history",
        frozenset({"transport", "crosscheck", "advice"}),
    ),
    Floor("acting on advice: each guest's next balloon step, from figures alone", frozenset({"stepping"})),
    Floor("QOM path resolution", frozenset({"qompath"})),
    Floor("one domain's figures at one moment", frozenset({"sample"})),
    Floor("one domain's reading as data: memo, its QEMU half, libvirt's side", frozenset({"reading"})),
    Floor(
        "one connection's API; samples rendered for people, scripts and Nagios",
        frozenset({"client", "formats", "nagios"}),
    ),
    Floor(
        "reclaim advice for libvirt's domains: their limits and a history's points in, renderings out",
        frozenset({"advising"}),
    ),
    Floor("a cycle's call scheduling: one call out per domain, bulk calls", frozenset({"rounds"})),
    Floor("every multi-domain reading", frozenset({"collector"})),
    Floor(
        "the history advice reads: points in a SQLite file, one writer (the only importer of sqlite3), "
        "or made by PromQL from a Prometheus server",
        frozenset({"history", "promhistory"}),
    ),
    Floor(
        "built on the collector: the scripts' BalloonStats, the live view, JSON Lines, Prometheus, "
        "the history's recorder",
        frozenset({"facade", "watch", "stream", "metrics", "exporter", "recorder"}),
        frozenset({("exporter", "metrics")}),
    ),
    Floor(
        "history kept by a long-running collector: each cycle recorded, advice refreshed and served",
        frozenset({"keeper"}),
    ),
    Floor(
        "acting on advice for libvirt's domains: a cycle's figures in, balloon steps out, kept and counted",
        frozenset({"ballooning"}),
    ),
    Floor("the package's face: its public names, loaded on first use", frozenset({"__init__"})),
    Floor("the command line's Run and shared options", frozenset({"cli.common"})),
    Floor(
        "the command families: one-shot reads, polling control, long-running, reclaim advice",
        frozenset({"cli.reads", "cli.control", "cli.long_running", "cli.advising"}),
    ),
    Floor("the command line's parsing and dispatch", frozenset({"cli"})),
    Floor("the entry point", frozenset({"__main__"})),
)

#: Libraries outside the standard one, and the only modules that import them.
OUTSIDE: Dict[str, FrozenSet[str]] = {
    "libvirt": frozenset({"host", "events"}),
    "libvirt_qemu": frozenset({"transport"}),
    "lxml": frozenset({"domxml"}),
    "prometheus_client": frozenset({"metrics", "exporter", "advising", "keeper", "ballooning"}),
    "sqlite3": frozenset({"history"}),
}

FLOOR_OF = {module: number for number, floor in enumerate(LAYERS) for module in floor.modules}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


class Import(NamedTuple):
    line: int
    target: str  # a module of the package, relative to it; else the top-level name imported
    inside: bool  # of the package


def _imports(module: str) -> Iterator[Import]:
    """Every import statement of ``module``, resolved to modules of the package or outside it.

    The package imports itself by absolute names only (a relative import fails here).
    """
    path = MODULES[module]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _resolve(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}, line {node.lineno}: a relative import"
            for alias in node.names:
                yield _resolve(node.lineno, node.module or "", alias.name)


def _resolve(line: int, name: str, member: str = "") -> Import:
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return Import(line, name.split(".")[0], False)
    relative = name[len(PACKAGE) + 1:] or "__init__"
    submodule = member if relative == "__init__" else f"{relative}.{member}"
    if member and submodule in MODULES:
        return Import(line, submodule, True)  # from virt_balloon_stats import metrics
    return Import(line, relative, True)


def _package_imports(module: str) -> List[Import]:
    return [i for i in _imports(module) if i.inside and i.target != module]


def test_every_module_is_on_one_floor():
    """The table and the package's files name the same modules."""
    listed: Set[str] = set()
    for floor in LAYERS:
        assert not listed & floor.modules, f"on two floors: {sorted(listed & floor.modules)}"
        listed |= floor.modules
    assert sorted(set(MODULES) - listed) == [], "modules on no floor: add them to LAYERS"
    assert sorted(listed - set(MODULES)) == [], "floors name modules that do not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down(module):
    """No import from a lower floor to a higher one, nor sideways unless the floor allows it."""
    floor = FLOOR_OF[module]
    wrong = [
        f"line {i.line}: {module} (floor {floor + 1}) imports {i.target} (floor {FLOOR_OF[i.target] + 1})"
        if i.target in FLOOR_OF
        else f"line {i.line}: {module} imports {i.target}, which is no module of the package"
        for i in _package_imports(module)
        if FLOOR_OF.get(i.target, len(LAYERS)) > floor
        or (FLOOR_OF[i.target] == floor and (module, i.target) not in LAYERS[floor].sideways)
    ]
    assert wrong == []


def test_sideways_imports_the_table_allows_are_there():
    """The table says what is: an allowed sideways import the code no longer makes is struck from it."""
    for floor in LAYERS:
        for importer, imported in floor.sideways:
            assert importer in floor.modules and imported in floor.modules
            assert imported in {i.target for i in _package_imports(importer)}, (importer, imported)


@pytest.mark.parametrize("library", sorted(OUTSIDE))
def test_only_the_edge_imports_libraries_outside(library):
    """libvirt only at the libvirt edge, libvirt_qemu only in the transport, and so on."""
    importers = {m for m in MODULES if any(i.target == library for i in _imports(m))}
    assert importers == OUTSIDE[library]


# -- the public API ------------------------------------------------------------------------

#: ``virt_balloon_stats.__all__``, as scripts import it.
PUBLIC_NAMES = [
    "BalloonStats", "Collector", "Cycle", "HostState", "Problem", "Sample", "SOURCES", "Status",
    "GuestStats", "StatSpec", "STATS", "PollingState", "QOMPath", "BalloonDevice", "CrossCheck", "Result",
    "Verdict", "Guest", "Host", "default_uri", "human_bytes", "silence_libvirt_stderr", "BalloonStatsError",
    "InvalidArgument", "LibvirtFailure", "ConnectionFailed", "DomainNotFound", "DomainNotRunning",
    "OperationDenied", "UnsupportedHypervisor", "OperationTimedOut", "TooManyCallsStuck", "QMPFailure",
    "CommandNotAllowed", "QMPExecuteError", "QMPBadReply", "InvalidDomainXML", "NoBalloonDevice",
    "QOMPathNotFound", "QEMUUnresponsive",
]

#: What scripts call: each public method with how it is called (``=...``: optional), or ``property``.
PUBLIC_MEMBERS = {
    "BalloonStats": {
        "__init__": "host, qmp=..., *, grace=..., refresh=..., clock=..., monotonic=...",
        "open": "uri=..., *, readonly=..., grace=...",
        "close": "",
        "rpc_counts": "property",
        "guest": "ref",
        "guests": "refs=...",
        "balloon_device": "ref, *, inactive=...",
        "qom_path": "ref",
        "polling": "ref",
        "set_polling_interval": "ref, seconds, *, via=..., live=..., config=...",
        "rearm": "ref, *, via=...",
        "sample": "ref, source=..., *, memo=..., timeout=...",
        "sample_many": "refs=..., source=..., *, workers=..., timeout=...",
        "begin_sample": "ref, source=..., *, memo=..., crosscheck=...",
        "finish_sample": "reading, record=...",
        "begin_calls": "source, memo, crosscheck=...",
        "finish_from_record": "reading, record",
    },
    "Collector": {
        "__init__": "uris=..., *, clients=..., domains=..., source=..., timeout=..., workers=..., "
        "events=..., readonly=..., crosscheck_every=..., grace=..., log_changes=..., opener=..., clock=...",
        "collect": "timeout=...",
        "start": "interval, on_cycle=...",
        "run": "interval, on_cycle=..., *, count=...",
        "stop": "*, close=..., wait=...",
        "request_stop": "",
        "last": "property",
        "stopping": "property",
        "threads": "property",
    },
    "Sample": {"get": "name", "to_dict": "", "age_seconds": "property", "last_update": "property"},
    "Cycle": {"statuses": "property"},
}

#: The fields of the values scripts read.
PUBLIC_FIELDS = {
    "Sample": [
        "uri", "domain", "uuid", "id", "state", "source", "sampled_at", "status", "message", "polling",
        "crosscheck", "qom_path", "stats", "actual_bytes", "libvirt", "error",
    ],
    "Cycle": ["number", "started_at", "duration", "samples", "hosts", "problems", "calls", "errors"],
    "Problem": ["what", "uri", "error"],
}

#: The exception tree: each public error and its parent.
ERROR_TREE = {
    "BalloonStatsError": "Exception",
    "InvalidArgument": "BalloonStatsError",
    "LibvirtFailure": "BalloonStatsError",
    "ConnectionFailed": "LibvirtFailure",
    "DomainNotFound": "LibvirtFailure",
    "DomainNotRunning": "LibvirtFailure",
    "OperationDenied": "LibvirtFailure",
    "UnsupportedHypervisor": "LibvirtFailure",
    "OperationTimedOut": "LibvirtFailure",
    "TooManyCallsStuck": "LibvirtFailure",
    "QMPFailure": "BalloonStatsError",
    "CommandNotAllowed": "QMPFailure",
    "QMPExecuteError": "QMPFailure",
    "QMPBadReply": "QMPFailure",
    "InvalidDomainXML": "BalloonStatsError",
    "NoBalloonDevice": "BalloonStatsError",
    "QOMPathNotFound": "BalloonStatsError",
    "QEMUUnresponsive": "BalloonStatsError",
}

CHANGED = (
    "the public API changed: keep the old way working for one release (an alias that warns "
    "with DeprecationWarning, and a test of it), then change this table"
)


def _call(cls: type, name: str) -> str:
    """How a method is called, parameter names and kinds only (``=...``: has a default)."""
    member = inspect.getattr_static(cls, name)
    if isinstance(member, property):
        return "property"
    if isinstance(member, classmethod):
        member = getattr(cls, name)
    words: List[str] = []
    for p in inspect.signature(member).parameters.values():
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.KEYWORD_ONLY and "*" not in words:
            words.append("*")
        words.append(p.name if p.default is p.empty else f"{p.name}=...")
    return ", ".join(words)


def test_public_names_are_unchanged():
    """``from virt_balloon_stats import X`` works for the same names as before, and only those."""
    assert virt_balloon_stats.__all__ == PUBLIC_NAMES, CHANGED
    missing = [name for name in PUBLIC_NAMES if getattr(virt_balloon_stats, name, None) is None]
    assert missing == []
    assert set(PUBLIC_NAMES) <= set(dir(virt_balloon_stats))


@pytest.mark.parametrize("owner", sorted(PUBLIC_MEMBERS))
def test_public_methods_are_called_as_before(owner):
    cls = getattr(virt_balloon_stats, owner)
    shown = {name: _call(cls, name) for name in PUBLIC_MEMBERS[owner] if hasattr(cls, name)}
    assert shown == PUBLIC_MEMBERS[owner], CHANGED


@pytest.mark.parametrize("owner", sorted(PUBLIC_FIELDS))
def test_public_fields_are_unchanged(owner):
    cls = getattr(virt_balloon_stats, owner)
    assert [f.name for f in dataclasses.fields(cls)] == PUBLIC_FIELDS[owner], CHANGED


def test_the_error_tree_is_unchanged():
    """A script's ``except`` clauses catch what they caught before."""
    tree = {name: getattr(virt_balloon_stats, name).__bases__[0].__name__ for name in ERROR_TREE}
    assert tree == ERROR_TREE, CHANGED

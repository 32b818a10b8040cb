"""The ``advise`` command: libvirt's domains, a real history file, the advice rendered three ways.

Each command runs in-process (``cli.main``) over the fake libvirt World of
recorded domains (``tests/unit/conftest.py``): ``libvirt.open`` hands the
command the World's connection, and everything above it (Host, Guest, the
domain XML parser, the history store, the advice) is the real code. The
history is a real SQLite file in ``tmp_path``, written through
:class:`~virt_balloon_stats.history.History` with synthetic points, or
through the :class:`~virt_balloon_stats.recorder.Recorder` from real
collector cycles over the recordings. Outputs are parsed back: JSON with
``json``, the table by its columns, Prometheus with ``prometheus_client``'s
own parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakelibvirt import FakeDomain
from tests.unit.conftest import URI, World, load, recorded_error
from tests.unit.test_domxml_memory import with_memtune
from virt_balloon_stats.advice import Advice, Limits, Point, Policy, advise
from virt_balloon_stats.advising import DomainAdvice, advise_guest, limits_of, render_advice_table
from virt_balloon_stats.cli import main
from virt_balloon_stats.cli.common import duration, spell_duration
from virt_balloon_stats.collector import Collector
from virt_balloon_stats.history import SCHEMA_VERSION, History
from virt_balloon_stats.recorder import Recorder

MiB = 2**20
HOUR = 3600.0
DAY = 24 * HOUR
STEP = 300.0

#: The JSON document's keys, in order (README, "Advice").
JSON_KEYS = [
    "domain", "uuid", "actual", "recommended", "reclaimable", "demand", "confidence", "history_seconds",
    "pressure_events", "reason",
]
COLUMNS = [
    "DOMAIN", "ACTUAL", "RECOMMENDED", "RECLAIMABLE", "DEMAND", "CONFIDENCE", "HISTORY", "PRESSURE", "REASON",
]


# -- the duration parser -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("8d", 8 * DAY), ("36h", 36 * HOUR), ("90m", 5400.0), ("300s", 300.0), ("300", 300.0),
        ("1.5h", 5400.0), (".5m", 30.0), (" 2d ", 2 * DAY), ("0.001", 0.001), ("007h", 7 * HOUR),
    ],
)
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "d", "8 days", "8D", "-1h", "1h30m", "1e3", "nan", "inf", "0", "0s", "0.0h", "1,5h", "8dd",
     "9" * 400 + "d", "٣h"],
)
def test_anything_else_is_refused_with_what_to_give(text):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        duration(text)
    message = str(caught.value)
    assert ("8d, 36h, 90m, 300s" in message or "more than 0 and finite" in message) and len(message) < 200


@pytest.mark.parametrize("seconds, text", [(8 * DAY, "8d"), (DAY, "1d"), (36 * HOUR, "36h"), (90.0, "90s"),
                                           (5400.0, "90m"), (1.5, "1.5s")])
def test_spelt_durations_read_back(seconds, text):
    assert spell_duration(seconds) == text
    assert duration(text) == seconds


# -- the command's harness ------------------------------------------------------------------


def domain_of(fixture: Dict[str, Any]) -> Tuple[str, str]:
    return fixture["domain"]["uuid"], fixture["domain"]["name"]


@pytest.fixture
def history_path(tmp_path: Path) -> str:
    return str(tmp_path / "history.sqlite")


def fill(path: str, fixture: Dict[str, Any], points: Sequence[Point]) -> None:
    """Record ``points`` for the fixture's domain, as its one writer (then closed, as ``record`` would be)."""
    uuid, name = domain_of(fixture)
    with History.open(path, writer=True, clock=lambda: points[-1].end) as history:
        for point in points:
            history.record(uuid, name, point)


def steady(used: int, days: float, end: Optional[float] = None, actual: int = 192 * MiB) -> List[Point]:
    """``days`` of 5-minute points, all ok, ``used`` bytes in use, ending now (whole seconds, as stored)."""
    end = float(int(time.time())) if end is None else end
    count = int(days * DAY / STEP)
    return [Point(end - (count - i) * STEP, STEP, STEP, used, actual) for i in range(count)]


@pytest.fixture
def libvirt_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``use(world)``: the command's libvirt connections are the World's."""
    opened: List[str] = []

    def use(world: World) -> World:
        def connect(uri: str) -> Any:
            opened.append(uri)
            return world.conn

        monkeypatch.setattr(libvirt, "open", connect)
        monkeypatch.setattr(libvirt, "openReadOnly", connect)
        return world

    use.opened = opened  # type: ignore[attr-defined]
    yield use


def run(*argv: str) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["-c", URI, "advise", *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def documents(out: str) -> Dict[str, Dict[str, Any]]:
    docs = json.loads(out)
    assert isinstance(docs, list)
    for doc in docs:
        assert list(doc) == JSON_KEYS
    return {doc["domain"]: doc for doc in docs}


def table(out: str) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """The rows by domain, cut at the header's column starts, and the lines after the table."""
    head, _, tail = out.rstrip("\n").partition("\n\n")
    header, *lines = head.splitlines()
    starts = [header.index(column) for column in COLUMNS]
    assert starts == sorted(starts) and header.split() == COLUMNS
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line)])]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows, tail.splitlines()


# -- what it says about each domain ---------------------------------------------------------


def test_an_idle_guest_can_give_memory_back(libvirt_world, history_path):
    """3 days at 40 MiB used in a 192 MiB guest: recommended is the floor, 128 MiB; 64 MiB reclaimable."""
    idle = load("virtio")
    libvirt_world(World([idle]))
    points = steady(40 * MiB, days=3)
    fill(history_path, idle, points)
    code, out, err = run("--all", "--history", history_path, "--format", "json")
    assert (code, err) == (0, "")
    doc = documents(out)["vbs-tb-rec-virtio"]
    assert doc["uuid"] == idle["domain"]["uuid"]
    assert doc["actual"] == 192 * MiB  # the live XML's <currentMemory>
    assert doc["demand"] == 40 * MiB
    assert doc["recommended"] == Policy().floor_bytes == 128 * MiB
    assert doc["reclaimable"] == 64 * MiB > 0
    assert doc["history_seconds"] == pytest.approx(3 * DAY, abs=STEP)
    assert 0.85 < doc["confidence"] < 0.9 and doc["pressure_events"] == 0
    assert doc["reason"].endswith("raised to the floor, 128 MiB")
    # The advice module's own answer for the same figures, at the same moment within a second.
    expected = advise(points, Limits(192 * MiB, 192 * MiB, None), Policy(), points[-1].end)
    assert Advice(**{k: v for k, v in doc.items() if k not in ("domain", "uuid")}) == dataclasses.replace(
        expected, confidence=doc["confidence"], history_seconds=doc["history_seconds"]
    )


def test_a_domain_the_history_never_saw_has_insufficient_history(libvirt_world, history_path):
    idle, unseen = load("virtio"), load("virtio-hog")
    libvirt_world(World([idle, unseen]))
    fill(history_path, idle, steady(40 * MiB, days=3))
    code, out, err = run("vbs-tb-rec-virtio-hog", "vbs-tb-rec-virtio", "--history", history_path,
                         "--format", "json")
    assert (code, err) == (0, "")
    docs = documents(out)
    assert list(docs) == ["vbs-tb-rec-virtio-hog", "vbs-tb-rec-virtio"], "in the order named"
    doc = docs["vbs-tb-rec-virtio-hog"]
    assert doc["recommended"] is doc["reclaimable"] is doc["demand"] is None
    assert doc["actual"] == 192 * MiB and doc["history_seconds"] == 0 and doc["confidence"] == 0
    assert doc["reason"] == "insufficient history: 0 s of the 24.0 h needed"


def test_min_history_and_window_are_the_policys(libvirt_world, history_path):
    """12 hours of history: insufficient by default, advised with --min-history 6h; --window 1h sees one hour.

    With half a day of a day's half-life, the confidence is 0.29: (40 + 64) MiB widened by 35 %, 141 MiB.
    """
    idle = load("virtio")
    libvirt_world(World([idle]))
    fill(history_path, idle, steady(40 * MiB, days=0.5))
    docs = [
        documents(run("--all", "--history", history_path, "--format", "json", *extra)[1])["vbs-tb-rec-virtio"]
        for extra in ([], ["--min-history", "6h"], ["--window", "1h", "--min-history", "30m"])
    ]
    assert docs[0]["recommended"] is None and docs[0]["reason"].startswith("insufficient history: 12.0 h")
    assert docs[1]["recommended"] == 141 * MiB
    assert docs[1]["history_seconds"] == pytest.approx(12 * HOUR, abs=1)
    assert docs[1]["confidence"] == pytest.approx(0.29, abs=0.01)
    assert docs[2]["history_seconds"] == pytest.approx(HOUR, abs=STEP)


@pytest.mark.parametrize("stack", ["debian12", "next"])
def test_min_guarantee_from_the_live_xml_holds_the_recommendation_up(libvirt_world, history_path, stack):
    """A <min_guarantee> of 160 MiB beats the floor (synthetic: libvirt's QEMU driver refuses one)."""
    guest = load("virtio", stack)
    guest["xml_live"] = with_memtune(guest["xml_live"], "<min_guarantee unit='KiB'>163840</min_guarantee>")
    libvirt_world(World([guest], stack=stack))
    fill(history_path, guest, steady(40 * MiB, days=3))
    code, out, _ = run("--all", "--history", history_path, "--format", "json")
    [doc] = documents(out).values()
    assert code == 0
    assert (doc["recommended"], doc["reclaimable"]) == (160 * MiB, 32 * MiB)
    assert doc["reason"].endswith("raised to <min_guarantee>, 160 MiB")


def test_a_ballooned_guest_is_advised_from_its_current_size(libvirt_world, history_path):
    """The balloon size is libvirt's <currentMemory> (virsh setmem moved it), capped by <memory>."""
    guest = load("virtio")
    guest["xml_live"] = guest["xml_live"].replace(
        "<currentMemory unit='KiB'>196608</currentMemory>", "<currentMemory unit='KiB'>163840</currentMemory>"
    )
    libvirt_world(World([guest]))
    fill(history_path, guest, steady(40 * MiB, days=3, actual=160 * MiB))
    [doc] = documents(run("--all", "--history", history_path, "--format", "json")[1]).values()
    assert (doc["actual"], doc["recommended"], doc["reclaimable"]) == (160 * MiB, 128 * MiB, 32 * MiB)


def test_recorded_cycles_through_the_real_recorder(libvirt_world, history_path):
    """Three collector cycles over the recorded guests, 10 s apart: the idle one's used memory as recorded."""
    idle, nodriver = load("virtio"), load("nodriver")
    world = libvirt_world(World([idle, nodriver], now=idle["memory_stats_at"]))
    with Collector(clients=[world.client], timeout=5.0) as collector:
        cycle = collector.collect()
    statuses = {s.domain: s.status.value for s in cycle.samples}
    assert statuses == {"vbs-tb-rec-virtio": "ok", "vbs-tb-rec-nodriver": "never_updated"}
    used = next(s.stats.used_bytes for s in cycle.samples if s.domain == "vbs-tb-rec-virtio" and s.stats)
    now = time.time()
    with History.open(history_path, writer=True, clock=lambda: now) as history:
        recorder = Recorder(history, 10.0)
        for started_at in (now - 20, now - 10, now):
            recorder.record(dataclasses.replace(cycle, started_at=started_at))
    code, out, err = run("--all", "--history", history_path, "--min-history", "15s", "--format", "json")
    assert (code, err) == (0, "")
    docs = documents(out)
    assert docs["vbs-tb-rec-virtio"]["demand"] == used
    assert docs["vbs-tb-rec-virtio"]["history_seconds"] == pytest.approx(30.0)
    assert docs["vbs-tb-rec-virtio"]["reclaimable"] > 0
    assert docs["vbs-tb-rec-nodriver"]["recommended"] is None
    assert docs["vbs-tb-rec-nodriver"]["reason"].startswith("insufficient history")


# -- the three outputs ----------------------------------------------------------------------


@pytest.fixture
def three(libvirt_world, history_path) -> World:
    """An idle guest, a busy one capped by <memory>, one never recorded."""
    idle, busy, unseen = load("virtio"), load("virtio-hog"), load("nodriver")
    world = libvirt_world(World([idle, busy, unseen]))
    fill(history_path, idle, steady(40 * MiB, days=3))
    fill(history_path, busy, steady(150 * MiB, days=3))
    return world


def test_the_table(three, history_path):
    code, out, err = run("--all", "--history", history_path)
    assert (code, err) == (0, "")
    rows, after = table(out)
    assert list(rows) == ["vbs-tb-rec-nodriver", "vbs-tb-rec-virtio", "vbs-tb-rec-virtio-hog"]
    idle, busy, unseen = rows["vbs-tb-rec-virtio"], rows["vbs-tb-rec-virtio-hog"], rows["vbs-tb-rec-nodriver"]
    assert [idle[c] for c in COLUMNS[1:8]] == [
        "192.0 MiB", "128.0 MiB", "64.0 MiB", "40.0 MiB", "0.88", "72.0 h", "0",
    ]
    assert idle["REASON"].startswith("p95 of the 24 h peaks of used memory over 72.0 h of history")
    assert [busy[c] for c in COLUMNS[1:5]] == ["192.0 MiB", "192.0 MiB", "0 B", "150.0 MiB"]
    assert busy["REASON"].endswith("capped at <memory>, 192 MiB")
    assert [unseen[c] for c in COLUMNS[1:8]] == ["192.0 MiB", "-", "-", "-", "0.00", "0 s", "0"]
    assert unseen["REASON"] == "insufficient history: 0 s of the 24.0 h needed"
    assert after == [f"host {URI}: 64.0 MiB reclaimable (2 of 3 domains advised)"]


def test_json_is_one_document_per_domain_and_no_host_total(three, history_path):
    code, out, _ = run("--all", "--history", history_path, "--format", "json")
    docs = documents(out)
    assert code == 0 and len(json.loads(out)) == 3
    assert {d: (doc["recommended"], doc["reclaimable"]) for d, doc in docs.items()} == {
        "vbs-tb-rec-virtio": (128 * MiB, 64 * MiB),
        "vbs-tb-rec-virtio-hog": (192 * MiB, 0),
        "vbs-tb-rec-nodriver": (None, None),
    }


def test_prometheus(three, history_path):
    code, out, err = run("--all", "--history", history_path, "--format", "prometheus")
    assert (code, err) == (0, "")
    families = {f.name: f for f in text_string_to_metric_families(out)}
    assert sorted(families) == [
        "virt_balloon_advice_confidence", "virt_balloon_host_reclaimable_bytes",
        "virt_balloon_reclaimable_bytes", "virt_balloon_recommended_bytes",
    ]
    assert {f.type for f in families.values()} == {"gauge"}

    def series(name: str) -> Dict[str, float]:
        samples = families[name].samples
        assert all(set(s.labels) == {"uri", "domain", "uuid"} and s.labels["uri"] == URI for s in samples)
        return {s.labels["domain"]: s.value for s in samples}

    uuids = {s.labels["domain"]: s.labels["uuid"] for s in families["virt_balloon_advice_confidence"].samples}
    assert uuids["vbs-tb-rec-virtio"] == load("virtio")["domain"]["uuid"]
    # The guest without advice has no size series, only its confidence (0).
    assert series("virt_balloon_recommended_bytes") == {"vbs-tb-rec-virtio": 128 * MiB,
                                                        "vbs-tb-rec-virtio-hog": 192 * MiB}
    assert series("virt_balloon_reclaimable_bytes") == {"vbs-tb-rec-virtio": 64 * MiB,
                                                        "vbs-tb-rec-virtio-hog": 0}
    confidence = series("virt_balloon_advice_confidence")
    assert confidence["vbs-tb-rec-nodriver"] == 0 and 0.85 < confidence["vbs-tb-rec-virtio"] < 0.9
    [host] = families["virt_balloon_host_reclaimable_bytes"].samples
    assert (host.labels, host.value) == ({"uri": URI}, 64 * MiB)


def test_several_hosts_label_their_rows_and_each_has_its_line():
    """Pure rendering: ``DOMAIN@URI`` rows, one host line per URI that answered, 0 B where none is advised."""
    advice = advise([], Limits(192 * MiB, 192 * MiB, None), Policy(), 1e9)
    other = "qemu+ssh://hv2/system"
    text = render_advice_table([DomainAdvice(URI, "web1", "u1", advice)], [URI, other], show_uri=True)
    rows, after = table(text)
    assert list(rows) == [f"web1@{URI}"]
    assert after == [f"host {URI}: 0 B reclaimable (0 of 1 domain advised)",
                     f"host {other}: 0 B reclaimable (0 of 0 domains advised)"]


# -- failures ---------------------------------------------------------------------------------


def test_a_missing_history_file_names_it_and_what_writes_it(libvirt_world, history_path):
    libvirt_world(World([load("virtio")]))
    code, out, err = run("--all", "--history", history_path)
    assert (code, out) == (1, "")
    assert err == f"{history_path}: no history here yet: 'record' writes it (see --history)\n"
    assert libvirt_world.opened == [], "refused before connecting to libvirt"
    assert not Path(history_path).exists(), "a reader creates nothing"


def test_a_file_from_a_newer_schema_is_refused(libvirt_world, history_path):
    idle = load("virtio")
    libvirt_world(World([idle]))
    fill(history_path, idle, steady(40 * MiB, days=0.1))
    with sqlite3.connect(history_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    code, out, err = run("--all", "--history", history_path)
    assert (code, out) == (1, "")
    assert err == (
        f"{history_path}: written by a newer virt-balloon-stats (history schema {SCHEMA_VERSION + 1}; "
        f"this one reads up to {SCHEMA_VERSION}): upgrade, or give another --history file\n"
    )


def test_a_domain_libvirt_fails_on_is_one_line_and_the_others_are_advised(libvirt_world, history_path):
    """As ``stats`` reports it: ``DOMAIN: what went wrong``, exit 1, the other domains printed."""
    idle, gone = load("virtio"), load("virtio-hog")
    failing = FakeDomain(gone, raises={"XMLDesc": recorded_error("unknown-domain")})
    libvirt_world(World([idle, gone], domains=[FakeDomain(idle), failing]))
    fill(history_path, idle, steady(40 * MiB, days=3))
    code, out, err = run("--all", "--history", history_path, "--format", "json")
    assert code == 1
    assert list(documents(out)) == ["vbs-tb-rec-virtio"]
    assert re.fullmatch(
        r"vbs-tb-rec-virtio-hog: domain not found; 'virsh list --all' shows the defined domains "
        r"\(Domain not found: .*\)\n",
        err,
    )


def test_unknown_and_shut_off_domains_are_reported_by_name(libvirt_world, history_path):
    idle, off = load("virtio"), load("virtio-hog")
    libvirt_world(World([idle, off], domains=[FakeDomain(idle), FakeDomain(off, dom_id=-1)]))
    fill(history_path, idle, steady(40 * MiB, days=3))
    code, out, err = run("nosuch", "vbs-tb-rec-virtio-hog", "vbs-tb-rec-virtio", "--history", history_path)
    assert code == 1
    rows, after = table(out)
    assert list(rows) == ["vbs-tb-rec-virtio"]
    assert after == [f"host {URI}: 64.0 MiB reclaimable (1 of 1 domain advised)"]
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("nosuch: domain not found")
    assert lines[1] == ("vbs-tb-rec-virtio-hog: domain is not running, so it holds no memory to give back; "
                        "pick a running one with 'virsh list'")


def test_a_read_only_connection_is_enough(libvirt_world, history_path):
    idle = load("virtio")
    world = libvirt_world(World([idle]))
    fill(history_path, idle, steady(40 * MiB, days=3))
    out, err = io.StringIO(), io.StringIO()
    assert main(["-r", "-c", URI, "advise", "--all", "--history", history_path], out=out, err=err) == 0
    assert "64.0 MiB reclaimable" in out.getvalue()
    assert {name for name, _ in world.domain.calls} == {"XMLDesc"}, "one call per domain, none to QEMU"
    assert world.transport.sent == []


def test_a_reader_leaves_the_writer_be(libvirt_world, history_path):
    """``advise`` while ``record`` holds the file: both go on, neither waits."""
    idle = load("virtio")
    libvirt_world(World([idle]))
    points = steady(40 * MiB, days=3)
    uuid, name = domain_of(idle)
    with History.open(history_path, writer=True, clock=lambda: points[-1].end) as writer:
        for point in points[:-1]:
            writer.record(uuid, name, point)
        began = time.monotonic()
        code, out, _ = run("--all", "--history", history_path, "--format", "json")
        assert code == 0 and documents(out)["vbs-tb-rec-virtio"]["reclaimable"] == 64 * MiB
        writer.record(uuid, name, points[-1])
        assert time.monotonic() - began < 5
        assert writer.points(uuid, points[-1].start, points[-1].end) == [points[-1]]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "name at least one domain, or use --all"),
        (["--all", "web1"], "give domains or --all, not both"),
        (["--all", "--window", "1d", "--min-history", "36h"],
         "--min-history 36h is longer than --window 1d: no domain could ever have enough history"),
    ],
)
def test_usage_errors(libvirt_world, history_path, argv, message):
    libvirt_world(World([load("virtio")]))
    code, out, err = run("--history", history_path, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == f"virt-balloon-stats: error: {message}"


@pytest.mark.parametrize("option", ["--window", "--min-history"])
def test_a_bad_duration_is_argparses_usage_error(option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["advise", "--all", option, "8 days"])
    assert stop.value.code == 2
    assert f"argument {option}: not a duration: '8 days'" in capsys.readouterr().err


# -- the library half -------------------------------------------------------------------------


def test_the_source_is_any_function_of_uuid_and_window():
    """``--prometheus`` is another source: ``advise_guest`` only calls ``source(uuid, since, until)``."""
    world = World([load("virtio")])
    asked: List[Tuple[str, float, float]] = []
    points = steady(40 * MiB, days=3, end=1_800_000_000.0)

    def source(uuid: str, since: float, until: float) -> List[Point]:
        asked.append((uuid, since, until))
        return points

    policy = Policy(window_seconds=2 * DAY)
    result = advise_guest(world.host.lookup("vbs-tb-rec-virtio"), URI, source, policy, 1_800_000_000.0)
    assert asked == [(world.domain.UUIDString(), 1_800_000_000.0 - 2 * DAY, 1_800_000_000.0)]
    assert result.advice == advise(points, limits_of(world.domain.XMLDesc()), policy, 1_800_000_000.0)
    assert result.to_dict()["history_seconds"] == pytest.approx(2 * DAY)


def test_a_window_longer_than_the_epoch_asks_from_the_epoch():
    world = World([load("virtio")])
    asked: List[float] = []
    guest = world.host.lookup("vbs-tb-rec-virtio")
    advise_guest(guest, URI, lambda u, since, until: asked.append(since) or [], Policy(window_seconds=1e300),
                 1_800_000_000.0)
    assert asked == [0.0]


def test_the_history_failing_is_not_blamed_on_a_domain(libvirt_world, history_path):
    """A history that fails while read is one line naming the file, not one per domain.

    The file's pages past its schema are overwritten with noise: it opens
    (its header and schema are intact) and fails at the first read.
    """
    idle, other = load("virtio"), load("virtio-hog")
    libvirt_world(World([idle, other]))
    fill(history_path, idle, steady(40 * MiB, days=0.5))
    size = Path(history_path).stat().st_size
    assert size > 3 * 4096
    with open(history_path, "r+b") as f:
        f.seek(2 * 4096)
        f.write(bytes(range(256)) * ((size - 2 * 4096) // 256))
    code, out, err = run("--all", "--history", history_path)
    assert (code, out) == (1, "")
    assert err == f"{history_path}: cannot read the history: database disk image is malformed\n"

"""The exporter keeping history: every cycle recorded, advice refreshed and served beside the figures.

Real collectors over the fake libvirt World of recorded domains, a real
history file in ``tmp_path``, and the real exporter on loopback for the
served gauges; the clock is the keeper's own, injected, so a refresh that is
due and one that is not are told apart without waiting.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import time
from typing import Any, Dict, Iterator, List, Tuple

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import URI, World, load, now_for
from tests.unit.test_exporter import ONE_CYCLE, TIMEOUT, wait_until
from virt_balloon_stats.advice import Point, Policy
from virt_balloon_stats.cli import main
from virt_balloon_stats.cli.long_running import _ADVISE_EVERY
from virt_balloon_stats.collector import Collector
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.exporter import Exporter, ExporterConfig
from virt_balloon_stats.history import History
from virt_balloon_stats.keeper import DEFAULT_ADVISE_EVERY_SECONDS, HistoryKeeper

MiB = 2**20
DAY = 86400.0
STEP = 300.0
NAMES = ["virtio", "virtio-hog"]


class Harness:
    """A world of two recorded domains, its collector, a history writer and a keeper on a clock of its own."""

    def __init__(self, path: str, advise_every: float = 300.0) -> None:
        fixtures = [load(n) for n in NAMES]
        self.world = World(fixtures, now=now_for(fixtures[0]))
        self.now = now_for(fixtures[0])
        # The cycles' times (the points') follow this clock; the figures' freshness, the World's.
        self.collector = Collector(clients=[self.world.client], timeout=TIMEOUT, clock=lambda: self.now)
        self.history = History.open(path, writer=True, clock=lambda: self.now)
        self.keeper = HistoryKeeper(self.collector, self.history, 10.0, Policy(), advise_every=advise_every,
                                    clock=lambda: self.now)

    def uuid(self, name: str) -> str:
        return next(d.UUIDString() for d in self.world.domains if d.name() == f"vbs-tb-rec-{name}")

    def xml_calls(self) -> int:
        return sum(1 for d in self.world.domains for call, _ in d.calls if call == "XMLDesc")

    def cycle(self, after: float = 10.0) -> None:
        self.now += after
        self.keeper.on_cycle(self.collector.collect())

    def close(self) -> None:
        self.collector.stop()
        self.history.close()


@pytest.fixture
def harness(tmp_path: Any) -> Iterator[Harness]:
    h = Harness(str(tmp_path / "history.sqlite"))
    try:
        yield h
    finally:
        h.close()


def fill(h: Harness, name: str, used: int, days: float) -> None:
    """``days`` of 5-minute ok points ending now, as if an earlier recorder had written them."""
    count = int(days * DAY / STEP)
    for i in range(count):
        point = Point(h.now - (count - i) * STEP, STEP, STEP, used, 192 * MiB)
        h.history.record(h.uuid(name), f"vbs-tb-rec-{name}", point)


def served(h: Harness) -> Dict[Tuple[str, str], float]:
    """(metric, domain or uri) -> value, from the keeper's families as a registry would collect them."""
    out = {}
    for family in h.keeper.collect():
        for sample in family.samples:
            out[(sample.name, sample.labels.get("domain", sample.labels.get("uri", "")))] = sample.value
    return out


def test_every_cycle_is_recorded_and_the_first_one_is_advised(harness):
    harness.cycle()
    harness.cycle()
    for name in NAMES:
        assert len(harness.history.points(harness.uuid(name), 0, harness.now + 1)) == 2
    assert harness.keeper.recorder.points == 4
    advices = harness.keeper.advices
    assert [a.domain for a in advices] == ["vbs-tb-rec-virtio", "vbs-tb-rec-virtio-hog"]
    assert all(a.advice.recommended is None and a.uri == URI for a in advices), "20 s is too little"
    got = served(harness)
    assert ("virt_balloon_advice_confidence", "vbs-tb-rec-virtio") in got
    assert not any(name == "virt_balloon_recommended_bytes" for name, _ in got), "no figure without history"
    assert got[("virt_balloon_host_reclaimable_bytes", URI)] == 0


def test_the_advice_is_what_advise_gives_from_the_same_file(harness, monkeypatch):
    monkeypatch.setattr(libvirt, "open", lambda uri: harness.world.conn)
    monkeypatch.setattr(time, "time", lambda: harness.now)  # advise's "now", as the keeper's
    fill(harness, "virtio", 40 * MiB, days=3)
    harness.cycle()
    [idle] = [a for a in harness.keeper.advices if a.domain == "vbs-tb-rec-virtio"]
    assert idle.advice.recommended == 128 * MiB and idle.advice.reclaimable == 64 * MiB
    out, err = io.StringIO(), io.StringIO()
    argv = ["advise", "--history", harness.history.path, "--format", "json", "vbs-tb-rec-virtio"]
    code = main(["-c", URI, *argv], out=out, err=err)
    assert (code, err.getvalue()) == (0, "")
    [doc] = json.loads(out.getvalue())
    assert {k: v for k, v in doc.items() if k not in ("domain", "uuid")} == idle.advice.to_dict()
    got = served(harness)
    assert got[("virt_balloon_recommended_bytes", "vbs-tb-rec-virtio")] == 128 * MiB
    assert got[("virt_balloon_reclaimable_bytes", "vbs-tb-rec-virtio")] == 64 * MiB
    assert got[("virt_balloon_host_reclaimable_bytes", URI)] == 64 * MiB


def test_advice_is_made_again_only_when_due(harness):
    """One XMLDesc per domain per refresh, and none in between (the collector's cycles need none)."""
    harness.cycle()
    first = harness.xml_calls()
    harness.cycle(after=100.0)
    harness.cycle(after=100.0)
    assert harness.xml_calls() == first
    harness.cycle(after=100.0)  # 300 s after the first refresh
    assert harness.xml_calls() == first + len(NAMES)
    harness.now -= 3600  # the clock stepped back: refresh, rather than wait an hour
    harness.cycle()
    assert harness.xml_calls() == first + 2 * len(NAMES)


def test_a_failing_history_is_logged_and_the_last_advice_stays_served(harness, caplog):
    fill(harness, "virtio", 40 * MiB, days=3)
    harness.cycle()
    before = served(harness)
    harness.history.close()
    with caplog.at_level(logging.ERROR, logger="virt_balloon_stats.keeper"):
        harness.cycle(after=600.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("cannot record this cycle: ")
    assert messages[1].startswith("cannot advise from the history: ")
    assert served(harness) == before


def test_advise_every_must_be_positive(harness):
    with pytest.raises(InvalidArgument):
        HistoryKeeper(harness.collector, harness.history, 10.0, Policy(), advise_every=0)


def test_the_command_lines_default_is_the_keepers():
    assert _ADVISE_EVERY == DEFAULT_ADVISE_EVERY_SECONDS


def test_the_exporter_serves_the_advice_beside_the_figures(tmp_path):
    """exporter --history: the keeper rides the exporter's collector and its gauges are in /metrics."""
    h = Harness(str(tmp_path / "history.sqlite"))
    fill(h, "virtio", 40 * MiB, days=3)
    exporter = Exporter(h.collector, ExporterConfig(listen="127.0.0.1:0", interval=ONE_CYCLE),
                        on_cycle=h.keeper.on_cycle, extra=[h.keeper])
    exporter.start()
    try:
        assert wait_until(lambda: len(h.keeper.advices) == len(NAMES))  # recorded, then advised
        conn = http.client.HTTPConnection(exporter.host, exporter.port, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
    finally:
        exporter.stop()
        h.history.close()
    names: List[str] = [f.name for f in text_string_to_metric_families(body)]
    assert "virt_balloon_up" in names and "virt_balloon_status" in names
    assert {"virt_balloon_recommended_bytes", "virt_balloon_reclaimable_bytes",
            "virt_balloon_advice_confidence", "virt_balloon_host_reclaimable_bytes"} <= set(names)
    assert 'virt_balloon_recommended_bytes{domain="vbs-tb-rec-virtio"' in body


def test_the_exporters_advice_options_are_checked_before_anything_starts(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main(["-c", URI, "exporter", "--history", str(tmp_path / "h.sqlite"), "--window", "1d",
                 "--min-history", "36h"], out=out, err=err)
    assert (code, out.getvalue()) == (2, "")
    assert err.getvalue().splitlines()[-1] == (
        "virt-balloon-stats: error: --min-history 36h is longer than --window 1d: "
        "no domain could ever have enough history"
    )
    assert not (tmp_path / "h.sqlite").exists()

"""virt_balloon_stats.promhistory: a domain's history made from Prometheus' answers.

The pure half (:func:`points_from_answers`) is fed matrices shaped as
Prometheus' HTTP API sends them: synthetic ones for each rule, and the
answers a real Prometheus gave on the testbed
(``tests/fixtures/prometheus/``, see its README). The HTTP half talks to a
real HTTP server on loopback that answers as Prometheus does, errors
included; nothing of the module is replaced.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import libvirt
import pytest

from tests.unit.conftest import URI, World, load
from virt_balloon_stats.advice import COUNTERS, Point, Policy, advise
from virt_balloon_stats.advising import limits_of
from virt_balloon_stats.cli import main
from virt_balloon_stats.errors import HistoryError, InvalidArgument
from virt_balloon_stats.promhistory import (
    MAX_STEPS,
    MIN_STEP_SECONDS,
    QUERIES,
    PrometheusHistory,
    points_from_answers,
    step_for,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prometheus"
MiB = 2**20
STEP = 60
T0 = 1_796_600_000.0  # a step boundary's end time, as Prometheus evaluates at start + k * step


def series(uuid: str, values: List[Tuple[float, float]], **labels: str) -> Dict[str, Any]:
    """One matrix series as Prometheus sends it: labels, and each value as ``[time, "text"]``."""
    metric = {"uri": "qemu:///system", "domain": f"d-{uuid}", "uuid": uuid, "job": "vbs",
              "instance": "hv1:9474", **labels}
    return {"metric": metric, "values": [[t, str(int(v)) if v == int(v) else repr(v)] for t, v in values]}


def answers(uuid: str = "u1", steps: int = 3, **override: List[Tuple[float, float]]) -> Dict[str, Any]:
    """A steady domain: each step fully scraped (12 scrapes), ok, 100 MiB used, 1 GiB balloon, no counters."""
    times = [T0 + i * STEP for i in range(steps)]
    base = {
        "used_peak": [(t, 100 * MiB) for t in times],
        "ok_scrapes": [(t, 12) for t in times],
        "scrapes": [(t, 12) for t in times],
        "actual": [(t, 1024 * MiB) for t in times],
        **{field: [(t, 0) for t in times] for field in COUNTERS},
    }
    base.update(override)
    return {name: [series(uuid, values)] for name, values in base.items()}


# -- the queries and the step --------------------------------------------------------------------


def test_every_point_field_has_its_query():
    """One query per figure a point needs; every counter's uses the exporter's name for it."""
    assert set(QUERIES) == {"used_peak", "ok_scrapes", "scrapes", "actual", *COUNTERS}
    for field in COUNTERS:
        assert QUERIES[field].startswith("clamp_min(virt_balloon_")
        assert QUERIES[field].endswith(" offset {step}s, 0)")
    assert QUERIES["direct_reclaims"].format(step=60) == (
        "clamp_min(virt_balloon_direct_reclaims_bytes_total - virt_balloon_direct_reclaims_bytes_total"
        " offset 60s, 0)"
    )


@pytest.mark.parametrize(
    "seconds, step",
    [(60, 60), (3600, 60), (7 * 86400, 61), (8 * 86400, 70), (30 * 86400, 260)],
)
def test_the_step_is_a_minute_or_what_keeps_under_prometheus_limit(seconds, step):
    assert step_for(0.0, float(seconds)) == step
    assert seconds / step <= MAX_STEPS < 11_000 and step >= MIN_STEP_SECONDS


# -- the points ----------------------------------------------------------------------------------


def test_each_step_is_one_point_ending_at_its_evaluation():
    [[uuid, points]] = points_from_answers(answers(), STEP).items()
    assert uuid == "u1"
    assert points == [Point(T0 + i * STEP - STEP, STEP, STEP, 100 * MiB, 1024 * MiB) for i in range(3)]


def test_a_partly_scraped_step_is_as_long_as_its_scrapes():
    """The first step holds 4 of the 12 scrapes a full one holds, 3 of them ok: its last 20 s, 15 s ok."""
    [points] = points_from_answers(answers(scrapes=[(T0, 4), (T0 + STEP, 12)],
                                           ok_scrapes=[(T0, 3), (T0 + STEP, 12)]), STEP).values()
    assert [(p.start, p.seconds, p.ok_seconds) for p in points] == [
        (T0 - 20, 20.0, 15.0), (T0, STEP, STEP)
    ]


def test_a_step_without_ok_figures_is_a_gap_and_one_not_scraped_is_no_point():
    """Scraped but stale: the gap counts against completeness. Not scraped: the domain was not there."""
    [points] = points_from_answers(answers(
        used_peak=[(T0, 100 * MiB), (T0 + STEP, 300 * MiB)],  # a stray figure in a step without ok ones
        ok_scrapes=[(T0, 12), (T0 + STEP, 0)],
        scrapes=[(T0, 12), (T0 + STEP, 12)],
    ), STEP).values()
    assert [(p.start, p.ok_seconds, p.used_peak) for p in points] == [
        (T0 - STEP, STEP, 100 * MiB), (T0, 0.0, None)
    ]
    assert len(points) == 2, "the third step has no scrapes count at all: no point"


def test_counters_are_the_increases_prometheus_computed_rounded():
    got = answers(swap_in=[(T0, 4096.0), (T0 + STEP, 0), (T0 + 2 * STEP, 8191.6)], oom_kills=[(T0 + STEP, 1)])
    [points] = points_from_answers(got, STEP).values()
    assert [p.swap_in for p in points] == [4096, 0, 8192]
    assert [p.oom_kills for p in points] == [0, 1, 0]


def test_values_that_are_not_finite_are_left_out():
    got = answers(steps=1)
    got["used_peak"][0]["values"] = [[T0, "NaN"]]
    got["actual"][0]["values"] = [[T0, "+Inf"]]
    [[point]] = points_from_answers(got, STEP).values()
    assert point.used_peak is None and point.actual is None and point.ok_seconds == STEP


def test_one_domain_scraped_by_two_targets_is_one_history():
    """A domain that migrated (or two jobs scraping one exporter): the peak is the highest, scrapes add up."""
    one = answers("u1", steps=1)
    other = answers("u1", steps=1, used_peak=[(T0, 150 * MiB)], ok_scrapes=[(T0, 6)], scrapes=[(T0, 12)])
    both = {name: one[name] + [dict(s, metric=dict(s["metric"], instance="hv2:9474")) for s in other[name]]
            for name in one}
    [[point]] = points_from_answers(both, STEP).values()
    assert point.used_peak == 150 * MiB
    assert point.ok_seconds == STEP * 18 / 24
    assert point.actual == 1024 * MiB


def test_domains_are_apart_by_uuid():
    merged = {name: answers("u1")[name] + answers("u2", used_peak=[(T0, 5 * MiB)])[name] for name in QUERIES}
    found = points_from_answers(merged, STEP)
    assert sorted(found) == ["u1", "u2"]
    assert [p.used_peak for p in found["u2"]] == [5 * MiB, None, None]
    assert [p.ok_seconds for p in found["u2"]] == [STEP] * 3


@pytest.mark.parametrize(
    "bad",
    [{"values": [[T0, "1"]]}, {"metric": {"uuid": "u1"}, "values": [[T0, "x"]]},
     {"metric": {"uuid": "u1"}, "values": [T0]}, "text"],
)
def test_a_series_that_is_not_one_is_a_history_error(bad):
    got = answers()
    got["used_peak"] = [bad]
    with pytest.raises(HistoryError) as caught:
        points_from_answers(got, STEP, "http://prom:9090")
    assert str(caught.value).startswith("http://prom:9090: the answer to used_peak has a series that is not")


# -- the HTTP half ---------------------------------------------------------------------------------


class Prometheus(http.server.ThreadingHTTPServer):
    """A loopback server answering ``/api/v1/query_range`` as Prometheus does, from ``answers``."""

    def __init__(self, replies: Dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = replies
        self.asked: List[Dict[str, str]] = []
        self.status = 200
        self.body: Optional[bytes] = None  # instead of the answers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Prometheus

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
        form["path"] = self.path
        self.server.asked.append(form)
        name = next((n for n, q in QUERIES.items() if q.format(step=form["step"]) == form["query"]), None)
        body = self.server.body
        if body is None:
            result = self.server.replies.get(name, [])
            doc = {"status": "success", "data": {"resultType": "matrix", "result": result}}
            body = json.dumps(doc).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    server = Prometheus(answers())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_one_query_per_figure_for_every_domain_then_the_window_is_kept(prometheus):
    since, until = T0 - 3600, T0 + 2 * STEP + 1
    with PrometheusHistory(prometheus.url + "/") as history:
        first = history.points("u1", since, until)
        assert history.points("u1", since, until) == first
        assert history.points("unknown", since, until) == []
    assert len(first) == 3 and first[0].used_peak == 100 * MiB
    assert len(prometheus.asked) == len(QUERIES), "nine queries, whatever the number of domains"
    assert {a["path"] for a in prometheus.asked} == {"/api/v1/query_range"}
    assert {(a["start"], a["end"], a["step"]) for a in prometheus.asked} == {
        (f"{since + 60:.3f}", f"{until:.3f}", "60")
    }


def test_another_window_is_asked_again(prometheus):
    with PrometheusHistory(prometheus.url) as history:
        history.points("u1", T0 - 3600, T0)
        history.points("u1", T0 - 7200, T0)
    assert len(prometheus.asked) == 2 * len(QUERIES)


def test_only_points_starting_in_the_window_are_given(prometheus):
    with PrometheusHistory(prometheus.url) as history:
        points = history.points("u1", T0 - STEP + 1, T0 + STEP)
    assert [p.start for p in points] == [T0]


def test_a_refused_query_says_what_prometheus_said(prometheus):
    prometheus.status = 400
    prometheus.body = json.dumps({"status": "error", "errorType": "bad_data",
                                  "error": "1:15: parse error: unexpected"}).encode()
    with pytest.raises(HistoryError) as caught:
        PrometheusHistory(prometheus.url).points("u1", T0 - 3600, T0)
    assert f"{prometheus.url}/api/v1/query_range: Prometheus refused 'max_over_time(" in str(caught.value)
    assert str(caught.value).endswith(": 1:15: parse error: unexpected")
    assert caught.value.path == prometheus.url


@pytest.mark.parametrize(
    "status, body, says",
    [
        (502, b"<html>bad gateway</html>", "HTTP 502"),
        (200, b"not json", "the answer is not JSON"),
        (200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode(),
         "is not a matrix"),
    ],
)
def test_what_is_not_prometheus_answering_is_a_history_error(prometheus, status, body, says):
    prometheus.status, prometheus.body = status, body
    with pytest.raises(HistoryError) as caught:
        PrometheusHistory(prometheus.url).points("u1", T0 - 3600, T0)
    assert says in str(caught.value)


def test_nothing_listening_is_a_history_error_naming_the_url():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()
    with pytest.raises(HistoryError) as caught:
        PrometheusHistory(url, timeout=5).points("u1", T0 - 3600, T0)
    assert str(caught.value).startswith(f"{url}/api/v1/query_range: Prometheus does not answer: ")


@pytest.mark.parametrize("url", ["prom:9090", "ftp://prom", "http://", "/api/v1"])
def test_a_url_that_is_not_http_is_refused_up_front(url):
    with pytest.raises(InvalidArgument) as caught:
        PrometheusHistory(url)
    assert "not a Prometheus URL" in str(caught.value)


# -- what a real Prometheus answered on the testbed --------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> Dict[str, Any]:
    """``contrib/testbed/record-prometheus``: two 384 MiB guests, one holding 100 MiB, scraped for 3 min."""
    return json.loads((FIXTURES / "advice.json").read_text())


def test_the_recorder_asked_what_advise_asks(recorded):
    assert recorded["queries"] == dict(QUERIES)
    assert recorded["step"] == step_for(recorded["since"], recorded["until"]) == STEP


def test_recorded_answers_give_each_guests_history_and_what_virsh_says_it_uses(recorded):
    """The peak of used memory is what ``virsh dommemstat`` said (available - usable), to the byte.

    The guests' memory did not move while recorded, so the peak of every
    step is that figure. Three minutes of 1 s scrapes: three steps, the
    first one partly scraped.
    """
    found = points_from_answers(recorded["answers"], recorded["step"])
    for role in ("idle", "hog"):
        domain = recorded["domains"][role]
        points = found[domain["uuid"]]
        stat = domain["dommemstat"]
        assert {p.used_peak for p in points} == {(stat["available"] - stat["usable"]) * 1024}
        assert {p.actual for p in points} == {stat["actual"] * 1024}
        assert [p.end for p in points] == [recorded["since"] + k * STEP for k in range(58, 61)]
        assert all(p.ok_seconds == p.seconds for p in points)
        assert points[0].seconds < STEP and points[1].seconds == points[2].seconds == STEP
        assert all(p.swap_in == p.major_faults == p.oom_kills == 0 for p in points)
    hog = found[recorded["domains"]["hog"]["uuid"]]
    assert hog[0].used_peak is not None and hog[0].used_peak >= 100 * MiB


def test_recorded_answers_advise_as_the_history_file_did_within_five_percent(recorded):
    """The advice from the recorded answers against ``advise --history`` on the exporter's file."""
    found = points_from_answers(recorded["answers"], recorded["step"])
    policy = Policy(window_seconds=3600, min_history_seconds=60)
    by_file = {doc["uuid"]: doc for doc in recorded["advice"]["history"]}
    for domain in recorded["domains"].values():
        limits = limits_of(domain["xml"])
        advice = advise(found[domain["uuid"]], limits, policy, recorded["until"])
        expected = by_file[domain["uuid"]]
        assert advice.demand == expected["demand"]
        assert advice.recommended == pytest.approx(expected["recommended"], rel=0.05)
        assert advice.reclaimable == pytest.approx(expected["reclaimable"], rel=0.05)
        assert advice.history_seconds == pytest.approx(expected["history_seconds"], abs=STEP / 10)


# -- the command ---------------------------------------------------------------------------------------


def test_advise_from_prometheus_on_the_command_line(prometheus, monkeypatch):
    """``advise --prometheus URL``: libvirt for the domain, Prometheus for its history, JSON out."""
    world = World([load("virtio")])
    monkeypatch.setattr(libvirt, "open", lambda uri: world.conn)
    uuid = world.domain.UUIDString()
    end = float(int(time.time()))
    steps = [end - k * STEP for k in range(10, -1, -1)]
    prometheus.replies = answers(uuid, used_peak=[(t, 40 * MiB) for t in steps],
                                 ok_scrapes=[(t, 12) for t in steps], scrapes=[(t, 12) for t in steps])
    out, err = io.StringIO(), io.StringIO()
    argv = ["advise", "--prometheus", prometheus.url, "--window", "1h", "--min-history", "5m",
            "--format", "json"]
    code = main(["-c", URI, *argv, "--all"], out=out, err=err)
    assert (code, err.getvalue()) == (0, "")
    [doc] = json.loads(out.getvalue())
    assert doc["uuid"] == uuid and doc["demand"] == 40 * MiB
    assert doc["history_seconds"] == 11 * STEP
    # The same points, built by hand, advised at the moment the last one ends (the command's is a bit later).
    by_hand = [Point(t - STEP, STEP, STEP, 40 * MiB, 1024 * MiB) for t in steps]
    policy = Policy(window_seconds=3600, min_history_seconds=300)
    expected = advise(by_hand, limits_of(world.domain.XMLDesc()), policy, end)
    assert expected.recommended is not None and expected.recommended > (40 + 64) * MiB
    assert doc["recommended"] == pytest.approx(expected.recommended, abs=MiB)
    assert doc["reclaimable"] == doc["actual"] - doc["recommended"] > 0
    assert len(prometheus.asked) == len(QUERIES)


def test_history_and_prometheus_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["advise", "--all", "--history", "h.sqlite", "--prometheus", "http://prom:9090"])
    assert stop.value.code == 2
    assert "argument --prometheus: not allowed with argument --history" in capsys.readouterr().err


def test_prometheus_not_answering_is_one_line_before_any_domain(monkeypatch):
    world = World([load("virtio"), load("virtio-hog")])
    monkeypatch.setattr(libvirt, "open", lambda uri: world.conn)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()
    out, err = io.StringIO(), io.StringIO()
    code = main(["-c", URI, "advise", "--prometheus", url, "--all"], out=out, err=err)
    assert (code, out.getvalue()) == (1, "")
    [line] = err.getvalue().splitlines()
    assert line.startswith(f"{url}/api/v1/query_range: Prometheus does not answer: ")

"""virt_balloon_stats.metrics: the Prometheus families of a collector cycle.

Every cycle is a real :class:`~virt_balloon_stats.collector.Collector`'s over
fake libvirt domains and recorded QMP replies, and every exposition is read
back with ``prometheus_client``'s own parser, so a test fails on what
Prometheus itself would reject or misread, not on a hand-written regex.
The tests about each domain's figures run over both recorded sets: QEMU
10.0 with a Linux 6.12 guest sends QEMU 9.2's extra stats (0 on the idle
guest), and the next set has a domain read right after a machine reset.
Other figures for those stats, and a reset between two cycles, are
synthetic changes of the recorded replies.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import URI, World, load, now_for, stack_scenarios
from virt_balloon_stats import cli
from virt_balloon_stats.client import BalloonStats
from virt_balloon_stats.collector import Collector, Cycle, Totals
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.host import Host
from virt_balloon_stats.metrics import (
    CycleMetrics,
    families_of,
    metric_name,
    registry_for,
    render,
    write_textfile,
)
from virt_balloon_stats.stats import ACTUAL, STATS, STATS_BY_QEMU_NAME, StatSpec, Status
from virt_balloon_stats.transport import QMPClient

TIMEOUT = 5.0

#: A fixed collector clock, so the cycle's own timestamps are known exactly.
STARTED_AT = 1795661200.123456

OTHER_URI = "qemu+ssh://other.example/system"

#: Labels of every series about one domain.
DOMAIN_LABELS = {"uri", "domain", "uuid"}

U64_MAX = 2**64 - 1

#: The stats libvirt maps (all QEMU 7.2 reports), and QEMU 9.2's, which it does not
#: (QEMU 10.0 reports them too).
MAPPED = [s for s in STATS if s.libvirt is not None]
UNMAPPED = [s for s in STATS if s.libvirt is None]


# -- helpers ------------------------------------------------------------------------------


def _world(names: List[str], rename: Optional[Dict[str, str]] = None, stack: str = "debian12") -> World:
    """A World over one stack's recorded scenarios (domains renamed if asked), clock pinned for the first."""
    fixtures = [load(n, stack) for n in names]
    for fixture in fixtures:
        if rename and fixture["scenario"] in rename:
            fixture["domain"]["name"] = rename[fixture["scenario"]]
    return World(fixtures, now=now_for(fixtures[0]), stack=stack)


def _collect(w: World, **kwargs: Any) -> Tuple[Cycle, Totals]:
    """One real collector cycle over the world; the collector's totals with it."""
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("clock", lambda: STARTED_AT)
    with Collector(clients=[w.client], **kwargs) as collector:
        cycle = collector.collect()
    return cycle, collector.totals


def _cycle(names: List[str], stack: str = "debian12", **kwargs: Any) -> Tuple[Cycle, Totals]:
    return _collect(_world(names, stack=stack), **kwargs)


def _families(text: str) -> Dict[str, Any]:
    """The parsed families by name; a family named twice fails the test."""
    families: Dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} given twice"
        families[family.name] = family
    return families


def _samples(text: str) -> List[Tuple[str, Dict[str, str], float]]:
    """Every sample of an exposition, as (sample name, labels, value)."""
    families = text_string_to_metric_families(text)
    return [(s.name, dict(s.labels), s.value) for f in families for s in f.samples]


def _of(parsed: List[Tuple[str, Dict[str, str], float]], name: str) -> List[Tuple[Dict[str, str], float]]:
    return [(labels, value) for n, labels, value in parsed if n == name]


def _guest_stats_command(fixture: Dict[str, Any]) -> Dict[str, Any]:
    return {"execute": "qom-get", "arguments": {"path": fixture["balloon_path"], "property": "guest-stats"}}


def _recorded_guest_stats(fixture: Dict[str, Any]) -> Dict[str, Any]:
    """The recorded ``guest-stats`` value of a scenario."""
    command = _guest_stats_command(fixture)
    return json.loads(next(q["reply"] for q in fixture["qmp"] if q["command"] == command))["return"]


def _guest_answers(w: World, values: Dict[str, Optional[int]], last_update: int) -> None:
    """Synthetic: from now on QEMU and libvirt both report these figures (``None``: unsupported).

    QEMU's ``guest-stats`` reply is the recorded one with its figures and
    ``last-update`` replaced; libvirt's memoryStats() and bulk record are
    what libvirt makes of them (KiB, unsupported and unnamed figures left
    out), with the recorded ``actual`` and ``rss``, so the cross-check has
    nothing to re-read.
    """
    fixture = w.fixtures[0]
    reply = {"return": {"stats": {n: U64_MAX if v is None else v for n, v in values.items()},
                        "last-update": last_update}}
    w.transport.answer(w.domain.UUIDString(), _guest_stats_command(fixture), json.dumps(reply))
    memory = {k: fixture["memory_stats"][k] for k in ("actual", "rss")}
    kept = ("balloon.current", "balloon.maximum", "balloon.rss")
    record = {k: fixture["all_domain_stats"][k] for k in kept}
    for spec in MAPPED:
        value = values.get(spec.qemu)
        if value is not None:
            memory[spec.libvirt] = record[spec.domstats] = spec.to_libvirt(value)
    memory["last_update"] = record["balloon.last-update"] = last_update
    fixture["memory_stats"], fixture["all_domain_stats"] = memory, record


def _keep_interval(w: World) -> None:
    """QEMU answers the polling interval with its first recorded reply (2 s) from now on.

    The recordings read it again after ``qom-set`` 0 and 3; a status change
    makes the collector re-read it, and this test is not about those.
    """
    fixture = w.fixtures[0]
    command = {
        "execute": "qom-get",
        "arguments": {"path": fixture["balloon_path"], "property": "guest-stats-polling-interval"},
    }
    first = next(q["reply"] for q in fixture["qmp"] if q["command"] == command)
    w.transport.answer(w.domain.UUIDString(), command, first)


def _libvirt_calls(w: World) -> int:
    """Every call that reached the fake libvirt: connection, domains, and QEMU passthrough."""
    return len(w.conn.calls) + sum(len(d.calls) for d in w.domains) + len(w.transport.sent)


# -- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, name",
    [
        (STATS_BY_QEMU_NAME["stat-free-memory"], "virt_balloon_free_memory_bytes"),
        (STATS_BY_QEMU_NAME["stat-swap-in"], "virt_balloon_swap_in_bytes_total"),
        (STATS_BY_QEMU_NAME["stat-minor-faults"], "virt_balloon_minor_faults_total"),
        (STATS_BY_QEMU_NAME["stat-htlb-pgfail"], "virt_balloon_htlb_pgfail_total"),
        (STATS_BY_QEMU_NAME["stat-oom-kills"], "virt_balloon_oom_kills_total"),
        (STATS_BY_QEMU_NAME["stat-alloc-stalls"], "virt_balloon_alloc_stalls_total"),
        (STATS_BY_QEMU_NAME["stat-async-scans"], "virt_balloon_async_scans_bytes_total"),
        (STATS_BY_QEMU_NAME["stat-direct-scans"], "virt_balloon_direct_scans_bytes_total"),
        (STATS_BY_QEMU_NAME["stat-async-reclaims"], "virt_balloon_async_reclaims_bytes_total"),
        (STATS_BY_QEMU_NAME["stat-direct-reclaims"], "virt_balloon_direct_reclaims_bytes_total"),
        (ACTUAL, "virt_balloon_actual_bytes"),
    ],
)
def test_metric_name(spec, name):
    """Unit suffix, then _total for counters."""
    assert metric_name(spec) == name


def test_unknown_spec_metric_name_is_sanitized():
    """Names are made of [a-zA-Z0-9_] only, whatever a newer QEMU calls a stat."""
    assert metric_name(StatSpec("stat-a.b/c", None, None, "count", "")) == "virt_balloon_a_b_c"


# -- the figures of each domain -------------------------------------------------------------


def test_every_known_figure_once_per_domain_in_qemus_unit_with_uri_domain_uuid(stack):
    """Each known figure is exported once per domain, in QEMU's unit, labelled with uri, domain and uuid.

    QEMU 9.2's stats: none from QEMU 7.2, which does not know them; from
    QEMU 10.0 under their own names, with the 6.12 guest's figures (0 when idle).
    """
    cycle, totals = _cycle(["virtio", "virtio-hog"], stack=stack)
    parsed = _samples(render(cycle, totals))
    assert len(cycle.samples) == 2
    for s in cycle.samples:
        mine: Dict[str, List[float]] = {}
        for name, labels, value in parsed:
            if labels.get("uuid") == s.uuid and "status" not in labels:
                assert labels == {"uri": URI, "domain": s.domain, "uuid": s.uuid}, name
                mine.setdefault(name, []).append(value)
        for spec in MAPPED:
            assert s.get(spec.qemu) is not None, spec.qemu  # the recording has every mapped figure
            assert mine[metric_name(spec)] == [s.get(spec.qemu)], spec.qemu
        for spec in UNMAPPED:
            if stack == "debian12":
                assert metric_name(spec) not in mine, spec.qemu
            else:
                assert mine[metric_name(spec)] == [0.0] == [s.get(spec.qemu)], spec.qemu
        assert mine["virt_balloon_actual_bytes"] == [s.actual_bytes]
        assert mine["virt_balloon_last_update_seconds"] == [s.last_update]
        assert mine["virt_balloon_polling_interval_seconds"] == [s.polling.qemu_interval]
        assert mine["virt_balloon_crosscheck_mismatches"] == [0]
        assert mine["virt_balloon_sample_timestamp_seconds"] == [round(s.sampled_at, 3)]
    for name, labels, _ in parsed:
        if "domain" in labels:
            assert DOMAIN_LABELS <= set(labels), name


def test_status_is_one_hot_over_every_status(stack):
    """virt_balloon_status: 1 for the domain's status, 0 for every other Status."""
    cycle, totals = _cycle(["nostats"], stack=stack)
    [sample] = cycle.samples
    assert sample.status is Status.POLLING_DISABLED
    parsed = _samples(render(cycle, totals))
    status = {labels["status"]: value for labels, value in _of(parsed, "virt_balloon_status")}
    assert status == {st.value: float(st is Status.POLLING_DISABLED) for st in Status}


def test_counters_are_exactly_the_cumulative_stats_and_only_they_end_in_total(stack):
    """TYPE counter for exactly the cumulative stats (plus the self-metric counters), samples in _total."""
    cycle, totals = _cycle(["virtio"], stack=stack)
    families = _families(render(cycle, totals))
    counters = {name for name, f in families.items() if f.type == "counter"}
    self_counters = {"virt_balloon_cycles", "virt_balloon_libvirt_calls", "virt_balloon_errors"}
    # QEMU 7.2 has the cumulative stats libvirt maps; QEMU 10.0 all of them, QEMU 9.2's six included.
    reported = MAPPED if stack == "debian12" else STATS
    assert counters == {metric_name(s)[: -len("_total")] for s in reported if s.cumulative} | self_counters
    for name, family in families.items():
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert family.type == "gauge", name
                assert not sample.name.endswith("_total"), sample.name


@pytest.mark.parametrize(
    "stack, name", stack_scenarios(only={"virtio", "virtio-hog", "stale", "paused", "reset"})
)
def test_used_memory_is_served_only_while_the_figures_are_ok(stack, name):
    """virt_balloon_used_memory_bytes is total - available of an ok domain, and absent otherwise.

    A stale or paused domain still has its last figures served, so PromQL
    over them would count a guest's leftovers as use; this series is what
    ``advise --prometheus`` reads.
    """
    cycle, totals = _cycle([name], stack=stack)
    [sample] = cycle.samples
    served = [value for _, value in _of(_samples(render(cycle, totals)), "virt_balloon_used_memory_bytes")]
    if sample.status is Status.OK:
        assert sample.stats is not None
        total, available = sample.get("stat-total-memory"), sample.get("stat-available-memory")
        assert total is not None and available is not None
        assert served == [total - available] and 0 < served[0] < total
    else:
        assert sample.status in (Status.STALE, Status.PAUSED, Status.NEVER_UPDATED)
        assert served == []


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"nodriver", "noos", "reset"}))
def test_unsupported_figures_are_left_out_never_zero(stack, name):
    """No guest driver (or none since a machine reset): no figure series at all, never a 0, no last-update.

    actual is still there, and the domain is never_updated.
    """
    cycle, totals = _cycle([name], stack=stack)
    [sample] = cycle.samples
    assert sample.status is Status.NEVER_UPDATED
    assert sample.stats is not None and all(v is None for v in sample.stats.values.values())
    names = {name for name, _, _ in _samples(render(cycle, totals))}
    assert not names & {metric_name(s) for s in STATS}
    assert "virt_balloon_guest_stat" not in names
    assert "virt_balloon_last_update_seconds" not in names
    assert "virt_balloon_actual_bytes" in names


def test_label_values_round_trip_through_escaping():
    """A domain name with a quote, a backslash and a newline comes back unchanged from the parser."""
    # Synthetic name: libvirt allows these characters; the testbed's names do not have them.
    odd = 'vm "quoted" \\ back\nslash'
    cycle, totals = _collect(_world(["virtio"], rename={"virtio": odd}))
    assert [s.domain for s in cycle.samples] == [odd]
    text = render(cycle, totals)
    assert '\\"quoted\\"' in text and "\\\\" in text and "back\\nslash" in text
    domains = {labels["domain"] for _, labels, _ in _samples(text) if "domain" in labels}
    assert domains == {odd}


def test_unknown_stat_goes_to_guest_stat_with_a_stat_label():
    """A stat unknown to this version is virt_balloon_guest_stat{stat=...}; an unsupported one is left out."""
    w = _world(["virtio"])
    fixture = w.fixtures[0]
    value = _recorded_guest_stats(fixture)
    # Synthetic: names no QEMU has yet.
    value["stats"].update({"stat-from-the-future": 4, "stat-from-the-future-2": U64_MAX})
    _guest_answers(w, value["stats"], value["last-update"])
    cycle, totals = _collect(w, source="qmp")
    [sample] = cycle.samples
    assert sample.stats.values["stat-from-the-future"] == 4
    parsed = _samples(render(cycle, totals))
    extra = [(labels, value) for labels, value in _of(parsed, "virt_balloon_guest_stat")]
    labels = {"uri": URI, "domain": sample.domain, "uuid": sample.uuid, "stat": "stat-from-the-future"}
    assert extra == [(labels, 4.0)]
    assert _of(parsed, "virt_balloon_free_memory_bytes")  # the known ones are still under their names


def test_qemu_9_2_stats_are_counters_under_their_own_names():
    """OOM kills & co are counters named like the others (scans, reclaims in bytes); unsupported: none."""
    w = _world(["virtio"])
    value = _recorded_guest_stats(w.fixtures[0])
    # Synthetic: QEMU 9.2 with a guest driver that sends some of them (the testbed's QEMU 7.2 does not).
    value["stats"].update({
        "stat-oom-kills": 4, "stat-alloc-stalls": 0, "stat-async-scans": 4096 * 1000,
        "stat-direct-scans": U64_MAX, "stat-async-reclaims": 4096 * 800, "stat-direct-reclaims": U64_MAX,
    })
    _guest_answers(w, value["stats"], value["last-update"])
    cycle, totals = _collect(w)
    [sample] = cycle.samples
    assert sample.crosscheck.result.value == "agree"
    text = render(cycle, totals)
    families, parsed = _families(text), _samples(text)
    ids = {"uri": URI, "domain": sample.domain, "uuid": sample.uuid}
    assert _of(parsed, "virt_balloon_oom_kills_total") == [(ids, 4.0)]
    assert _of(parsed, "virt_balloon_alloc_stalls_total") == [(ids, 0.0)]
    assert _of(parsed, "virt_balloon_async_scans_bytes_total") == [(ids, 4096.0 * 1000)]
    assert _of(parsed, "virt_balloon_async_reclaims_bytes_total") == [(ids, 4096.0 * 800)]
    for name in ("virt_balloon_oom_kills", "virt_balloon_async_scans_bytes"):
        assert families[name].type == "counter"
        assert "QEMU's stat-" in families[name].documentation
    assert not _of(parsed, "virt_balloon_direct_scans_bytes_total")
    assert not _of(parsed, "virt_balloon_direct_reclaims_bytes_total")
    assert not _of(parsed, "virt_balloon_guest_stat")
    assert _of(parsed, "virt_balloon_crosscheck_mismatches") == [(ids, 0.0)]


def test_reset_sequence_figures_then_nothing_then_figures_again():
    """figures -> machine reset (last-update 0, all unsupported) -> small figures: what each scrape shows.

    While the figures are unsupported the counter series are absent (not 0,
    not 2^64-1), so Prometheus sees a gap and then a lower value: a counter
    reset, which rate() handles. No _created sample is exported at any step.
    """
    w = _world(["virtio"])
    _keep_interval(w)
    recorded = _recorded_guest_stats(w.fixtures[0])
    since = recorded["last-update"]
    clock = [since + 1.0]
    client = BalloonStats(w.host, QMPClient(w.transport), clock=lambda: clock[0])
    # Synthetic: QEMU 10.0 with a guest that sends QEMU 9.2's stats too.
    before = dict(recorded["stats"], **{s.qemu: 1000 + i for i, s in enumerate(UNMAPPED)})
    before["stat-minor-faults"] = 5000
    after = {name: 0 for name in before}
    after.update({"stat-minor-faults": 40, "stat-free-memory": before["stat-free-memory"],
                  "stat-total-memory": before["stat-total-memory"],
                  "stat-available-memory": before["stat-available-memory"], "stat-oom-kills": 1})
    steps = [
        ("figures", before, since, since + 1.0),
        ("reset", {name: None for name in before}, 0, since + 30.0),
        ("again", after, since + 40, since + 41.0),
    ]
    counters = [s for s in STATS if s.cumulative]
    with Collector(clients=[client], timeout=TIMEOUT, clock=lambda: clock[0]) as collector:
        for step, values, last_update, now in steps:
            _guest_answers(w, values, last_update)
            clock[0] = now
            cycle = collector.collect()
            [sample] = cycle.samples
            text = render(cycle, collector.totals)
            families, parsed = _families(text), _samples(text)
            ids = {"uri": URI, "domain": sample.domain, "uuid": sample.uuid}
            status = {labels["status"]: value for labels, value in _of(parsed, "virt_balloon_status")}
            assert "_created" not in text, step
            assert str(U64_MAX) not in text and "1.8446744073709552e+19" not in text, step
            assert _of(parsed, "virt_balloon_crosscheck_mismatches") == [(ids, 0.0)], step
            assert _of(parsed, "virt_balloon_actual_bytes") == [(ids, float(sample.actual_bytes))], step
            for family in families.values():
                if family.type == "counter":
                    assert all(x.name.endswith("_total") for x in family.samples), family.name
            if step == "reset":
                assert sample.status is Status.NEVER_UPDATED, step
                assert status[Status.NEVER_UPDATED.value] == 1.0 and sum(status.values()) == 1.0
                assert not {metric_name(s) for s in STATS} & {name for name, _, _ in parsed}
                assert not _of(parsed, "virt_balloon_guest_stat")
                assert not _of(parsed, "virt_balloon_last_update_seconds")
                continue
            assert sample.status is Status.OK, (step, sample.message)
            assert _of(parsed, "virt_balloon_last_update_seconds") == [(ids, float(last_update))], step
            for spec in counters:
                assert families[metric_name(spec)[: -len("_total")]].type == "counter", spec.qemu
                assert _of(parsed, metric_name(spec)) == [(ids, float(values[spec.qemu]))], (step, spec.qemu)
    assert after["stat-minor-faults"] < before["stat-minor-faults"]  # what Prometheus reads as a reset


def test_help_and_type_once_per_family_with_many_domains(stack):
    """Several domains share each family's HELP and TYPE lines (a repeat would be rejected by Prometheus)."""
    cycle, totals = _cycle(["virtio", "virtio-hog", "transitional", "nostats", "none"], stack=stack)
    text = render(cycle, totals)
    helps = [line.split(" ")[2] for line in text.splitlines() if line.startswith("# HELP ")]
    types = [line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and len(types) == len(set(types))
    assert helps == types
    families = _families(text)  # also fails on a family given twice
    with_figures = [s for s in cycle.samples if s.get("stat-free-memory") is not None]
    assert len(with_figures) == 4  # every scenario here but "none" (no balloon)
    assert len(families["virt_balloon_free_memory_bytes"].samples) == len(with_figures)
    assert len(families["virt_balloon_status"].samples) == 5 * len(Status)


# -- per host, per cycle, and over the collector's life ---------------------------------------


def _two_hosts_one_lost() -> Tuple[Cycle, Totals]:
    """Two connections, two cycles; libvirtd behind the first one went away before the second."""
    here, there = _world(["virtio-hog", "nostats"]), _world(["noos"])
    remote = BalloonStats(Host(there.conn, OTHER_URI), QMPClient(there.transport), clock=there.client.clock)
    with Collector(clients=[here.client, remote], timeout=TIMEOUT, clock=lambda: STARTED_AT) as collector:
        collector.collect()
        here.conn.lose()
        cycle = collector.collect()
    return cycle, collector.totals


def test_up_per_uri():
    """virt_balloon_up{uri} tells a host that answered (1) from a libvirtd that could not be reached (0)."""
    cycle, totals = _two_hosts_one_lost()
    assert not cycle.hosts[URI].up and cycle.hosts[OTHER_URI].up
    up = _of(_samples(render(cycle, totals)), "virt_balloon_up")
    assert [labels.keys() for labels, _ in up] == [{"uri"}, {"uri"}]
    assert {labels["uri"]: value for labels, value in up} == {URI: 0.0, OTHER_URI: 1.0}


def test_domains_counts_by_uri_and_status():
    """virt_balloon_domains{uri,status}: every status per URI, zeros included, counts from the cycle."""
    cycle, totals = _two_hosts_one_lost()
    counts = {
        (labels["uri"], labels["status"]): value
        for labels, value in _of(_samples(render(cycle, totals)), "virt_balloon_domains")
    }
    expected = {(uri, st.value): 0.0 for uri in (URI, OTHER_URI) for st in Status}
    expected[(URI, "unreachable")] = 2.0
    expected[(OTHER_URI, "never_updated")] = 1.0
    assert counts == expected


def test_self_metrics_are_the_collectors_totals():
    """cycles_total, calls and errors by URI, and the last success: all from Totals."""
    cycle, totals = _two_hosts_one_lost()
    assert totals.cycles == 2 and totals.errors == {"ConnectionFailed": 2}
    parsed = _samples(render(cycle, totals))
    assert _of(parsed, "virt_balloon_cycles_total") == [({}, 2.0)]
    calls: dict = {}
    for labels, value in _of(parsed, "virt_balloon_libvirt_calls_total"):
        assert labels["uri"] in (URI, OTHER_URI)
        calls[labels["call"]] = calls.get(labels["call"], 0.0) + value
    assert calls == {call: float(count) for call, count in totals.calls.items()}  # per URI, summing up
    assert calls["qemuMonitorCommand"] > 0
    errors = {
        (labels["uri"], labels["kind"]): value for labels, value in _of(parsed, "virt_balloon_errors_total")
    }
    # The lost host's two domains; the kinds alerts look for are there at 0 on every URI.
    assert errors == {
        (URI, "ConnectionFailed"): 2.0,
        (URI, "unresponsive"): 0.0,
        (OTHER_URI, "ConnectionFailed"): 0.0,
        (OTHER_URI, "unresponsive"): 0.0,
    }
    last = {
        labels["uri"]: value for labels, value in _of(parsed, "virt_balloon_last_success_timestamp_seconds")
    }
    assert last == {URI: round(STARTED_AT, 3), OTHER_URI: round(STARTED_AT, 3)}
    assert last.keys() == totals.last_up.keys()


def test_cycle_timestamp_and_duration():
    """The served cycle's start (the collector's clock) and how long it took."""
    cycle, totals = _cycle(["virtio"])
    parsed = _samples(render(cycle, totals))
    assert _of(parsed, "virt_balloon_cycle_timestamp_seconds") == [({}, round(STARTED_AT, 3))]
    [(_, duration)] = _of(parsed, "virt_balloon_cycle_duration_seconds")
    assert duration == round(cycle.duration, 6)
    assert 0 <= duration < TIMEOUT


def test_families_of_no_cycle_is_empty():
    """Before the first cycle a scrape has no series at all: no domain, not even an up of 0."""
    assert families_of(None) == []
    assert families_of(None, Totals()) == []
    assert generate_latest(registry_for(CycleMetrics(lambda: None))) == b""


def test_families_of_without_totals_has_no_self_counters():
    """Without Totals (a bare cycle) the per-cycle figures are there, the lifetime counters are not."""
    cycle, _ = _cycle(["virtio"])
    names = {f.name for f in families_of(cycle)}
    assert {"virt_balloon_up", "virt_balloon_status", "virt_balloon_cycle_timestamp_seconds"} <= names
    assert not names & {"virt_balloon_cycles", "virt_balloon_libvirt_calls", "virt_balloon_errors"}


# -- the custom collector -------------------------------------------------------------------


def test_cycle_metrics_reads_the_cycle_at_every_scrape_and_never_calls_libvirt():
    """Each scrape asks its getter for the cycle again, and makes no call to libvirt or QEMU."""
    w = _world(["virtio", "nostats"])
    collector = Collector(clients=[w.client], timeout=TIMEOUT)
    asked: List[Optional[Cycle]] = []

    def current() -> Optional[Cycle]:
        asked.append(collector.last)
        return collector.last

    registry = registry_for(CycleMetrics(current, lambda: collector.totals))
    try:
        assert generate_latest(registry) == b""  # no cycle yet
        first = collector.collect()
        before = _libvirt_calls(w)
        assert before > 0
        texts = [generate_latest(registry).decode() for _ in range(3)]
        assert _libvirt_calls(w) == before
        assert asked == [None, first, first, first]
        assert all(_of(_samples(t), "virt_balloon_cycles_total") == [({}, 1.0)] for t in texts)
        second = collector.collect()
        text = generate_latest(registry).decode()
    finally:
        collector.stop()
    assert asked[-1] is second
    assert _of(_samples(text), "virt_balloon_cycles_total") == [({}, 2.0)]


def test_registry_is_its_own_not_the_global_one():
    """registry_for gives a fresh registry each time; the global one never sees these families."""
    from prometheus_client import REGISTRY

    cycle, totals = _cycle(["virtio"])
    metrics = CycleMetrics(lambda: cycle, lambda: totals)
    registry = registry_for(metrics)
    assert registry is not REGISTRY and registry_for(metrics) is not registry
    assert "virt_balloon_up" in generate_latest(registry).decode()
    assert "virt_balloon_" not in generate_latest(REGISTRY).decode()


# -- the textfile ---------------------------------------------------------------------------


def test_write_textfile_replaces_the_file_atomically(tmp_path):
    """The final file parses and equals the rendering; no temporary file is left beside it."""
    cycle, totals = _cycle(["virtio", "nodriver"])
    path = tmp_path / "virt_balloon.prom"
    path.write_text("old content that is not the exposition format\n")
    write_textfile(str(path), cycle, totals)
    text = path.read_text()
    assert text == render(cycle, totals)
    assert "virt_balloon_up" in _families(text)
    assert os.listdir(tmp_path) == ["virt_balloon.prom"]


@pytest.mark.parametrize("where", ["missing-dir/x.prom", "a-directory"])
def test_write_textfile_to_a_bad_place_raises_invalid_argument(tmp_path, where):
    """A directory that does not exist, or a path that is a directory: InvalidArgument, nothing left over."""
    (tmp_path / "a-directory").mkdir()
    cycle, totals = _cycle(["virtio"])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidArgument) as info:
        write_textfile(str(tmp_path / where), cycle, totals)
    assert str(tmp_path / where) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "a-directory") == []


# -- the command line -------------------------------------------------------------------------------


def test_cli_textfile_with_format_json_is_a_usage_error(tmp_path):
    """--textfile writes the Prometheus format: with --format json it is refused (exit 2), nothing written."""
    path = tmp_path / "x.prom"
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["stats", "--all", "--textfile", str(path), "--format", "json"], out=out, err=err)
    assert code == 2 and out.getvalue() == ""
    assert "--textfile" in err.getvalue()
    assert not path.exists()


def test_a_domain_between_its_crosscheck_turns_keeps_its_last_comparison_and_its_time():
    """A collector compares each domain one cycle in a few. Between turns the mismatch series is
    served from the last comparison (no gap in the series) with the time it was made; a sample
    never compared has neither."""
    import dataclasses

    from virt_balloon_stats.crosscheck import skipped
    from virt_balloon_stats.reading import NOT_THIS_TURN

    w = _world(["virtio-hog"])
    cycle, totals = _collect(w)
    [compared] = cycle.samples
    assert compared.crosscheck.result.value == "agree" and compared.crosscheck.at == compared.sampled_at
    ids = {"uri": URI, "domain": compared.domain, "uuid": compared.uuid}

    def served(sample: Any) -> Tuple[Any, Any]:
        parsed = _samples(render(dataclasses.replace(cycle, samples=(sample,)), totals))
        return (_of(parsed, "virt_balloon_crosscheck_mismatches"),
                _of(parsed, "virt_balloon_crosscheck_timestamp_seconds"))

    assert served(compared) == ([(ids, 0.0)], [(ids, round(compared.crosscheck.at, 3))])
    later = dataclasses.replace(
        compared, sampled_at=compared.sampled_at + 15,
        crosscheck=skipped(NOT_THIS_TURN, previous=compared.crosscheck),
    )
    assert served(later) == ([(ids, 0.0)], [(ids, round(compared.crosscheck.at, 3))])
    never = dataclasses.replace(compared, crosscheck=skipped(NOT_THIS_TURN))
    assert served(never) == ([], [])


# -- the exposition writer ----------------------------------------------------------------------

def _library_bytes(families: List[Any], openmetrics: bool) -> bytes:
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

    class Fixed:
        def collect(self) -> Any:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return openmetrics_latest(registry) if openmetrics else generate_latest(registry)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_the_exposition_writer_writes_the_librarys_bytes(stack, name, openmetrics):
    """Every recorded scenario, both formats: byte for byte what prometheus_client writes."""
    from virt_balloon_stats.metrics import exposition, families_of

    cycle, totals = _cycle([name], stack=stack)
    families = families_of(cycle, totals)
    assert exposition(families, openmetrics=openmetrics) == _library_bytes(families, openmetrics)


@settings(max_examples=150, deadline=None)
@given(
    domain=st.text(min_size=1, max_size=30),
    uri=st.text(max_size=20),
    value=st.one_of(st.integers(min_value=-(2**63), max_value=2**64), st.floats(allow_nan=True)),
    documentation=st.text(max_size=30),
)
def test_the_exposition_writer_escapes_as_the_library_does(domain, uri, value, documentation):
    """Quotes, backslashes, newlines and any Unicode in label values and help; any value."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from virt_balloon_stats.metrics import exposition

    gauge = GaugeMetricFamily("virt_balloon_x_bytes", documentation, labels=["uri", "domain"])
    gauge.add_metric([uri, domain], value)
    counter = CounterMetricFamily("virt_balloon_y", documentation, labels=["domain"])
    counter.add_metric([domain], abs(value) if value == value else 0)
    bare = GaugeMetricFamily("virt_balloon_z", documentation, value=1)
    for openmetrics in (False, True):
        families = [gauge, counter, bare]
        assert exposition(families, openmetrics=openmetrics) == _library_bytes(families, openmetrics)


def test_the_exposition_writer_declines_what_it_does_not_write():
    """Another type, a unit, a timestamp: None, and the caller uses the library's encoder."""
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    from virt_balloon_stats.metrics import exposition

    histogram = HistogramMetricFamily("virt_balloon_h", "h", buckets=[("1.0", 1), ("+Inf", 2)], sum_value=3)
    with_unit = GaugeMetricFamily("virt_balloon_u_bytes", "u", value=1, unit="bytes")
    stamped = GaugeMetricFamily("virt_balloon_t", "t", labels=["a"])
    stamped.add_metric(["b"], 1, timestamp=1700000000)
    for family in (histogram, with_unit, stamped):
        assert exposition([family], openmetrics=False) is None
        assert exposition([family], openmetrics=True) is None

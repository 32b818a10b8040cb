"""virt_balloon_stats.client: BalloonStats over fake libvirt domains and recorded QMP replies.

Each recorded scenario of both stacks is sampled through the real client,
host, transport and QMP layers; only libvirt (domains, connection,
qemuMonitorCommand) is fake. The clock is pinned per scenario (see
conftest.EXPECTED_STATUS).
"""

from __future__ import annotations

import copy
import json
import time

import libvirt
import pytest

from tests.fakelibvirt import FakeDomain
from tests.unit.conftest import (
    EXPECTED_STATUS,
    World,
    balloon,
    libvirt_error_record,
    load,
    now_for,
    qmp_replies,
    recorded_error,
    scenario_names,
    stack_scenarios,
    world,
)
from virt_balloon_stats.client import BalloonStats
from virt_balloon_stats.crosscheck import Result
from virt_balloon_stats.errors import (
    DomainNotFound,
    DomainNotRunning,
    InvalidArgument,
    NoBalloonDevice,
    QEMUUnresponsive,
    QMPBadReply,
)
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.qompath import QOMPath
from virt_balloon_stats.reading import CROSSCHECK_ATTEMPTS, DomainMemo
from virt_balloon_stats.stats import STATS, Status, parse_guest_stats

#: The keys of the JSON document every front end prints.
DOCUMENTED_KEYS = {
    "domain", "uuid", "id", "state", "source", "qom_path", "qom_type", "polling_interval",
    "libvirt_period", "last_update", "age", "status", "message", "actual", "stats", "libvirt",
    "crosscheck",
}


def test_every_scenario_has_an_expected_status(stack):
    """A newly recorded scenario must be given its expected status; only the next set has ``reset``."""
    missing = {"reset"} if stack == "debian12" else set()
    assert set(scenario_names(stack)) == set(EXPECTED_STATUS) - missing


def _qom_get(fixture, prop):
    return {"execute": "qom-get", "arguments": {"path": fixture["balloon_path"], "property": prop}}


def _guest_stats(fixture):
    """The last recorded guest-stats value of the scenario, as QEMU said it."""
    return qmp_replies(fixture, _qom_get(fixture, "guest-stats"))[-1]["return"]


def _interval(fixture):
    """QEMU's polling interval before the recorder changed it."""
    return qmp_replies(fixture, _qom_get(fixture, POLLING_PROPERTY))[0]["return"]


def _actual(fixture):
    return qmp_replies(fixture, {"execute": "query-balloon"})[-1]["return"]["actual"]


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_sample_gives_the_expected_status(stack, name):
    """source=both: each recorded situation is classified as what it is."""
    w = world(name, stack)
    sample = w.client.sample(w.fixtures[0]["domain"]["name"])
    assert sample.status.value == EXPECTED_STATUS[name]
    assert sample.error is None
    assert sample.domain == w.fixtures[0]["domain"]["name"]
    assert sample.uuid == w.fixtures[0]["domain"]["uuid"]
    assert sample.id == w.fixtures[0]["domain"]["id"]


@pytest.mark.parametrize("stack, name", stack_scenarios(exclude={"none"}))
def test_sample_both_figures_are_qemus_and_agree_with_libvirt(stack, name):
    """The figures are QEMU's own; the cross-check with libvirt agrees on the recorded pair."""
    fixture = load(name, stack)
    w = world(name, stack)
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.stats == parse_guest_stats(_guest_stats(fixture))
    assert sample.actual_bytes == _actual(fixture)
    assert sample.polling.qemu_interval == _interval(fixture)
    assert sample.polling.libvirt_period == balloon(fixture).stats_period
    assert sample.qom_path.path == fixture["balloon_path"]
    assert sample.libvirt == fixture["memory_stats"]
    assert sample.crosscheck.result is Result.AGREE


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_sample_both_reads_memory_stats_once(stack, name):
    """One memoryStats() per sample when QEMU and libvirt saw the same update.

    Never-updated domains count: QEMU's last-update 0 and libvirt's
    last_update 0 are the same "never", so there is nothing to re-read.
    """
    w = world(name, stack)
    w.client.sample(w.fixtures[0]["domain"]["name"])
    assert len(w.domain.calls_to("memoryStats")) == 1


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_to_dict_has_every_documented_key(stack, name):
    """The JSON document: every documented key, crosscheck with result, checked and mismatches."""
    fixture = load(name, stack)
    w = world(name, stack)
    doc = w.client.sample(fixture["domain"]["name"]).to_dict()
    assert DOCUMENTED_KEYS <= set(doc)
    assert {"result", "checked", "mismatches"} <= set(doc["crosscheck"])
    assert json.loads(json.dumps(doc)) == doc
    assert doc["status"] == EXPECTED_STATUS[name]
    assert doc["domain"] == fixture["domain"]["name"]
    assert doc["uri"] == w.host.uri


def test_to_dict_values_of_a_healthy_domain(stack):
    """Values in the document are the recorded ones, bytes inside; age from the pinned clock.

    QEMU 10.0's figures include QEMU 9.2's six, which the cross-check lists as
    QEMU's only; QEMU 7.2 has none of them.
    """
    fixture = load("virtio", stack)
    w = world("virtio", stack)
    doc = w.client.sample(fixture["domain"]["name"]).to_dict()
    value = _guest_stats(fixture)
    assert doc["qom_path"] == fixture["balloon_path"]
    assert doc["qom_type"] == "virtio-balloon-pci"
    assert doc["polling_interval"] == _interval(fixture)
    assert doc["libvirt_period"] == 2
    assert doc["last_update"] == value["last-update"]
    assert doc["age"] == round(now_for(fixture) - value["last-update"], 1)
    assert doc["actual"] == _actual(fixture)
    assert doc["stats"] == value["stats"]
    assert doc["used"] == value["stats"]["stat-total-memory"] - value["stats"]["stat-available-memory"]
    assert doc["libvirt"] == fixture["memory_stats"]
    assert doc["crosscheck"]["result"] == "agree"
    assert doc["crosscheck"]["checked"] == sum(1 for s in STATS if s.libvirt) + 1
    assert doc["crosscheck"]["mismatches"] == []
    unmapped = [s.qemu for s in STATS if s.libvirt is None]
    assert doc["crosscheck"]["qmp_only"] == ([] if stack == "debian12" else unmapped)
    assert (set(unmapped) <= set(doc["stats"])) is (stack == "next")
    assert doc["state"] == "running" and doc["source"] == "both"


def test_guest_answering_between_reads_is_inconclusive_after_retries():
    """libvirt keeps seeing a newer update than QEMU: re-read both, then inconclusive, never a mismatch.

    Synthetic: the recorded memoryStats() moved 2 s (one period) ahead, with
    different figures, as if the guest answered between the two reads.
    """
    fixture = load("virtio")
    fixture["memory_stats"]["last_update"] += 2
    fixture["memory_stats"]["unused"] += 1
    w = World([fixture], now=now_for(fixture))
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.crosscheck.result is Result.INCONCLUSIVE
    assert sample.status is Status.OK
    assert len(w.domain.calls_to("memoryStats")) == 1 + CROSSCHECK_ATTEMPTS
    reads = w.transport.commands("qom-get")
    guest_stats_reads = [c for c in reads if c["arguments"]["property"] == "guest-stats"]
    assert len(guest_stats_reads) == CROSSCHECK_ATTEMPTS


def test_no_balloon_sends_no_qmp_at_all():
    """model='none': nothing to ask QEMU; libvirt's figures (rss only) are kept."""
    fixture = load("none")
    w = world("none")
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.status is Status.NO_BALLOON
    assert w.transport.sent == []
    assert sample.libvirt == fixture["memory_stats"]
    assert sample.to_dict()["qom_path"] is None
    assert sample.crosscheck.result is Result.SKIPPED


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_source_libvirt_sends_no_qmp_command(stack, name):
    """source=libvirt never touches the passthrough (no taint) and still classifies."""
    fixture = load(name, stack)
    w = world(name, stack)
    sample = w.client.sample(fixture["domain"]["name"], source="libvirt")
    assert w.transport.sent == []
    assert "qemuMonitorCommand" not in w.client.rpc_counts
    assert sample.source == "libvirt"
    assert sample.libvirt == fixture["memory_stats"]
    assert sample.polling.qemu_interval is None
    assert sample.crosscheck.result is Result.SKIPPED
    expected = EXPECTED_STATUS[name]
    assert sample.status.value == expected


def test_source_libvirt_figures_are_kib_times_1024(stack):
    """The libvirt source rebuilds QEMU-named figures in bytes."""
    fixture = load("virtio-hog", stack)
    w = world("virtio-hog", stack)
    sample = w.client.sample(fixture["domain"]["name"], source="libvirt")
    assert sample.get("stat-free-memory") == fixture["memory_stats"]["unused"] * 1024
    assert sample.get("stat-total-memory") == fixture["memory_stats"]["available"] * 1024
    assert sample.get("stat-minor-faults") == fixture["memory_stats"]["minor_fault"]
    assert sample.actual_bytes == fixture["memory_stats"]["actual"] * 1024


@pytest.mark.parametrize("stack, name", stack_scenarios(exclude={"none"}))
def test_source_qmp_calls_no_memory_stats(stack, name):
    """source=qmp: no memoryStats(), no libvirt figures, the cross-check skipped."""
    fixture = load(name, stack)
    w = world(name, stack)
    sample = w.client.sample(fixture["domain"]["name"], source="qmp")
    assert w.domain.calls_to("memoryStats") == []
    assert sample.libvirt is None
    assert sample.crosscheck.result is Result.SKIPPED
    assert sample.status.value == EXPECTED_STATUS[name]
    assert sample.stats == parse_guest_stats(_guest_stats(fixture))


def test_sample_sends_exactly_the_read_commands(stack):
    """One sample: interval (at the alias's path, which it confirms), guest-stats and actual; nothing else."""
    fixture = load("virtio", stack)
    path = fixture["balloon_path"]
    w = world("virtio", stack)
    sample = w.client.sample(fixture["domain"]["name"])
    assert (sample.qom_path.path, sample.qom_path.method) == (path, "alias")
    assert w.transport.commands() == [
        {"execute": "qom-get", "arguments": {"path": path, "property": POLLING_PROPERTY}},
        {"execute": "qom-get", "arguments": {"path": path, "property": "guest-stats"}},
        {"execute": "query-balloon"},
    ]
    assert all(s["flags"] == 0 for s in w.transport.sent)
    assert all('"id"' not in s["raw"] for s in w.transport.sent)


def test_rpc_counts_of_one_sample_and_a_second_one():
    """Round trips by call; the alias's path needs no qom-list, and the second sample reuses it."""
    fixture = load("virtio")
    w = world("virtio")
    guest = w.client.guest(fixture["domain"]["name"])
    w.client.sample(guest)
    assert w.client.rpc_counts == {
        "lookupByName": 1, "state": 1, "XMLDesc": 1, "memoryStats": 1, "qemuMonitorCommand": 3,
    }
    w.client.sample(guest)
    assert w.client.rpc_counts["qemuMonitorCommand"] == 3 + 3
    assert w.client.rpc_counts["memoryStats"] == 2


def test_error_mid_sample_is_unreachable_with_typed_error():
    """The domain stops between the look-up and the guest-stats read (recorded error 55)."""
    fixture = load("virtio")
    command = _qom_get(fixture, "guest-stats")
    w = world("virtio", qmp_raises=[(command, recorded_error("monitor-command-not-running"))])
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.status is Status.UNREACHABLE
    assert isinstance(sample.error, DomainNotRunning)
    assert sample.error.code == libvirt_error_record("monitor-command-not-running")["code"]
    assert isinstance(sample.error.__cause__, libvirt.libvirtError)
    assert sample.message == str(sample.error)
    assert sample.state == "running"
    assert sample.polling.libvirt_period == 2
    assert sample.crosscheck.result is Result.SKIPPED
    assert sample.to_dict()["status"] == "unreachable"


def test_memory_stats_failure_is_unreachable():
    """memoryStats raising (recorded 'not running') also ends as an unreachable sample."""
    fixture = load("virtio")
    dom = FakeDomain(fixture, raises={"memoryStats": recorded_error("memory-stats-not-running")})
    w = World([fixture], domains=[dom], now=now_for(fixture))
    sample = w.client.sample(fixture["domain"]["name"], source="libvirt")
    assert sample.status is Status.UNREACHABLE
    assert isinstance(sample.error, DomainNotRunning)


def test_unknown_domain_raises_domain_not_found():
    """A name that matches nothing is an error for the caller, not an unreachable sample."""
    w = world("virtio")
    with pytest.raises(DomainNotFound):
        w.client.sample("vbs-tb-rec-nope")


def test_unknown_source_is_refused_before_any_call():
    """Sources are both, qmp, libvirt."""
    w = world("virtio")
    with pytest.raises(InvalidArgument) as info:
        w.client.sample(w.fixtures[0]["domain"]["name"], source="virsh")
    assert "both, qmp, libvirt" in str(info.value)
    assert w.client.rpc_counts == {}


def test_vanished_qom_path_is_resolved_again(stack):
    """QEMU says DeviceNotFound for a cached path: the cache is dropped and the path found again.

    The recorded DeviceNotFound reply for /machine/peripheral/nope is reused for
    the interval read at that path: QEMU's reply to a missing path does not
    depend on the property asked.
    """
    fixture = load("virtio", stack)
    nope = "/machine/peripheral/nope"
    not_found = next(
        q["reply"] for q in fixture["qmp"] if q["command"].get("arguments", {}).get("path") == nope
    )
    fixture["qmp"].append({
        "command": {"execute": "qom-get", "arguments": {"path": nope, "property": POLLING_PROPERTY}},
        "reply": not_found,
    })
    w = World([fixture], now=now_for(fixture), stack=stack)
    guest = w.client.guest(fixture["domain"]["name"])
    w.client.paths.put(guest, QOMPath(nope, "virtio-balloon-pci", "alias", "stale entry"))
    sample = w.client.sample(guest)
    assert sample.status is Status.OK
    assert sample.qom_path.path == fixture["balloon_path"]
    assert w.client.paths.get(guest).path == fixture["balloon_path"]


# -- polling interval ---------------------------------------------------------

BAD_VALUES = [-1, True, 2.5, "two", "", None, 2**32]


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
@pytest.mark.parametrize("via", ["libvirt", "qmp"])
def test_set_polling_interval_refuses_bad_values_with_nothing_sent(value, via):
    """Refused before any call: no QMP command, no setMemoryStatsPeriod, no look-up."""
    w = world("virtio")
    with pytest.raises(InvalidArgument):
        w.client.set_polling_interval(w.fixtures[0]["domain"]["name"], value, via=via)
    assert w.transport.sent == []
    assert w.domain.calls_to("setMemoryStatsPeriod") == []
    assert w.conn.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [dict(via="qmp", config=True), dict(via="qmp", live=False, config=True), dict(live=False, config=False)],
)
def test_set_polling_interval_refuses_impossible_combinations(kwargs):
    """config needs the libvirt route; asking for neither live nor config changes nothing."""
    w = world("virtio")
    with pytest.raises(InvalidArgument):
        w.client.set_polling_interval(w.fixtures[0]["domain"]["name"], 5, **kwargs)
    assert w.transport.sent == []
    assert w.domain.calls_to("setMemoryStatsPeriod") == []


def test_set_polling_interval_via_qmp_sends_exactly_one_qom_set():
    """The qmp route: one qom-set of guest-stats-polling-interval, no libvirt call; drift reported."""
    fixture = load("virtio")
    w = world("virtio")
    state = w.client.set_polling_interval(fixture["domain"]["name"], 0, via="qmp")
    assert w.transport.commands("qom-set") == [{
        "execute": "qom-set",
        "arguments": {"path": fixture["balloon_path"], "property": POLLING_PROPERTY, "value": 0},
    }]
    assert w.domain.calls_to("setMemoryStatsPeriod") == []
    assert state.changed_from == _interval(fixture)
    assert state.qemu_interval == 0
    assert state.libvirt_period == balloon(fixture).stats_period
    assert state.drift


def test_set_polling_interval_via_libvirt_calls_set_memory_stats_period_live():
    """The libvirt route: setMemoryStatsPeriod(N, AFFECT_LIVE), no qom-set."""
    fixture = load("virtio")
    w = world("virtio")
    state = w.client.set_polling_interval(fixture["domain"]["name"], "0")
    assert w.domain.calls_to("setMemoryStatsPeriod") == [(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)]
    assert w.transport.commands("qom-set") == []
    assert state.changed_from == _interval(fixture)
    assert state.qemu_interval == 0


def test_set_polling_interval_config_only_reads_the_persistent_period():
    """config without live: AFFECT_CONFIG, no "before", libvirt's period from the inactive XML."""
    fixture = load("virtio")
    w = world("virtio")
    state = w.client.set_polling_interval(fixture["domain"]["name"], 7, live=False, config=True)
    assert w.domain.calls_to("setMemoryStatsPeriod") == [(7, libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
    assert state.changed_from is None
    assert state.libvirt_period == balloon(fixture, inactive=True).stats_period
    assert (libvirt.VIR_DOMAIN_XML_INACTIVE,) in w.domain.calls_to("XMLDesc")


def test_polling_of_a_running_domain(stack):
    """QEMU's interval next to libvirt's period: nostats has QEMU 0 and no <stats>."""
    fixture = load("nostats", stack)
    w = world("nostats", stack)
    state = w.client.polling(fixture["domain"]["name"])
    assert state.qemu_interval == _interval(fixture) == 0
    assert state.libvirt_period is None
    assert not state.drift


def test_polling_of_a_domain_that_is_not_running_asks_only_libvirt():
    """No QEMU to ask: the persistent period from the inactive XML."""
    fixture = load("virtio")
    w = World([fixture], domains=[FakeDomain(fixture, dom_id=-1)])
    state = w.client.polling(fixture["domain"]["uuid"])
    assert state.qemu_interval is None
    assert state.libvirt_period == balloon(fixture, inactive=True).stats_period
    assert w.transport.sent == []


def test_polling_without_balloon_is_no_balloon_device():
    """model='none' has no timer to read."""
    w = world("none")
    with pytest.raises(NoBalloonDevice):
        w.client.polling(w.fixtures[0]["domain"]["name"])
    assert w.transport.sent == []


def test_rearm_sets_the_current_interval_again(stack):
    """rearm = set the same interval via libvirt, which restarts QEMU's timer."""
    fixture = load("stale", stack)
    w = world("stale", stack)
    w.client.rearm(fixture["domain"]["name"])
    assert w.domain.calls_to("setMemoryStatsPeriod") == [(_interval(fixture), libvirt.VIR_DOMAIN_AFFECT_LIVE)]


def test_rearm_with_polling_disabled_is_refused():
    """Nothing to re-arm when the interval is 0; nothing is set."""
    w = world("nostats")
    with pytest.raises(InvalidArgument) as info:
        w.client.rearm(w.fixtures[0]["domain"]["name"])
    assert "disabled" in str(info.value)
    assert w.domain.calls_to("setMemoryStatsPeriod") == []
    assert w.transport.commands("qom-set") == []


# -- one domain within a deadline ---------------------------------------------------------------


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_sample_within_a_deadline_reads_what_sample_reads(stack, name):
    """QEMU answers: the deadline changes nothing, figure for figure."""
    domain = load(name, stack)["domain"]["name"]
    within = world(name, stack).client.sample(domain, timeout=30)
    assert within.to_dict() == world(name, stack).client.sample(domain).to_dict()


def test_sample_of_a_qemu_that_does_not_answer_is_unresponsive_on_time():
    """A stopped QEMU holds the call; the caller gets an unresponsive sample at the deadline, not a hang."""
    w = world("virtio")
    release = w.domain.hang()
    try:
        began = time.monotonic()
        sample = w.client.sample(w.guest(), timeout=0.3)
        took = time.monotonic() - began
        assert w.domain.held() == 1
    finally:
        release.set()
    assert 0.3 <= took < 2.0, took
    assert sample.status is Status.UNRESPONSIVE
    assert sample.message == "QEMU did not answer within 0 s; it may be hung or stopped"
    assert isinstance(sample.error, QEMUUnresponsive)
    assert (sample.domain, sample.uuid, sample.id) == (w.domain.name(), w.domain.UUIDString(), w.domain.ID())
    assert (sample.stats, sample.actual_bytes, sample.libvirt) == (None, None, None)
    assert sample.to_dict()["stats"] == {}


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "5"])
def test_sample_refuses_a_bad_deadline_before_any_call(timeout):
    w = world("virtio")
    with pytest.raises(InvalidArgument, match="timeout must be more than 0 seconds"):
        w.client.sample(w.guest(), timeout=timeout)
    assert w.client.rpc_counts == {}


def test_sample_within_a_deadline_raises_what_sample_raises():
    """A failure inside the reading thread reaches the caller, as it would without a deadline."""
    w = world("virtio")
    with pytest.raises(InvalidArgument, match="unknown source"):
        w.client.sample(w.guest(), "neither", timeout=5)
    with pytest.raises(DomainNotFound):
        w.client.sample("no-such-domain", timeout=5)


def test_negative_grace_is_refused():
    """grace is seconds of slack, never negative."""
    w = world("virtio")
    with pytest.raises(InvalidArgument):
        BalloonStats(w.host, grace=-1)


def test_client_closes_its_connection():
    """``with BalloonStats(...)`` closes libvirt's connection."""
    w = world("virtio")
    with w.client as client:
        assert client is w.client
    assert w.conn.closed


def test_to_dict_sampled_at_is_the_pinned_clock():
    """sampled_at is when the sample was taken (the injected clock), to the millisecond."""
    fixture = load("virtio")
    doc = world("virtio").client.sample(fixture["domain"]["name"]).to_dict()
    assert doc["sampled_at"] == round(now_for(fixture), 3)


@pytest.mark.parametrize("value", ['"soon"', "-2", "true", "1.5"])
def test_malformed_polling_interval_is_an_unreachable_sample(value):
    """Nonsense for the interval (synthetic: no real QEMU says it) is a bad reply, not a crash."""
    fixture = copy.deepcopy(load("virtio"))
    wanted = _qom_get(fixture, POLLING_PROPERTY)
    for exchange in fixture["qmp"]:
        if exchange["command"] == wanted:
            exchange["reply"] = '{"return":%s,"id":"libvirt-1"}' % value
    w = World([fixture], now=now_for(fixture))
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.status is Status.UNREACHABLE
    assert isinstance(sample.error, QMPBadReply) and POLLING_PROPERTY in str(sample.error)
    with pytest.raises(QMPBadReply):
        w.client.polling(fixture["domain"]["name"])


@pytest.mark.parametrize(
    "reply",
    [
        # Recorded on the testbed: no object there; an object without the property.
        '{"id":"libvirt-437","error":{"class":"DeviceNotFound","desc":"Device '
        "'/machine/peripheral/balloon9' not found\"}}",
        '{"id":"libvirt-436","error":{"class":"GenericError","desc":"Property '
        "'virtio-balloon-pci.guest-stats-polling-interval' not found\"}}",
    ],
)
def test_alias_that_does_not_lead_to_the_balloon_falls_back_to_listing(reply):
    """QEMU says no at /machine/peripheral/<alias>: the tree is listed as libvirt does, and the path found."""
    fixture = copy.deepcopy(load("virtio"))
    for key in ("xml_live", "xml_inactive"):
        fixture[key] = fixture[key].replace("<alias name='balloon0'/>", "<alias name='balloon9'/>")
    w = World([fixture], now=now_for(fixture))
    where = {"path": "/machine/peripheral/balloon9", "property": POLLING_PROPERTY}
    guess = {"execute": "qom-get", "arguments": where}
    w.transport.answer(fixture["domain"]["uuid"], guess, reply)
    sample = w.client.sample(fixture["domain"]["name"])
    assert sample.status.value == EXPECTED_STATUS["virtio"]
    assert sample.qom_path.path == fixture["balloon_path"] and sample.qom_path.method == "search"
    assert w.transport.commands()[0] == guess
    assert {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}} in w.transport.commands()


# -- the two halves without a call -------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["virtio", "virtio-hog", "nodriver", "none"])
def test_a_complete_record_finishes_a_libvirt_reading_without_a_call(scenario):
    """``--source libvirt``: once the device is known, neither half calls; the sample is finish_sample's."""
    fixture = load(scenario)
    w = World([fixture], now=now_for(fixture))
    name = fixture["domain"]["name"]
    memo = DomainMemo()
    w.client.sample(name, "libvirt", memo=memo)  # learns the device (XMLDesc)
    assert not BalloonStats.begin_calls("libvirt", memo)
    guest = w.client.guest(name)
    before = w.host.counter.snapshot()
    reading = w.client.begin_sample(guest, "libvirt", memo=memo)
    (record,) = w.host.domain_records([guest]).values()
    after_bulk = w.host.counter.snapshot()
    made = w.client.finish_from_record(reading, record)
    # No call past the bulk one, and no QMP.
    assert w.host.counter.snapshot() == after_bulk
    assert {k: after_bulk[k] - before.get(k, 0) for k in after_bulk if after_bulk[k] != before.get(k, 0)} == {
        "domainListGetStats": 1
    }
    assert made is not None
    assert made == w.client.finish_sample(reading, record)


def test_a_record_nowait_left_short_is_finished_with_a_call():
    """A busy QEMU's record has no figures: finish_from_record declines, finish_sample asks memoryStats()."""
    fixture = load("virtio")
    w = World([fixture], busy=[fixture["domain"]["uuid"]], now=now_for(fixture))
    name = fixture["domain"]["name"]
    memo = DomainMemo()
    w.client.sample(name, "libvirt", memo=memo)
    guest = w.client.guest(name)
    reading = w.client.begin_sample(guest, "libvirt", memo=memo)
    (record,) = w.host.domain_records([guest]).values()
    assert record.state == "running" and "balloon.last-update" not in record.balloon
    calls = len(w.domain.calls_to("memoryStats"))
    assert w.client.finish_from_record(reading, record) is None
    assert len(w.domain.calls_to("memoryStats")) == calls  # declining made no call either
    sample = w.client.finish_sample(reading, record)
    assert len(w.domain.calls_to("memoryStats")) == calls + 1
    assert sample.libvirt == fixture["memory_stats"]


@pytest.mark.parametrize("source", ["both", "qmp"])
def test_a_reading_that_read_qemu_is_never_finished_from_the_record_alone(source):
    """Its second half may call (query-balloon, the cross-check's re-read, the interval): a worker's."""
    fixture = load("virtio")
    w = World([fixture], now=now_for(fixture))
    name = fixture["domain"]["name"]
    memo = DomainMemo()
    assert BalloonStats.begin_calls(source, memo)  # the device is not known yet
    w.client.sample(name, source, memo=memo)
    assert BalloonStats.begin_calls(source, memo)  # QEMU is read every time
    guest = w.client.guest(name)
    reading = w.client.begin_sample(guest, source, memo=memo)
    (record,) = w.host.domain_records([guest]).values()
    assert w.client.finish_from_record(reading, record) is None

"""virt_balloon_stats.stats: the stat table, parsing guest-stats, libvirt's view, classify.

Parsing is checked on every ``qom-get ... guest-stats`` reply recorded on the
testbed, on both stacks: QEMU 7.2 and 10.0 print "unsupported" as 2^64-1;
QEMU 10.0 has QEMU 9.2's six extra stats, which the Linux 6.12 guest fills,
and the next set has a reply read right after a machine reset. Older QEMU's
``-1``, QEMU 9.2's stats with figures other than the idle guest's, and names
from a QEMU yet to come are synthetic inputs built inline or from the
recordings.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.conftest import STACKS, load, scenario_names, stack_scenarios
from virt_balloon_stats.errors import QMPBadReply
from virt_balloon_stats.stats import (
    ACTUAL,
    DEFAULT_GRACE_SECONDS,
    LAST_UPDATE,
    RSS,
    STATS,
    STATS_BY_QEMU_NAME,
    STATUS_MEANINGS,
    GuestStats,
    Status,
    classify,
    memory_stats_from_domstats,
    parse_guest_stats,
    stats_from_libvirt,
)

#: How QEMU 7.2 prints an unsupported figure (uint64 -1), as recorded.
U64_MAX = 2**64 - 1

#: The stats QEMU 9.2 added, which no libvirt maps.
QEMU_9_2 = (
    "stat-oom-kills", "stat-alloc-stalls", "stat-async-scans",
    "stat-direct-scans", "stat-async-reclaims", "stat-direct-reclaims",
)

#: A stat name no QEMU has (yet): what this version must keep without knowing it.
FUTURE = "stat-from-the-future"


def _guest_stats_values(stack, name):
    """Every guest-stats value a scenario recorded, in the order read."""
    return [
        json.loads(q["reply"])["return"]
        for q in load(name, stack)["qmp"]
        if q["command"]["execute"] == "qom-get"
        and q["command"]["arguments"]["property"] == "guest-stats"
        and "return" in json.loads(q["reply"])
    ]


GUEST_STATS_REPLIES = [
    pytest.param(stack, name, value, id=f"{stack}-{name}-{i}")
    for stack in STACKS
    for name in scenario_names(stack)
    for i, value in enumerate(_guest_stats_values(stack, name))
]


def _first_value(name, stack="debian12"):
    """The first recorded guest-stats value of a scenario."""
    return copy.deepcopy(_guest_stats_values(stack, name)[0])


def test_recordings_have_both_supported_and_unsupported_guest_stats(stack):
    """Guard: each set has real figures and all-unsupported ones (no guest driver)."""
    values = {v for p in GUEST_STATS_REPLIES if p.values[0] == stack for v in p.values[2]["stats"].values()}
    assert U64_MAX in values
    assert any(v != U64_MAX for v in values)


@pytest.mark.parametrize("stack, name, value", GUEST_STATS_REPLIES)
def test_parse_every_recorded_guest_stats(stack, name, value):
    """Every figure kept under QEMU's name; 2^64-1 becomes None; last-update 0 becomes None."""
    stats = parse_guest_stats(value)
    assert stats.values == {k: (None if v == U64_MAX else v) for k, v in value["stats"].items()}
    assert stats.last_update == (value["last-update"] or None)


@pytest.mark.parametrize("stack, name, value", GUEST_STATS_REPLIES)
def test_used_bytes_is_total_minus_available(stack, name, value):
    """used = MemTotal - MemAvailable, or None when either is unsupported."""
    raw = value["stats"]
    stats = parse_guest_stats(value)
    if U64_MAX in (raw["stat-total-memory"], raw["stat-available-memory"]):
        assert stats.used_bytes is None
    else:
        assert stats.used_bytes == raw["stat-total-memory"] - raw["stat-available-memory"]
        assert stats.used_bytes > 0


@pytest.mark.parametrize("stack, name", stack_scenarios(exclude={"none"}))
def test_recorded_qemu_names_are_the_table_of_the_stacks_qemu(stack, name):
    """QEMU 7.2 reports exactly the stats libvirt maps; QEMU 10.0 the whole table, QEMU 9.2's six included."""
    for value in _guest_stats_values(stack, name):
        if stack == "debian12":
            assert set(value["stats"]) == {s.qemu for s in STATS if s.libvirt is not None}
            assert not set(value["stats"]) & set(QEMU_9_2)
        else:
            assert set(value["stats"]) == set(STATS_BY_QEMU_NAME)


#: Scenarios whose guest driver answered before the reads.
ANSWERED = {"virtio", "virtio-hog", "nostats", "transitional", "stale", "paused"}


@pytest.mark.parametrize("stack, name", stack_scenarios(only=ANSWERED))
def test_the_6_12_guest_fills_qemu_9_2_stats_and_6_1_has_none(stack, name):
    """A guest that answers: Linux 6.12 on QEMU 10.0 sends the six (idle: every one 0), never unsupported.

    On QEMU 7.2 they are not there at all, whatever the guest.
    """
    stats = parse_guest_stats(_guest_stats_values(stack, name)[-1])
    for stat in QEMU_9_2:
        if stack == "debian12":
            assert stat not in stats.values
        else:
            assert stats.values[stat] == 0, stat


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"nodriver", "noos"}))
def test_no_guest_driver_leaves_every_stat_unsupported_qemu_9_2_ones_too(stack, name):
    """No driver answers: every figure the stack's QEMU knows is 2^64-1, and last-update 0."""
    for value in _guest_stats_values(stack, name):
        assert set(value["stats"].values()) == {U64_MAX}
        assert value["last-update"] == 0
        assert (set(QEMU_9_2) <= set(value["stats"])) is (stack == "next")


def test_qemu_9_2_stats_are_in_the_table_without_a_libvirt_name():
    """The six QEMU 9.2 stats, in QEMU's order after the older ones, all counters, none mapped by libvirt."""
    assert tuple(s.qemu for s in STATS[-len(QEMU_9_2):]) == QEMU_9_2
    for name in QEMU_9_2:
        spec = STATS_BY_QEMU_NAME[name]
        assert (spec.libvirt, spec.domstats, spec.cumulative) == (None, None, True), name
        assert spec.help and "(" in spec.help, name  # says which /proc/vmstat figure it is


def test_minus_one_is_unsupported_too():
    """Synthetic: QEMU before 7.2 printed -1 (docs/virtio-balloon-stats.txt)."""
    stats = parse_guest_stats({"stats": {"stat-free-memory": -1, "stat-swap-in": 0}, "last-update": 5})
    assert stats.get("stat-free-memory") is None
    assert stats.get("stat-swap-in") == 0


def test_unknown_stat_names_from_newer_qemu_are_kept():
    """Synthetic: a name no QEMU has yet is kept, an unsupported one as None."""
    value = {
        "stats": {"stat-free-memory": 4096, FUTURE: 3, FUTURE + "-2": U64_MAX},
        "last-update": 1795660879,
    }
    stats = parse_guest_stats(value)
    assert stats.values == {"stat-free-memory": 4096, FUTURE: 3, FUTURE + "-2": None}
    assert FUTURE not in STATS_BY_QEMU_NAME


def _qemu_9_2_reply(name="virtio", **figures):
    """Synthetic: a recorded QEMU 7.2 guest-stats value with QEMU 9.2's six stats added."""
    value = _first_value(name)
    value["stats"].update({k.replace("_", "-"): v for k, v in figures.items()})
    return value


def test_qemu_9_2_stats_parse_as_figures_and_unsupported_as_none():
    """Synthetic figures of a busy guest; an older guest on QEMU 9.2 leaves them 2^64-1: None, never 0."""
    value = _qemu_9_2_reply(
        stat_oom_kills=2, stat_alloc_stalls=17, stat_async_scans=4096 * 300,
        stat_direct_scans=U64_MAX, stat_async_reclaims=4096 * 120, stat_direct_reclaims=U64_MAX,
    )
    stats = parse_guest_stats(value)
    assert stats.get("stat-oom-kills") == 2
    assert stats.get("stat-async-scans") == 4096 * 300
    assert stats.get("stat-direct-scans") is None and "stat-direct-scans" in stats.values
    assert stats.get("stat-free-memory") == value["stats"]["stat-free-memory"]


def test_get_of_an_absent_name_is_none():
    """Absent and unsupported both read as None."""
    assert GuestStats(values={}, last_update=None).get("stat-free-memory") is None


# Synthetic malformed guest-stats values (QEMU never sent these).
MALFORMED = [
    pytest.param([], id="list"),
    pytest.param(None, id="none"),
    pytest.param({"last-update": 1}, id="no-stats"),
    pytest.param({"stats": [], "last-update": 1}, id="stats-list"),
    pytest.param({"stats": {}}, id="no-last-update"),
    pytest.param({"stats": {}, "last-update": -1}, id="negative-last-update"),
    pytest.param({"stats": {}, "last-update": True}, id="bool-last-update"),
    pytest.param({"stats": {}, "last-update": "1"}, id="string-last-update"),
    pytest.param({"stats": {"stat-free-memory": "1"}, "last-update": 1}, id="string-value"),
    pytest.param({"stats": {"stat-free-memory": 1.5}, "last-update": 1}, id="float-value"),
    pytest.param({"stats": {"stat-free-memory": True}, "last-update": 1}, id="bool-value"),
    pytest.param({"stats": {"stat-free-memory": None}, "last-update": 1}, id="null-value"),
]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_guest_stats_are_bad_replies(value):
    """Shapes QEMU's guest-stats never has are QMPBadReply, not a crash later."""
    with pytest.raises(QMPBadReply):
        parse_guest_stats(value)


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_stats_from_libvirt_is_memory_stats_in_bytes(stack, name):
    """The libvirt source: KiB x 1024, counts as they are, absent figures None."""
    memory_stats = load(name, stack)["memory_stats"]
    stats, actual = stats_from_libvirt(memory_stats)
    for spec in STATS:
        kib_or_count = memory_stats.get(spec.libvirt)
        if kib_or_count is None:
            assert stats.get(spec.qemu) is None
        elif spec.unit == "bytes":
            assert stats.get(spec.qemu) == kib_or_count * 1024
        else:
            assert stats.get(spec.qemu) == kib_or_count
    assert stats.last_update == (memory_stats.get("last_update") or None)
    assert actual == (None if "actual" not in memory_stats else memory_stats["actual"] * 1024)


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"virtio", "virtio-hog", "transitional"}))
def test_stats_from_libvirt_matches_qmp_to_the_kib(stack, name):
    """Both sources, same moment: libvirt's figure is QEMU's rounded down to whole KiB."""
    fixture = load(name, stack)
    qmp = parse_guest_stats(_first_value(name, stack))
    from_libvirt, _ = stats_from_libvirt(fixture["memory_stats"])
    assert qmp.last_update == from_libvirt.last_update
    for spec in STATS:
        if spec.libvirt is None:
            continue
        expected = qmp.get(spec.qemu)
        if spec.unit == "bytes":
            expected = expected // 1024 * 1024
        assert from_libvirt.get(spec.qemu) == expected


def test_stats_from_libvirt_leaves_out_what_libvirt_cannot_name(stack):
    """libvirt has no key for QEMU 9.2's stats: the libvirt source does not have them, not even as None.

    libvirt 11.3 does not map them either, though QEMU 10.0 reported them at that very moment.
    """
    fixture = load("virtio", stack)
    stats, _ = stats_from_libvirt(fixture["memory_stats"])
    assert set(stats.values) == {s.qemu for s in STATS if s.libvirt is not None}
    assert not set(stats.values) & set(QEMU_9_2)
    assert (set(QEMU_9_2) <= set(_first_value("virtio", stack)["stats"])) is (stack == "next")


@pytest.mark.parametrize("stack, name", stack_scenarios())
def test_memory_stats_from_domstats_gives_memory_stats(stack, name):
    """getAllDomainStats' record, renamed, is what memoryStats() said at the same moment."""
    fixture = load(name, stack)
    assert memory_stats_from_domstats(fixture["all_domain_stats"]) == fixture["memory_stats"]


def test_memory_stats_from_domstats_renames_the_odd_ones(stack):
    """balloon.current -> actual, balloon.last-update -> last_update; balloon.maximum dropped."""
    record = load("virtio", stack)["all_domain_stats"]
    out = memory_stats_from_domstats(record)
    assert out["actual"] == record["balloon.current"]
    assert out["last_update"] == record["balloon.last-update"]
    assert out["rss"] == record["balloon.rss"]
    assert "maximum" not in out and "balloon.maximum" not in out


def test_stat_table_units():
    """Memory in bytes (libvirt KiB), events as counts; cumulative ones are counters."""
    units = {s.qemu: (s.unit, s.libvirt_unit) for s in STATS + (ACTUAL, RSS)}
    assert units["stat-free-memory"] == ("bytes", "KiB")
    assert units["stat-major-faults"] == ("count", "count")
    assert units["stat-htlb-pgalloc"] == ("count", "count")
    assert units["actual"] == ("bytes", "KiB")
    assert LAST_UPDATE.libvirt == "last_update" and LAST_UPDATE.unit == "count"
    assert {s.qemu for s in STATS if s.cumulative} == {
        "stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
        "stat-htlb-pgalloc", "stat-htlb-pgfail",
    } | set(QEMU_9_2)


def test_qemu_9_2_units_are_the_guest_drivers():
    """OOM kills and allocation stalls are event counts; scans and reclaims are pages sent as bytes."""
    units = {name: STATS_BY_QEMU_NAME[name].unit for name in QEMU_9_2}
    assert units == {
        "stat-oom-kills": "count",
        "stat-alloc-stalls": "count",
        "stat-async-scans": "bytes",
        "stat-direct-scans": "bytes",
        "stat-async-reclaims": "bytes",
        "stat-direct-reclaims": "bytes",
    }


@pytest.mark.parametrize("spec", STATS + (ACTUAL, RSS), ids=lambda s: s.qemu)
def test_to_libvirt_is_libvirts_mapping(spec):
    """bytes // 1024 for memory (rounding down, as libvirt does), same number for counts."""
    assert spec.to_libvirt(2047) == (1 if spec.unit == "bytes" else 2047)
    assert spec.from_libvirt(3) == (3072 if spec.unit == "bytes" else 3)


# -- classify ---------------------------------------------------------------

NOW = 1_795_660_900.0


@pytest.mark.parametrize(
    "kwargs, status",
    [
        (dict(state="running", has_balloon=False, interval=2, last_update=None), Status.NO_BALLOON),
        (dict(state="paused", has_balloon=False, interval=2, last_update=None), Status.NO_BALLOON),
        (dict(state="paused", has_balloon=True, interval=2, last_update=NOW - 1000), Status.PAUSED),
        (dict(state="running", has_balloon=True, interval=0, last_update=NOW - 9), Status.POLLING_DISABLED),
        (dict(state="running", has_balloon=True, interval=None, last_update=None), Status.POLLING_DISABLED),
        (dict(state="running", has_balloon=True, interval=2, last_update=None), Status.NEVER_UPDATED),
        (dict(state="running", has_balloon=True, interval=2, last_update=NOW - 1000), Status.STALE),
        (dict(state="running", has_balloon=True, interval=2, last_update=NOW - 1), Status.OK),
        (dict(state="running", has_balloon=True, interval=2, last_update=NOW + 3), Status.OK),
    ],
)
def test_classify_every_status(kwargs, status):
    """Precedence: no balloon, paused, polling disabled, never updated, then age."""
    got, message = classify(now=NOW, **kwargs)
    assert got is status
    assert STATUS_MEANINGS[status] in message


@pytest.mark.parametrize("interval", [1, 2, 10])
@pytest.mark.parametrize("grace", [0, DEFAULT_GRACE_SECONDS, 2.5])
def test_classify_boundary_is_two_intervals_plus_grace(interval, grace):
    """Exactly 2 x interval + grace old is still ok; any older is stale."""
    limit = 2 * interval + grace
    at_limit, _ = classify(state="running", has_balloon=True, interval=interval,
                           last_update=1000, now=1000 + limit, grace=grace)
    over, message = classify(state="running", has_balloon=True, interval=interval,
                             last_update=1000, now=1000 + limit + 0.5, grace=grace)
    assert at_limit is Status.OK
    assert over is Status.STALE
    assert f"2 x {interval} s" in message


def test_classify_default_grace_is_five_seconds():
    """The default grace is DEFAULT_GRACE_SECONDS (5 s)."""
    assert DEFAULT_GRACE_SECONDS == 5
    ok, _ = classify(state="running", has_balloon=True, interval=2, last_update=100, now=109)
    stale, _ = classify(state="running", has_balloon=True, interval=2, last_update=100, now=110)
    assert (ok, stale) == (Status.OK, Status.STALE)


def _machine_reset(value):
    """Synthetic: a recorded guest-stats value as QEMU 10.0 gives it after a machine reset.

    Every figure goes back to unsupported and last-update to 0, as when the
    machine first started, until the guest driver answers again.
    """
    return {"stats": {name: U64_MAX for name in value["stats"]}, "last-update": 0}


def test_recorded_machine_reset_is_what_the_synthetic_one_says():
    """QEMU 10.0 read right after virDomainReset: the synthetic reset of a guest's figures, exactly."""
    figures = _first_value("virtio", "next")
    after = _guest_stats_values("next", "reset")
    assert figures["last-update"] > 0 and U64_MAX not in figures["stats"].values()
    assert after and all(value == _machine_reset(figures) for value in after)
    reset = parse_guest_stats(after[0])
    assert reset.last_update is None and set(reset.values.values()) == {None}


@pytest.mark.parametrize("name", ["virtio", "virtio-hog", "transitional"])
def test_machine_reset_reply_is_never_updated_whatever_came_before(name):
    """After figures, a reset reply parses to no figures and no update, and classify says never_updated."""
    before = parse_guest_stats(_first_value(name))
    assert before.last_update is not None and before.get("stat-free-memory") is not None
    reset = parse_guest_stats(_machine_reset(_qemu_9_2_reply(name, stat_oom_kills=1)))
    assert reset.last_update is None
    assert set(reset.values) == set(before.values) | {"stat-oom-kills"}
    assert all(v is None for v in reset.values.values())
    assert reset.used_bytes is None
    now = before.last_update + 1
    assert classify(state="running", has_balloon=True, interval=2, last_update=before.last_update,
                    now=now)[0] is Status.OK
    status, message = classify(state="running", has_balloon=True, interval=2, last_update=reset.last_update,
                               now=now)
    assert status is Status.NEVER_UPDATED
    assert message == STATUS_MEANINGS[Status.NEVER_UPDATED]


def test_classify_ok_message_says_age_and_interval():
    """The ok message says how old and how often, never a negative age."""
    _, message = classify(state="running", has_balloon=True, interval=2, last_update=100, now=103)
    assert "3 s ago" in message and "every 2 s" in message
    _, future = classify(state="running", has_balloon=True, interval=2, last_update=100, now=99)
    assert "0 s ago" in future


# -- properties ---------------------------------------------------------------

_uint64 = st.integers(min_value=0, max_value=U64_MAX)
_names = st.one_of(st.sampled_from(sorted(STATS_BY_QEMU_NAME)), st.text(min_size=1, max_size=20))


@settings(max_examples=200, deadline=None)
@given(
    values=st.dictionaries(_names, st.one_of(_uint64, st.just(-1)), max_size=16),
    last_update=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_parse_never_raises_and_none_is_exactly_unsupported(values, last_update):
    """For any uint64 (or -1) value map: no exception; None exactly where QEMU said unsupported."""
    stats = parse_guest_stats({"stats": dict(values), "last-update": last_update})
    assert set(stats.values) == set(values)
    assert {k for k, v in stats.values.items() if v is None} == {
        k for k, v in values.items() if v in (-1, U64_MAX)
    }
    assert all(stats.values[k] == v for k, v in values.items() if v not in (-1, U64_MAX))
    assert stats.last_update == (last_update or None)


@settings(max_examples=200, deadline=None)
@given(spec=st.sampled_from(STATS + (ACTUAL, RSS)), value=st.integers(min_value=0, max_value=2**54))
def test_to_libvirt_inverts_from_libvirt(spec, value):
    """Any libvirt value (KiB or count) survives the round trip to QEMU's unit and back."""
    assert spec.to_libvirt(spec.from_libvirt(value)) == value

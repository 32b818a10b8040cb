"""virt_balloon_stats.crosscheck: QEMU's figures against libvirt's, to the unit.

The recorded pairs (qom-get guest-stats and memoryStats() read at the same
guest update on the testbed, on both stacks) must agree exactly.
Disagreements are built by changing one recorded figure by the smallest
amount that matters. QEMU 9.2's extra stats and QEMU 10.0's machine reset
are in the next set as recorded; figures for them other than the idle
guest's, and a reset between the two reads, are synthetic changes of the
recorded pairs.
"""

from __future__ import annotations

import dataclasses

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.conftest import load, scenario_names, stack_scenarios
from virt_balloon_stats.crosscheck import CrossCheck, Result, Verdict, crosscheck, skipped
from virt_balloon_stats.qompath import QOMPath
from virt_balloon_stats.reading import crosscheck_same_update
from virt_balloon_stats.stats import STATS, STATS_BY_QEMU_NAME, GuestStats, parse_guest_stats

U64_MAX = 2**64 - 1

#: The stats libvirt has a key for: the ones compared.
MAPPED = tuple(s for s in STATS if s.libvirt is not None)

#: QEMU 9.2's stats, which no libvirt maps.
UNMAPPED = tuple(s for s in STATS if s.libvirt is None)

#: Scenarios with a balloon, where QMP and libvirt were read at the same update.
PAIRED = [p for p in stack_scenarios() if load(p.values[1], p.values[0])["balloon_path"]]


def _pair(name, stack="debian12"):
    """The recorded guest-stats (last read), actual and memoryStats of one scenario."""
    fixture = load(name, stack)
    path = fixture["balloon_path"]
    command = {"execute": "qom-get", "arguments": {"path": path, "property": "guest-stats"}}
    value = [json.loads(q["reply"])["return"] for q in fixture["qmp"] if q["command"] == command][-1]
    actual = next(
        json.loads(q["reply"])["return"]["actual"]
        for q in fixture["qmp"]
        if q["command"]["execute"] == "query-balloon"
    )
    return parse_guest_stats(value), actual, dict(fixture["memory_stats"])


def test_paired_scenarios_are_the_ones_with_a_balloon(stack):
    """Guard: every scenario but ``none`` has a balloon and takes part."""
    paired = {p.values[1] for p in PAIRED if p.values[0] == stack}
    assert set(scenario_names(stack)) - paired == {"none"}


@pytest.mark.parametrize("stack, name", PAIRED)
def test_recorded_pairs_agree_exactly(stack, name):
    """QEMU and libvirt read the same property: every figure agrees, or both say unsupported.

    QEMU 9.2's stats: QEMU 7.2 does not report them; QEMU 10.0 does, and
    libvirt 11.3 has no key for them, so they are QEMU's alone (qmp only),
    sent or unsupported, and never a mismatch.
    """
    stats, actual, memory_stats = _pair(name, stack)
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.AGREE
    assert check.mismatches == ()
    assert check.checked == len(MAPPED) + 1
    for spec in MAPPED:
        expected = Verdict.ABSENT if stats.get(spec.qemu) is None else Verdict.AGREE
        assert check.verdict_of(spec.qemu) is expected
    for spec in UNMAPPED:
        assert check.verdict_of(spec.qemu) is (None if stack == "debian12" else Verdict.QMP_ONLY)
    assert check.to_dict()["qmp_only"] == ([] if stack == "debian12" else [s.qemu for s in UNMAPPED])
    assert check.verdict_of("actual") is Verdict.AGREE


@pytest.mark.parametrize("stat", [s.qemu for s in MAPPED if s.unit == "bytes"])
def test_one_kib_difference_is_a_mismatch_with_values_and_units(stat, stack):
    """libvirt's figure one KiB off: a mismatch that shows both values in their units."""
    stats, actual, memory_stats = _pair("virtio", stack)
    libvirt_key = STATS_BY_QEMU_NAME[stat].libvirt
    memory_stats[libvirt_key] += 1
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.MISMATCH
    assert [m.to_dict() for m in check.mismatches] == [{
        "stat": stat,
        "qmp": stats.get(stat),
        "libvirt": stats.get(stat) // 1024 + 1,
        "unit": "bytes",
        "libvirt_unit": "KiB",
    }]


@pytest.mark.parametrize("stat", [s.qemu for s in MAPPED if s.unit == "count"])
def test_one_count_difference_is_a_mismatch(stat, stack):
    """Counts are compared as they are: off by one is a mismatch."""
    stats, actual, memory_stats = _pair("virtio-hog", stack)
    memory_stats[STATS_BY_QEMU_NAME[stat].libvirt] += 1
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.MISMATCH
    assert [(m.stat, m.unit, m.libvirt_unit) for m in check.mismatches] == [(stat, "count", "count")]


def test_actual_one_kib_off_is_a_mismatch():
    """query-balloon's actual is checked too, bytes against KiB."""
    stats, actual, memory_stats = _pair("virtio")
    memory_stats["actual"] -= 1
    check = crosscheck(stats, actual, memory_stats)
    assert check.verdict_of("actual") is Verdict.MISMATCH
    assert check.mismatches[0].to_dict()["libvirt"] == actual // 1024 - 1


def test_sub_kib_difference_is_not_a_mismatch():
    """libvirt floors to whole KiB; QEMU's extra 1023 bytes are not a disagreement."""
    stats, actual, memory_stats = _pair("virtio")
    value = dict(stats.values)
    value["stat-free-memory"] = memory_stats["unused"] * 1024 + 1023
    bumped = type(stats)(values=value, last_update=stats.last_update)
    assert crosscheck(bumped, actual, memory_stats).result is Result.AGREE


def test_unsupported_in_qemu_but_present_in_libvirt_is_a_mismatch(stack):
    """QEMU says unsupported, libvirt reports a number: that is a reader bug, not agreement."""
    stats, actual, memory_stats = _pair("nodriver", stack)
    memory_stats["unused"] = 0
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.MISMATCH
    assert [(m.stat, m.qmp, m.libvirt) for m in check.mismatches] == [("stat-free-memory", None, 0)]


def test_present_in_qemu_but_absent_in_libvirt_is_a_mismatch():
    """libvirt dropping a figure QEMU has is a mismatch too."""
    stats, actual, memory_stats = _pair("virtio")
    del memory_stats["usable"]
    check = crosscheck(stats, actual, memory_stats)
    assert [(m.stat, m.libvirt) for m in check.mismatches] == [
        ("stat-available-memory", None)
    ]


def test_different_last_update_is_inconclusive_not_mismatch():
    """The guest answered between the reads: no verdict on figures, and the reason says both times."""
    stats, actual, memory_stats = _pair("virtio")
    memory_stats["last_update"] += 2
    memory_stats["unused"] += 100
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.INCONCLUSIVE
    assert check.checks == ()
    assert str(stats.last_update) in check.reason and str(memory_stats["last_update"]) in check.reason


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"nodriver", "noos", "reset"}))
def test_never_updated_zero_and_none_are_the_same_time(stack, name):
    """QEMU's last-update 0 (parsed None) and libvirt's last_update 0 both mean never."""
    stats, actual, memory_stats = _pair(name, stack)
    assert stats.last_update is None and memory_stats["last_update"] == 0
    assert crosscheck(stats, actual, memory_stats).result is Result.AGREE


def test_unknown_stat_is_qmp_only_and_not_counted():
    """Synthetic name no QEMU has yet: reported as qmp_only, not a mismatch."""
    stats, actual, memory_stats = _pair("virtio")
    values = dict(stats.values, **{"stat-from-the-future": 2})
    newer = GuestStats(values=values, last_update=stats.last_update)
    check = crosscheck(newer, actual, memory_stats)
    assert check.result is Result.AGREE
    assert check.verdict_of("stat-from-the-future") is Verdict.QMP_ONLY
    assert check.checked == len(MAPPED) + 1
    assert check.to_dict()["qmp_only"] == ["stat-from-the-future"]


@pytest.mark.parametrize("reported", [True, False], ids=["newer-guest", "older-guest"])
def test_qemu_9_2_stats_are_qmp_only_never_a_mismatch_nor_missing(reported):
    """Synthetic QEMU 9.2 reply: its six stats, sent or unsupported, are qmp_only, not counted as checked."""
    stats, actual, memory_stats = _pair("virtio")
    extra = {s.qemu: (i + 1) * 4096 if reported else None for i, s in enumerate(UNMAPPED)}
    newer = GuestStats(values=dict(stats.values, **extra), last_update=stats.last_update)
    check = crosscheck(newer, actual, memory_stats)
    assert check.result is Result.AGREE and check.mismatches == ()
    assert check.checked == len(MAPPED) + 1
    assert check.to_dict()["qmp_only"] == [s.qemu for s in UNMAPPED]
    for spec in UNMAPPED:
        [entry] = [c for c in check.checks if c.stat == spec.qemu]
        assert (entry.verdict, entry.qmp, entry.libvirt) == (Verdict.QMP_ONLY, extra[spec.qemu], None)
        assert (entry.unit, entry.libvirt_unit) == (spec.unit, "")


def test_without_actual_only_guest_stats_are_compared():
    """actual_bytes None: no actual check."""
    stats, _, memory_stats = _pair("virtio")
    check = crosscheck(stats, None, memory_stats)
    assert check.verdict_of("actual") is None
    assert check.checked == len(MAPPED)


def test_to_dict_shape():
    """The JSON member: result, checked, mismatches, qmp_only, reason, and when it was compared."""
    stats, actual, memory_stats = _pair("virtio")
    memory_stats["swap_in"] = 7
    doc = crosscheck(stats, actual, memory_stats).to_dict()
    assert doc == {
        "result": "mismatch",
        "checked": len(MAPPED) + 1,
        "mismatches": [{"stat": "stat-swap-in", "qmp": stats.get("stat-swap-in"), "libvirt": 7,
                        "unit": "bytes", "libvirt_unit": "KiB"}],
        "qmp_only": [],
        "reason": "",
        "at": None,
    }


def test_skipped_carries_its_reason():
    """A skipped check compares nothing and says why."""
    check = skipped("source is qmp")
    assert check == CrossCheck(result=Result.SKIPPED, reason="source is qmp")
    assert check.checked == 0
    assert check.to_dict()["result"] == "skipped"


def test_a_skipped_check_carries_the_last_conclusive_one_beside_it_never_as_its_own_verdict():
    """Between a domain's turns: nothing compared now, the last comparison (with its time) beside."""
    stats, actual, memory_stats = _pair("virtio")
    then = dataclasses.replace(crosscheck(stats, actual, memory_stats), at=1700000000.0)
    now = skipped("not compared this cycle", previous=then)
    assert now.checked == 0 and now.verdict_of("stat-free-memory") is None and now.mismatches == ()
    assert not now.conclusive and now.last_conclusive is then
    doc = now.to_dict()
    assert doc["result"] == "skipped" and doc["at"] is None
    assert doc["previous"]["result"] == "agree" and doc["previous"]["at"] == 1700000000.0
    assert doc["previous"]["checked"] == then.checked > 0
    inconclusive = CrossCheck(result=Result.INCONCLUSIVE, reason="moved")
    assert inconclusive.last_conclusive is None and not inconclusive.conclusive


def _libvirt_view(values, last_update, actual):
    """libvirt's own mapping (qemuMonitorJSONGetMemoryStats): KiB for bytes, drop unsupported and unnamed."""
    out = {}
    for name, raw in values.items():
        spec = STATS_BY_QEMU_NAME[name]
        if raw in (-1, U64_MAX) or spec.libvirt is None:
            continue
        out[spec.libvirt] = raw // 1024 if spec.unit == "bytes" else raw
    out["last_update"] = last_update
    out["actual"] = actual // 1024
    return out


@settings(max_examples=200, deadline=None)
@given(
    values=st.dictionaries(
        st.sampled_from(sorted(STATS_BY_QEMU_NAME)),
        st.one_of(st.integers(min_value=0, max_value=U64_MAX - 1), st.just(U64_MAX), st.just(-1)),
    ),
    last_update=st.integers(min_value=0, max_value=2**40),
    actual=st.integers(min_value=0, max_value=2**50),
)
def test_libvirts_mapping_always_agrees(values, last_update, actual):
    """Whatever QEMU reports, libvirt's conversion of it is never called a mismatch."""
    stats = parse_guest_stats({"stats": values, "last-update": last_update})
    check = crosscheck(stats, actual, _libvirt_view(values, last_update, actual))
    assert check.result is Result.AGREE
    assert check.checked == sum(1 for name in values if STATS_BY_QEMU_NAME[name].libvirt) + 1


# -- a machine reset (QEMU 10.0) --------------------------------------------------------------


def _reset(stats, memory_stats):
    """Synthetic: both sides of a recorded pair right after a QEMU 10.0 machine reset.

    QEMU sets last-update to 0 and every figure to unsupported; libvirt then
    drops every guest figure and keeps last_update 0, actual and rss, as the
    next set's ``reset`` pair shows (checked below).
    """
    after = GuestStats(values={name: None for name in stats.values}, last_update=None)
    kept = {k: memory_stats[k] for k in ("actual", "rss") if k in memory_stats}
    return after, dict(kept, last_update=0)


def test_recorded_reset_pair_is_the_synthetic_reset_of_a_guests_figures():
    """libvirt 11.3 + QEMU 10.0 just after virDomainReset: _reset() of a reporting guest's pair."""
    before, _, _ = _pair("virtio", "next")
    assert before.last_update is not None and before.get("stat-free-memory") is not None
    stats, actual, memory_stats = _pair("reset", "next")
    after, libvirt_after = _reset(before, memory_stats)
    assert stats == after
    assert memory_stats == libvirt_after  # actual, rss and last_update 0; no guest figure
    assert memory_stats["actual"] * 1024 == actual


@pytest.mark.parametrize("name", ["virtio", "virtio-hog", "transitional"])
def test_reset_seen_by_both_sides_agrees_on_nothing(name):
    """Both read after the reset: every figure absent on both sides, never a mismatch."""
    stats, actual, memory_stats = _pair(name)
    values = dict(stats.values, **{s.qemu: 7 for s in UNMAPPED})
    with_new = GuestStats(values=values, last_update=stats.last_update)
    after, libvirt_after = _reset(with_new, memory_stats)
    check = crosscheck(after, actual, libvirt_after)
    assert check.result is Result.AGREE and check.mismatches == ()
    assert all(check.verdict_of(s.qemu) is Verdict.ABSENT for s in MAPPED)
    assert all(check.verdict_of(s.qemu) is Verdict.QMP_ONLY for s in UNMAPPED)
    assert check.verdict_of("actual") is Verdict.AGREE


def test_reset_with_libvirt_leaving_out_last_update_agrees_too():
    """A libvirt that drops a last_update of 0 altogether: still the same "never" as QEMU's 0."""
    stats, actual, memory_stats = _pair("virtio")
    after, libvirt_after = _reset(stats, memory_stats)
    del libvirt_after["last_update"]
    assert crosscheck(after, actual, libvirt_after).result is Result.AGREE


@pytest.mark.parametrize("qemu_first", [True, False], ids=["reset-after-qemu", "reset-after-libvirt"])
def test_reset_between_the_two_reads_is_inconclusive_not_mismatch(qemu_first):
    """One side read before the reset and one after: the update times differ, so no verdict on any figure."""
    stats, actual, memory_stats = _pair("virtio")
    after, libvirt_after = _reset(stats, memory_stats)
    guest, libvirt = (stats, libvirt_after) if qemu_first else (after, memory_stats)
    check = crosscheck(guest, actual, libvirt)
    assert check.result is Result.INCONCLUSIVE
    assert check.checks == () and check.mismatches == ()
    assert "answered between the two reads" in check.reason


@pytest.mark.parametrize(
    "case, reads",
    [
        ("qemu-before-reset", ["libvirt", "qemu", "libvirt"]),
        ("bulk-record-before-reset", ["libvirt"]),
    ],
)
def test_reading_across_a_reset_rereads_until_both_saw_it(case, reads):
    """A reset between the reads: the side that saw the old figures is read again, and then both agree.

    ``qemu-before-reset``: QEMU answered with figures, libvirt (asked next)
    after the reset. ``bulk-record-before-reset``: the collector's bulk
    record dates from before the reset, QEMU from after it.
    """
    stats, actual, memory_stats = _pair("virtio")
    after, libvirt_after = _reset(stats, memory_stats)
    path = QOMPath(load("virtio")["balloon_path"], "virtio-balloon-pci", "alias", "recorded")
    seen_reads = []

    def reread():
        seen_reads.append("qemu")
        return path, after

    def libvirt():
        seen_reads.append("libvirt")
        return libvirt_after

    first, given = (stats, None) if case == "qemu-before-reset" else (after, memory_stats)
    _, seen, libvirt_seen, check = crosscheck_same_update(
        path, first, actual, given, reread=reread, libvirt=libvirt
    )
    assert check.result is Result.AGREE and check.mismatches == ()
    assert seen is after and libvirt_seen == libvirt_after
    assert seen_reads == reads

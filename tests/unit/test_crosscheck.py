"""virt_balloon_stats.crosscheck: QEMU's figures against libvirt's, to the unit.

The recorded pairs (qom-get guest-stats and memoryStats() read at the same
guest update on the testbed) must agree exactly. Disagreements are built by
changing one recorded figure by the smallest amount that matters.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.conftest import load, scenario_names
from virt_balloon_stats.crosscheck import CrossCheck, Result, Verdict, crosscheck, skipped
from virt_balloon_stats.stats import STATS, STATS_BY_QEMU_NAME, parse_guest_stats

U64_MAX = 2**64 - 1

#: Scenarios with a balloon, where QMP and libvirt were read at the same update.
PAIRED = [n for n in scenario_names() if load(n)["balloon_path"]]


def _pair(name):
    """The recorded guest-stats (last read), actual and memoryStats of one scenario."""
    fixture = load(name)
    path = fixture["balloon_path"]
    command = {"execute": "qom-get", "arguments": {"path": path, "property": "guest-stats"}}
    value = [json.loads(q["reply"])["return"] for q in fixture["qmp"] if q["command"] == command][-1]
    actual = next(
        json.loads(q["reply"])["return"]["actual"]
        for q in fixture["qmp"]
        if q["command"]["execute"] == "query-balloon"
    )
    return parse_guest_stats(value), actual, dict(fixture["memory_stats"])


def test_paired_scenarios_are_the_ones_with_a_balloon():
    """Guard: every scenario but ``none`` has a balloon and takes part."""
    assert set(scenario_names()) - set(PAIRED) == {"none"}


@pytest.mark.parametrize("name", PAIRED)
def test_recorded_pairs_agree_exactly(name):
    """QEMU and libvirt read the same property: every figure agrees, or both say unsupported."""
    stats, actual, memory_stats = _pair(name)
    check = crosscheck(stats, actual, memory_stats)
    assert check.result is Result.AGREE
    assert check.mismatches == ()
    assert check.checked == len(STATS) + 1
    for spec in STATS:
        expected = Verdict.ABSENT if stats.get(spec.qemu) is None else Verdict.AGREE
        assert check.verdict_of(spec.qemu) is expected
    assert check.verdict_of("actual") is Verdict.AGREE


@pytest.mark.parametrize("stat", [s.qemu for s in STATS if s.unit == "bytes"])
def test_one_kib_difference_is_a_mismatch_with_values_and_units(stat):
    """libvirt's figure one KiB off: a mismatch that shows both values in their units."""
    stats, actual, memory_stats = _pair("virtio")
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


@pytest.mark.parametrize("stat", [s.qemu for s in STATS if s.unit == "count"])
def test_one_count_difference_is_a_mismatch(stat):
    """Counts are compared as they are: off by one is a mismatch."""
    stats, actual, memory_stats = _pair("virtio-hog")
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


def test_unsupported_in_qemu_but_present_in_libvirt_is_a_mismatch():
    """QEMU says unsupported, libvirt reports a number: that is a reader bug, not agreement."""
    stats, actual, memory_stats = _pair("nodriver")
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


def test_never_updated_zero_and_none_are_the_same_time():
    """QEMU's last-update 0 (parsed None) and libvirt's last_update 0 both mean never."""
    stats, actual, memory_stats = _pair("nodriver")
    assert stats.last_update is None and memory_stats["last_update"] == 0
    assert crosscheck(stats, actual, memory_stats).result is Result.AGREE


def test_unknown_stat_is_qmp_only_and_not_counted():
    """Synthetic stat-oom-kills (QEMU 9.2+): reported as qmp_only, not a mismatch."""
    stats, actual, memory_stats = _pair("virtio")
    values = dict(stats.values, **{"stat-oom-kills": 2})
    newer = type(stats)(values=values, last_update=stats.last_update)
    check = crosscheck(newer, actual, memory_stats)
    assert check.result is Result.AGREE
    assert check.verdict_of("stat-oom-kills") is Verdict.QMP_ONLY
    assert check.checked == len(STATS) + 1
    assert check.to_dict()["qmp_only"] == ["stat-oom-kills"]


def test_without_actual_only_guest_stats_are_compared():
    """actual_bytes None: no actual check."""
    stats, _, memory_stats = _pair("virtio")
    check = crosscheck(stats, None, memory_stats)
    assert check.verdict_of("actual") is None
    assert check.checked == len(STATS)


def test_to_dict_shape():
    """The JSON member: result, checked, mismatches, qmp_only, reason."""
    stats, actual, memory_stats = _pair("virtio")
    memory_stats["swap_in"] = 7
    doc = crosscheck(stats, actual, memory_stats).to_dict()
    assert doc == {
        "result": "mismatch",
        "checked": len(STATS) + 1,
        "mismatches": [{"stat": "stat-swap-in", "qmp": stats.get("stat-swap-in"), "libvirt": 7,
                        "unit": "bytes", "libvirt_unit": "KiB"}],
        "qmp_only": [],
        "reason": "",
    }


def test_skipped_carries_its_reason():
    """A skipped check compares nothing and says why."""
    check = skipped("source is qmp")
    assert check == CrossCheck(result=Result.SKIPPED, reason="source is qmp")
    assert check.checked == 0
    assert check.to_dict()["result"] == "skipped"


def _libvirt_view(values, last_update, actual):
    """libvirt's own mapping (qemuMonitorJSONGetMemoryStats): KiB for bytes, drop unsupported."""
    out = {}
    for name, raw in values.items():
        spec = STATS_BY_QEMU_NAME[name]
        if raw in (-1, U64_MAX):
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
    assert check.checked == len(values) + 1

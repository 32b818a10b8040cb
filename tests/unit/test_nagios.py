"""virt_balloon_stats.nagios: per-domain state, the overall state, the plugin output.

Samples come from the real client over the recorded scenarios (both
stacks where each status is judged); an
unreachable one from a recorded libvirt error, a mismatching one from a
recorded memoryStats() nudged by one KiB.
"""

from __future__ import annotations

import re

import pytest

from tests.unit.conftest import (
    EXPECTED_STATUS,
    World,
    load,
    now_for,
    recorded_error,
    scenario_names,
    stack_scenarios,
)
from virt_balloon_stats.nagios import State, judge, render_check
from virt_balloon_stats.stats import Status

#: The module's table: status -> plugin state.
STATE_OF_STATUS = {
    "ok": State.OK,
    "paused": State.OK,
    "polling_disabled": State.WARNING,
    "never_updated": State.WARNING,
    "stale": State.CRITICAL,
    "no_balloon": State.UNKNOWN,
    "unreachable": State.UNKNOWN,
    "unresponsive": State.CRITICAL,
}

FIRST_LINE = re.compile(r"^BALLOON (OK|WARNING|CRITICAL|UNKNOWN) - (.+?)(?: \| (.+))?$")
PERFDATA = re.compile(r"^'[^'=]+'=-?[0-9.]+(s|B)?(;[0-9.]*){2,4}$")


def _sample(name, stack="debian12", **kwargs):
    fixture = load(name, stack)
    w = World([fixture], now=now_for(fixture), stack=stack, **kwargs)
    return w.client.sample(fixture["domain"]["name"])


def _unreachable():
    command = {"execute": "query-balloon"}
    return _sample("virtio", qmp_raises=[(command, recorded_error("monitor-command-not-running"))])


def _mismatch():
    fixture = load("virtio")
    fixture["memory_stats"]["unused"] += 1
    w = World([fixture], now=now_for(fixture))
    return w.client.sample(fixture["domain"]["name"])


def _all_samples():
    samples = {name: _sample(name) for name in scenario_names()}
    samples["unreachable"] = _unreachable()
    return samples


@pytest.mark.parametrize(
    "stack, name", stack_scenarios() + [pytest.param("debian12", "unreachable", id="unreachable")]
)
def test_judge_each_status(stack, name):
    """Each status maps to its plugin state, and the reason starts with the status."""
    sample = _unreachable() if name == "unreachable" else _sample(name, stack)
    status = "unreachable" if name == "unreachable" else EXPECTED_STATUS[name]
    assert sample.status.value == status
    verdict = judge(sample)
    assert verdict.state is STATE_OF_STATUS[status]
    assert verdict.reason.startswith(f"{status}: ")


def test_every_status_has_a_state():
    """The table covers every Status."""
    assert set(STATE_OF_STATUS) == {s.value for s in Status}


def test_crosscheck_mismatch_is_a_warning():
    """QEMU and libvirt disagree on a fresh domain: WARNING naming the figure."""
    sample = _mismatch()
    assert sample.status is Status.OK
    verdict = judge(sample)
    assert verdict.state is State.WARNING
    assert "stat-free-memory" in verdict.reason


@pytest.mark.parametrize(
    "name, max_age, expected",
    [
        ("virtio", None, State.OK),
        ("virtio", 0.5, State.CRITICAL),
        ("virtio", 1, State.OK),
        ("virtio", 100, State.OK),
        ("paused", 0.5, State.OK),
        ("nostats", 0.5, State.WARNING),
        ("nodriver", 0.5, State.WARNING),
        ("stale", 1000, State.CRITICAL),
    ],
)
def test_max_age_rule(name, max_age, expected):
    """Older than --max-age is CRITICAL, except paused and polling-disabled domains.

    A never-updated domain has no age, so the rule does not apply to it.
    """
    sample = _sample(name)
    verdict = judge(sample, max_age)
    assert verdict.state is expected
    if expected is State.CRITICAL and name == "virtio":
        assert f"over --max-age {max_age:g} s" in verdict.reason


@pytest.mark.parametrize(
    "names, expected",
    [
        (["virtio", "paused"], State.OK),
        (["virtio", "none"], State.UNKNOWN),
        (["none", "nostats"], State.WARNING),
        (["virtio", "unreachable", "nodriver"], State.WARNING),
        (["nostats", "stale", "none"], State.CRITICAL),
        (["stale", "virtio"], State.CRITICAL),
    ],
)
def test_overall_state_is_the_worst(names, expected):
    """CRITICAL > WARNING > UNKNOWN > OK, whatever the order of the domains."""
    samples = _all_samples()
    chosen = [samples[n] for n in names]
    for order in (chosen, chosen[::-1]):
        state, text = render_check(order)
        assert state is expected
        assert text.startswith(f"BALLOON {expected.name} - ")


def test_exit_codes_are_the_plugin_convention():
    """0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    assert [int(s) for s in (State.OK, State.WARNING, State.CRITICAL, State.UNKNOWN)] == [0, 1, 2, 3]


def test_output_first_line_and_perfdata():
    """First line: BALLOON STATE - summary | perfdata; then one line per domain."""
    samples = _all_samples()
    chosen = [samples[n] for n in ("virtio", "virtio-hog", "stale", "nostats")]
    state, text = render_check(chosen, max_age=60)
    lines = text.splitlines()
    match = FIRST_LINE.match(lines[0])
    assert match, lines[0]
    assert match.group(1) == state.name == "CRITICAL"
    assert "1 critical" in match.group(2) and samples["stale"].domain in match.group(2)
    perf = match.group(3).split(" ")
    for item in perf:
        assert PERFDATA.match(item), item
    age_items = [p for p in perf if p.startswith(f"'{samples['virtio'].domain}_age'")]
    assert age_items == [f"'{samples['virtio'].domain}_age'={samples['virtio'].age_seconds:.0f}s;;60;0"]
    free = samples["virtio-hog"].get("stat-free-memory")
    total = samples["virtio-hog"].get("stat-total-memory")
    assert f"'{samples['virtio-hog'].domain}_free'={free}B;;;0;{total}" in perf
    assert len(lines) == 1 + len(chosen)
    for line, sample in zip(lines[1:], chosen):
        assert line.split(": ")[1] == sample.domain


def test_perfdata_label_has_no_quote_or_equals():
    """A domain name with ' or = cannot break the perfdata syntax."""
    fixture = load("virtio")
    fixture["domain"]["name"] = "it's=odd"  # synthetic: the testbed's names are plain
    w = World([fixture], now=now_for(fixture))
    _, text = render_check([w.client.sample(fixture["domain"]["name"])])
    perf = FIRST_LINE.match(text.splitlines()[0]).group(3)
    assert "'it_s_odd_age'" in perf


def test_no_domain_is_unknown():
    """Nothing to check is UNKNOWN, not OK."""
    assert render_check([]) == (State.UNKNOWN, "BALLOON UNKNOWN - no domain to check")

"""virt_balloon_stats.formats: human units, the stats table, JSON and Prometheus text.

Samples are produced by the real client from the recorded scenarios of both
stacks, so the renderers see exactly what a run on the testbed would give
them: QEMU 10.0 with a Linux 6.12 guest sends QEMU 9.2's extra stats (all 0
on the idle guest); figures other than 0 for them are added to a recorded
QEMU 7.2 reply (synthetic).
"""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import World, load, now_for, stack_scenarios
from virt_balloon_stats.formats import (
    format_age,
    human_bytes,
    render_json,
    render_stats,
    render_table,
)
from virt_balloon_stats.stats import STATS


U64_MAX = 2**64 - 1

#: QEMU 9.2's stats, which libvirt has no key for.
UNMAPPED = [s for s in STATS if s.libvirt is None]


def _sample(name, source="both", rename=None, extra=None, stack="debian12"):
    """The real client's sample of a recorded scenario.

    :param extra: Figures added to the recorded guest-stats reply, as a
        QEMU 9.2 would send them (synthetic on the debian12 set's QEMU 7.2).
    """
    fixture = load(name, stack)
    if rename is not None:
        fixture["domain"]["name"] = rename
    if extra is not None:
        for exchange in fixture["qmp"]:
            if exchange["command"].get("arguments", {}).get("property") == "guest-stats":
                reply = json.loads(exchange["reply"])
                if "return" in reply:
                    reply["return"]["stats"].update(extra)
                    exchange["reply"] = json.dumps(reply)
    w = World([fixture], now=now_for(fixture), stack=stack)
    return w.client.sample(fixture["domain"]["name"], source=source)


def _rows(text):
    """The figure rows of a stats table, split into columns, by QEMU name."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  stat-")}


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "-"),
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2, "1.0 MiB"),
        (162013184, "154.5 MiB"),
        (1024**3, "1.0 GiB"),
        (1024**4, "1.0 TiB"),
        (1024**5, "1024.0 TiB"),
    ],
)
def test_human_bytes(value, text):
    """Binary units as virsh and free -h show them; None is a dash, never 0."""
    assert human_bytes(value) == text


@pytest.mark.parametrize("value", [1024**2 - 1, 1024**3 - 1, 1024**4 - 1])
def test_human_bytes_just_below_a_unit_never_shows_1024(value):
    """One byte short of 1 MiB must not print as "1024.0 KiB" (rounding must move to the next unit)."""
    number, unit = human_bytes(value).split()
    assert float(number) < 1024, human_bytes(value)


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "never"), (0, "0 s"), (119, "119 s"), (120, "2 min"), (7199, "120 min"), (7200, "2.0 h")],
)
def test_format_age(seconds, text):
    """Seconds under two minutes, minutes under two hours, then hours."""
    assert format_age(seconds) == text


def test_render_table_aligns_and_strips():
    """Columns two spaces apart, no trailing blanks."""
    text = render_table(("A", "BB"), [("xxx", "y"), ("z", "")])
    assert text.splitlines() == ["A    BB", "xxx  y", "z"]


@pytest.mark.parametrize(
    "stack, name", stack_scenarios(only={"virtio", "virtio-hog", "nodriver", "transitional", "reset"})
)
def test_render_stats_puts_libvirts_name_beside_each_qemu_name(stack, name):
    """Every QEMU figure has its row, with libvirt's key in the LIBVIRT column of the same row.

    QEMU 9.2's stats: QEMU 7.2 does not report them, so no row; QEMU 10.0
    does, and a guest that answered fills them: a row of QEMU's figure with
    nothing on libvirt's side. Unsupported on both sides (no guest driver,
    or just reset): no row.
    """
    sample = _sample(name, stack=stack)
    text = render_stats([sample])
    rows = _rows(text)
    answered = sample.last_update is not None
    for spec in STATS:
        if spec.libvirt is None:
            if stack == "next" and answered:
                assert rows[spec.qemu][1:] == ["0", *(["B"] if spec.unit == "bytes" else []),
                                               "-", "-", "qmp", "only"], rows[spec.qemu]
            else:
                assert spec.qemu not in rows, spec.qemu
            continue
        assert spec.qemu in rows, spec.qemu
        assert spec.libvirt in rows[spec.qemu][1:], rows[spec.qemu]
    assert f"Domain: {sample.domain}" in text
    assert f"Status:      {sample.status.value}" in text


def test_render_stats_values_are_human_or_raw(stack):
    """Human units by default; --bytes shows QEMU's bytes and libvirt's KiB as they are."""
    fixture = load("virtio", stack)
    sample = _sample("virtio", stack=stack)
    free = sample.get("stat-free-memory")
    human = render_stats([sample])
    raw = render_stats([sample], raw_bytes=True)
    row = next(line for line in raw.splitlines() if line.startswith("  stat-free-memory"))
    assert str(free) in row
    assert f"{fixture['memory_stats']['unused']} KiB" in row
    assert human_bytes(free) in human
    assert "agree" in row


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"nodriver", "reset"}))
def test_render_stats_shows_unsupported_as_dash_and_says_so(stack, name):
    """No guest driver (or none since the reset): figures "-", the check column says unsupported, never 0."""
    text = render_stats([_sample(name, stack=stack)])
    row = next(line for line in text.splitlines() if line.startswith("  stat-free-memory"))
    assert row.split()[1] == "-"
    assert "unsupported" in row


def test_render_stats_shows_qemu_9_2_figures_with_nothing_on_libvirts_side():
    """A figure libvirt has no key for: QEMU's value (bytes in binary units), dashes, "qmp only"."""
    extra = {"stat-oom-kills": 3, "stat-async-scans": 4096 * 512, "stat-direct-reclaims": 0}
    extra.update({s.qemu: U64_MAX for s in UNMAPPED if s.qemu not in extra})
    sample = _sample("virtio", extra=extra)
    assert sample.crosscheck.result.value == "agree"
    human = _rows(render_stats([sample]))
    raw = _rows(render_stats([sample], raw_bytes=True))
    assert human["stat-oom-kills"] == ["stat-oom-kills", "3", "-", "-", "qmp", "only"]
    assert human["stat-async-scans"] == ["stat-async-scans", "2.0", "MiB", "-", "-", "qmp", "only"]
    assert raw["stat-async-scans"] == ["stat-async-scans", str(4096 * 512), "-", "-", "qmp", "only"]
    assert human["stat-direct-reclaims"] == ["stat-direct-reclaims", "0", "B", "-", "-", "qmp", "only"]
    # An older guest on QEMU 9.2 leaves the rest unsupported: nothing to show on either side, no row.
    for name in ("stat-alloc-stalls", "stat-direct-scans", "stat-async-reclaims"):
        assert name not in human
    assert [r[0] for r in human.values()][: len(STATS) - len(UNMAPPED)] == [
        s.qemu for s in STATS if s.libvirt is not None
    ]


def test_json_has_qemu_9_2_figures_as_qemu_gave_them_and_libvirt_without_them():
    """JSON: QEMU's figures by name (null where unsupported), listed as qmp_only; libvirt's as before."""
    extra = {s.qemu: U64_MAX for s in UNMAPPED}
    extra["stat-oom-kills"] = 1
    sample = _sample("virtio", extra=extra)
    doc = json.loads(render_json([sample.to_dict()]))[0]
    assert doc["stats"]["stat-oom-kills"] == 1
    assert doc["stats"]["stat-async-scans"] is None
    assert doc["libvirt"] == load("virtio")["memory_stats"]
    assert doc["crosscheck"]["result"] == "agree" and doc["crosscheck"]["mismatches"] == []
    assert doc["crosscheck"]["qmp_only"] == [s.qemu for s in UNMAPPED]
    assert doc["crosscheck"]["checked"] == len(STATS) - len(UNMAPPED) + 1


def test_libvirt_source_has_no_qemu_9_2_figures(stack):
    """The libvirt source cannot see them: neither in the table nor in the JSON, not even as null.

    Not even from libvirt 11.3, whose QEMU 10.0 had them at that moment.
    """
    sample = _sample("virtio", source="libvirt", stack=stack)
    assert set(sample.to_dict()["stats"]) == {s.qemu for s in STATS if s.libvirt is not None}
    assert not set(_rows(render_stats([sample]))) & {s.qemu for s in UNMAPPED}


def test_render_stats_of_no_balloon_has_no_table(stack):
    """No balloon: status and polling, but no figure rows."""
    text = render_stats([_sample("none", stack=stack)])
    assert "no_balloon" in text
    assert "stat-free-memory" not in text


def test_render_json_is_an_array_even_for_one():
    """Scripts get a JSON array whatever the number of domains."""
    doc = _sample("virtio").to_dict()
    assert json.loads(render_json([doc])) == [doc]

"""virt_balloon_stats.formats: human units, the stats table, JSON and Prometheus text.

Samples are produced by the real client from the recorded scenarios, so the
renderers see exactly what a run on the testbed would give them.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import World, load, now_for
from virt_balloon_stats.formats import (
    format_age,
    human_bytes,
    render_json,
    render_stats,
    render_table,
)
from virt_balloon_stats.stats import STATS


def _sample(name, source="both", rename=None):
    fixture = load(name)
    if rename is not None:
        fixture["domain"]["name"] = rename
    w = World([fixture], now=now_for(fixture))
    return w.client.sample(fixture["domain"]["name"], source=source)


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


@pytest.mark.parametrize("name", ["virtio", "virtio-hog", "nodriver", "transitional"])
def test_render_stats_puts_libvirts_name_beside_each_qemu_name(name):
    """Every QEMU figure has its row, with libvirt's key in the LIBVIRT column of the same row."""
    sample = _sample(name)
    text = render_stats([sample])
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  stat-")}
    for spec in STATS:
        assert spec.qemu in rows, spec.qemu
        assert spec.libvirt in rows[spec.qemu][1:], rows[spec.qemu]
    assert f"Domain: {sample.domain}" in text
    assert f"Status:      {sample.status.value}" in text


def test_render_stats_values_are_human_or_raw():
    """Human units by default; --bytes shows QEMU's bytes and libvirt's KiB as they are."""
    fixture = load("virtio")
    sample = _sample("virtio")
    free = sample.get("stat-free-memory")
    human = render_stats([sample])
    raw = render_stats([sample], raw_bytes=True)
    row = next(line for line in raw.splitlines() if line.startswith("  stat-free-memory"))
    assert str(free) in row
    assert f"{fixture['memory_stats']['unused']} KiB" in row
    assert human_bytes(free) in human
    assert "agree" in row


def test_render_stats_shows_unsupported_as_dash_and_says_so():
    """No guest driver: figures are "-" and the check column says unsupported, never 0."""
    text = render_stats([_sample("nodriver")])
    row = next(line for line in text.splitlines() if line.startswith("  stat-free-memory"))
    assert row.split()[1] == "-"
    assert "unsupported" in row


def test_render_stats_of_no_balloon_has_no_table():
    """No balloon: status and polling, but no figure rows."""
    text = render_stats([_sample("none")])
    assert "no_balloon" in text
    assert "stat-free-memory" not in text


def test_render_json_is_an_array_even_for_one():
    """Scripts get a JSON array whatever the number of domains."""
    doc = _sample("virtio").to_dict()
    assert json.loads(render_json([doc])) == [doc]

"""virt_balloon_stats.formats: human units, the stats table, JSON and Prometheus text.

Samples are produced by the real client from the recorded scenarios, so the
renderers see exactly what a run on the testbed would give them.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from tests.unit.conftest import World, load, now_for
from virt_balloon_stats.formats import (
    format_age,
    human_bytes,
    metric_name,
    render_json,
    render_prometheus,
    render_stats,
    render_table,
)
from virt_balloon_stats.stats import ACTUAL, STATS, STATS_BY_QEMU_NAME, GuestStats, StatSpec, Status


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


@pytest.mark.parametrize(
    "spec, name",
    [
        (STATS_BY_QEMU_NAME["stat-free-memory"], "virt_balloon_free_memory_bytes"),
        (STATS_BY_QEMU_NAME["stat-swap-in"], "virt_balloon_swap_in_bytes_total"),
        (STATS_BY_QEMU_NAME["stat-minor-faults"], "virt_balloon_minor_faults_total"),
        (STATS_BY_QEMU_NAME["stat-htlb-pgfail"], "virt_balloon_htlb_pgfail_total"),
        (ACTUAL, "virt_balloon_actual_bytes"),
    ],
)
def test_metric_name(spec, name):
    """Unit suffix, then _total for counters."""
    assert metric_name(spec) == name


# -- Prometheus text format: parsed line by line ---------------------------------

_SAMPLE_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (-?[0-9]+(?:\.[0-9]+)?)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')


def _unescape(value):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def _parse_labels(text):
    labels, pos = {}, 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad label text at {text[pos:]!r}"
        labels[match.group(1)] = _unescape(match.group(2))
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", text
            pos += 1
    return labels


def _parse(text):
    """(types, samples): every line is a HELP, a TYPE or `name{labels} value`."""
    assert text.endswith("\n")
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE given twice for {name}"
            types[name] = kind
            continue
        match = _SAMPLE_LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        assert name in types, f"{name} sampled before its TYPE"
        samples.append((name, _parse_labels(labels), float(value)))
    return types, samples


def test_prometheus_every_line_parses_and_values_are_the_figures():
    """Each known figure is exported once per domain, in QEMU's unit, labelled with uri, domain and uuid."""
    samples = [_sample("virtio"), _sample("virtio-hog")]
    types, parsed = _parse(render_prometheus(samples))
    for s in samples:
        mine = {name: value for name, labels, value in parsed
                if labels.get("uuid") == s.uuid and "status" not in labels}
        for spec in STATS:
            assert mine[metric_name(spec)] == s.get(spec.qemu)
        assert mine["virt_balloon_actual_bytes"] == s.actual_bytes
        assert mine["virt_balloon_last_update_seconds"] == s.last_update
        assert mine["virt_balloon_polling_interval_seconds"] == s.polling.qemu_interval
        assert mine["virt_balloon_crosscheck_mismatches"] == 0
    for name, labels, _ in parsed:
        assert {"uri", "domain", "uuid"} <= set(labels)


def test_prometheus_status_is_one_hot():
    """virt_balloon_status: 1 for the domain's status, 0 for every other."""
    sample = _sample("nostats")
    _, parsed = _parse(render_prometheus([sample]))
    status = {labels["status"]: value for name, labels, value in parsed if name == "virt_balloon_status"}
    assert status == {st.value: float(st is Status.POLLING_DISABLED) for st in Status}


def test_prometheus_counters_end_in_total():
    """Every counter family ends in _total; gauges do not."""
    types, _ = _parse(render_prometheus([_sample("virtio")]))
    assert {n for n, k in types.items() if k == "counter"} == {metric_name(s) for s in STATS if s.cumulative}
    for name, kind in types.items():
        assert name.endswith("_total") is (kind == "counter"), name


def test_prometheus_leaves_unsupported_figures_out():
    """No guest driver: no figure lines at all (never a 0), and no last-update."""
    sample = _sample("nodriver")
    _, parsed = _parse(render_prometheus([sample]))
    names = {name for name, _, _ in parsed}
    assert not names & {metric_name(s) for s in STATS}
    assert "virt_balloon_last_update_seconds" not in names
    assert "virt_balloon_actual_bytes" in names


def test_prometheus_escapes_label_values():
    """A domain name with a quote, a backslash and a newline round-trips through the label escaping."""
    # Synthetic name: libvirt allows these characters; the testbed's names do not have them.
    odd = 'vm "quoted" \\ back\nslash'
    sample = _sample("virtio", rename=odd)
    text = render_prometheus([sample])
    _, parsed = _parse(text)
    assert {labels["domain"] for _, labels, _ in parsed} == {odd}
    assert '\\"quoted\\"' in text and "\\\\" in text


def test_prometheus_unknown_stat_goes_to_guest_stat_with_stat_label():
    """Synthetic stat-oom-kills (QEMU 9.2+): exported under virt_balloon_guest_stat{stat=...}."""
    sample = _sample("virtio", source="qmp")
    values = dict(sample.stats.values, **{"stat-oom-kills": 4, "stat-alloc-stalls": None})
    newer = dataclasses.replace(sample, stats=GuestStats(values=values, last_update=sample.last_update))
    _, parsed = _parse(render_prometheus([newer]))
    extra = [(labels["stat"], value) for name, labels, value in parsed if name == "virt_balloon_guest_stat"]
    assert extra == [("stat-oom-kills", 4.0)]


def test_prometheus_help_and_type_once_per_family_for_many_domains():
    """Two domains share each family's HELP and TYPE lines."""
    text = render_prometheus([_sample("virtio"), _sample("transitional")])
    helps = [line.split(" ")[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))


def test_unknown_spec_metric_name_is_sanitized():
    """Names are made of [a-zA-Z0-9_] only."""
    assert metric_name(StatSpec("stat-a.b/c", None, None, "count", "")) == "virt_balloon_a_b_c"


def test_prometheus_up_per_host():
    """virt_balloon_up{uri} tells an empty scrape from a libvirtd that could not be reached."""
    down = "qemu+tcp://127.0.0.1/system"
    _, parsed = _parse(render_prometheus([], {"qemu:///system": True, down: False}))
    assert [(n, labels, v) for n, labels, v in parsed] == [
        ("virt_balloon_up", {"uri": "qemu:///system"}, 1.0),
        ("virt_balloon_up", {"uri": down}, 0.0),
    ]

"""virt_balloon_stats.watch: rates over the guest's own clock, trends, the frame.

The first sample of a domain is the real client's over a recording; later
ones are that sample with the guest's answer moved forward (new last-update,
grown counters), since a recording holds one guest answer per scenario.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.conftest import World, load, now_for
from virt_balloon_stats.formats import human_bytes
from virt_balloon_stats.stats import GuestStats
from virt_balloon_stats.watch import TREND_LENGTH, Tracker, render_frame, sparkline


def _first(name="virtio-hog"):
    fixture = load(name)
    w = World([fixture], now=now_for(fixture))
    return w.client.sample(fixture["domain"]["name"])


def _later(sample, seconds, **grown):
    """The same domain after the guest answered ``seconds`` later, figures changed by these amounts."""
    values = dict(sample.stats.values)
    for key, delta in grown.items():
        values[key.replace("_", "-")] += delta
    return dataclasses.replace(
        sample,
        stats=GuestStats(values=values, last_update=sample.last_update + seconds),
        sampled_at=sample.sampled_at + seconds,
    )


def test_no_rate_before_two_answers():
    """One sample: nothing to divide."""
    tracker = Tracker()
    first = _first()
    tracker.update(first)
    assert tracker.rate(first, "stat-minor-faults") is None


def test_rates_use_the_last_update_delta():
    """40 minor faults over 4 s of the guest's clock is 10/s, however often we sampled."""
    tracker = Tracker()
    first = _first()
    second = _later(first, 4, stat_minor_faults=40, stat_swap_in=8192)
    second = dataclasses.replace(second, sampled_at=first.sampled_at + 1)
    tracker.update(first)
    tracker.update(second)
    assert tracker.rate(second, "stat-minor-faults") == 40 / 4
    assert tracker.rate(second, "stat-swap-in") == 8192 / 4
    assert tracker.rate(second, "stat-major-faults") == 0.0


def test_rate_kept_while_the_guest_has_not_answered_again():
    """Same last-update (we sampled faster than the guest answers): the last rate stays, not a zero."""
    tracker = Tracker()
    first = _first()
    second = _later(first, 2, stat_minor_faults=10)
    repeat = dataclasses.replace(second, sampled_at=second.sampled_at + 1)
    for s in (first, second, repeat):
        tracker.update(s)
    assert tracker.rate(repeat, "stat-minor-faults") == 5.0


def test_counter_reset_is_not_a_negative_rate():
    """Counters going down (guest rebooted) give 0, never a negative rate."""
    tracker = Tracker()
    first = _first()
    tracker.update(first)
    tracker.update(_later(first, 2, stat_minor_faults=-first.get("stat-minor-faults")))
    assert tracker.rate(first, "stat-minor-faults") == 0.0


def test_never_updated_domain_has_no_rate():
    """No guest answer yet: no rates, and unsupported figures stay out."""
    tracker = Tracker()
    sample = _first("nodriver")
    tracker.update(sample)
    tracker.update(dataclasses.replace(sample, sampled_at=sample.sampled_at + 5))
    assert tracker.rate(sample, "stat-minor-faults") is None


def test_domains_are_tracked_apart():
    """Rates are per domain (UUID)."""
    tracker = Tracker()
    a, b = _first("virtio"), _first("virtio-hog")
    tracker.update(a)
    tracker.update(_later(a, 2, stat_minor_faults=2))
    tracker.update(b)
    assert tracker.rate(a, "stat-minor-faults") == 1.0
    assert tracker.rate(b, "stat-minor-faults") is None


def test_trend_is_a_sparkline_of_the_last_values():
    """Free memory falling shows as falling bars; the history is bounded."""
    tracker = Tracker(length=3)
    sample = _first()
    steps = [sample]
    for i in range(1, 5):
        steps.append(_later(steps[-1], 2, stat_free_memory=-4096 * i))
    for s in steps:
        tracker.update(s)
    trend = tracker.trend(steps[-1], "stat-free-memory")
    assert len(trend) == 3
    assert trend == sparkline([s.get("stat-free-memory") for s in steps[-3:]])
    assert trend[0] == "█" and trend[-1] == "▁"


@pytest.mark.parametrize(
    "values, bars",
    [
        ([], ""),
        ([None, None], ""),
        ([5, 5, 5], "▁▁▁"),
        ([0, 7], "▁█"),
        ([0, None, 7], "▁ █"),
        (list(range(8)), "▁▂▃▄▅▆▇█"),
        ([10, 0], "█▁"),
    ],
)
def test_sparkline(values, bars):
    """Eight levels between the lowest and highest shown; gaps for unknown values."""
    assert sparkline(values) == bars


def test_default_trend_length():
    """A dozen values fit a terminal column."""
    assert TREND_LENGTH == 12


def test_render_frame_rows():
    """One row per domain, with total, free and available in human units and rates once known."""
    tracker = Tracker()
    first = _first()
    second = _later(first, 4, stat_minor_faults=40)
    tracker.update(first)
    tracker.update(second)
    frame = render_frame([second], tracker, now=second.sampled_at)
    lines = frame.splitlines()
    assert lines[0].startswith("virt-balloon-stats watch - ")
    assert lines[2].split()[0] == "DOMAIN"
    row = lines[3]
    assert row.startswith(second.domain)
    for figure in ("stat-total-memory", "stat-free-memory", "stat-available-memory"):
        assert human_bytes(second.get(figure)) in row
    assert "10.0" in row


def test_render_frame_show_uri():
    """Several hosts: the domain is shown as name@uri."""
    sample = _first()
    frame = render_frame([sample], Tracker(), now=sample.sampled_at, show_uri=True)
    assert f"{sample.domain}@{sample.uri}" in frame

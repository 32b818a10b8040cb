"""virt_balloon_stats.watch: rates over the guest's own clock, trends, the frame.

The first sample of a domain is the real client's over a recording; later
ones are that sample with the guest's answer moved forward (new last-update,
grown counters), since a recording holds one guest answer per scenario.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.conftest import World, counted, load, now_for
from virt_balloon_stats.formats import human_bytes
from virt_balloon_stats.stats import GuestStats, Status
from virt_balloon_stats.watch import TREND_LENGTH, Tracker, render_frame, sparkline

#: The cumulative figures watch shows as rates.
RATED = ("stat-major-faults", "stat-minor-faults", "stat-swap-in", "stat-swap-out")


def _first(name="virtio-hog", stack="debian12"):
    fixture = load(name, stack)
    w = World([fixture], now=now_for(fixture), stack=stack)
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


def _restarted(sample, seconds, **values):
    """The same domain after its counters restarted, answering ``seconds`` later with these figures.

    Synthetic: the guest rebooted (or the machine was reset) between two
    answers, so every figure starts again from the guest's boot.
    """
    figures = dict(sample.stats.values)
    figures.update({key.replace("_", "-"): value for key, value in values.items()})
    # After a machine reset QEMU forgot the last answer: count from when we sampled.
    since = sample.last_update if sample.last_update is not None else int(sample.sampled_at)
    return dataclasses.replace(
        sample,
        stats=GuestStats(values=figures, last_update=since + seconds),
        sampled_at=sample.sampled_at + seconds,
    )


def _machine_reset(sample, seconds):
    """The same domain right after a machine reset on QEMU 10.0 or later.

    Synthetic: QEMU sets last-update back to 0 and every figure to
    unsupported until the guest driver answers again, which is what the
    recorded ``nodriver`` reply looks like for a guest that never answered.
    """
    return dataclasses.replace(
        sample,
        stats=GuestStats(values={name: None for name in sample.stats.values}, last_update=None),
        status=Status.NEVER_UPDATED,
        sampled_at=sample.sampled_at + seconds,
    )


def test_synthetic_machine_reset_is_the_recorded_one():
    """The reset above is what the real client makes of QEMU 10.0 read right after virDomainReset."""
    recorded = _first("reset", "next")
    synthetic = _machine_reset(_first("virtio", "next"), 0)
    assert (recorded.stats, recorded.status) == (synthetic.stats, synthetic.status)
    assert recorded.polling.qemu_interval == 2  # the reset leaves QEMU's polling timer as it was


def test_counter_going_back_is_a_reset_not_a_rate():
    """Counters lower than before (the guest rebooted): no rate for that interval, not negative, not 0/s."""
    tracker = Tracker()
    first = _first()
    rebooted = _restarted(first, 2, stat_minor_faults=5, stat_major_faults=0)
    tracker.update(first)
    tracker.update(rebooted)
    for name in RATED:
        assert tracker.rate(rebooted, name) is None, name


def test_rates_resume_from_the_pair_after_a_reset():
    """After the interval that went back, the next pair of answers gives rates again."""
    tracker = Tracker()
    first = _first()
    before = _later(first, 2, stat_minor_faults=10)
    rebooted = _restarted(before, 2, stat_minor_faults=5)
    after = _later(rebooted, 4, stat_minor_faults=40)
    for s in (first, before):
        tracker.update(s)
    assert tracker.rate(before, "stat-minor-faults") == 5.0
    tracker.update(rebooted)
    assert tracker.rate(rebooted, "stat-minor-faults") is None
    tracker.update(after)
    assert tracker.rate(after, "stat-minor-faults") == 10.0


def test_one_counter_going_back_is_a_reset_of_all():
    """A reboot restarts every counter: one that fell means the others' differences span two boots too."""
    tracker = Tracker()
    first = _later(_first(), 0, stat_major_faults=100)
    # Synthetic: minor faults since the new boot already exceed the old count.
    rebooted = _restarted(
        first, 2, stat_major_faults=3, stat_minor_faults=first.get("stat-minor-faults") + 500
    )
    tracker.update(first)
    tracker.update(rebooted)
    assert tracker.rate(rebooted, "stat-major-faults") is None
    assert tracker.rate(rebooted, "stat-minor-faults") is None


def test_machine_reset_shows_no_rate_until_two_new_answers():
    """last-update 0, figures unsupported: the old rate is not shown; rates come back after two answers."""
    tracker = Tracker()
    first = _first()
    second = _later(first, 2, stat_minor_faults=10)
    tracker.update(first)
    tracker.update(second)
    assert tracker.rate(second, "stat-minor-faults") == 5.0
    reset = _machine_reset(second, 2)
    tracker.update(reset)
    for name in RATED:
        assert tracker.rate(reset, name) is None, name
    row = render_frame([reset], tracker, now=reset.sampled_at).splitlines()[3]
    assert "never_updated" in row and "5.0" not in row
    answered = _restarted(
        reset, 6, stat_minor_faults=100, stat_major_faults=1, stat_swap_in=0, stat_swap_out=0
    )
    tracker.update(answered)
    assert tracker.rate(answered, "stat-minor-faults") is None  # nothing to pair it with yet
    again = _later(answered, 2, stat_minor_faults=30)
    tracker.update(again)
    assert tracker.rate(again, "stat-minor-faults") == 15.0


def test_last_update_going_back_is_no_rate():
    """An answer older than the last one seen (the host clock was set back): no pair to divide by."""
    tracker = Tracker()
    first = _first()
    second = _later(first, 2, stat_minor_faults=10)
    earlier = _later(second, -30, stat_minor_faults=10)
    for s in (first, second, earlier):
        tracker.update(s)
    assert tracker.rate(earlier, "stat-minor-faults") is None


_STEP = st.tuples(
    st.integers(min_value=-3, max_value=6),  # seconds of the guest's clock since the last answer
    st.booleans(),  # a machine reset just before this answer
    st.lists(st.integers(min_value=-50, max_value=200), min_size=len(RATED), max_size=len(RATED)),
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_STEP, min_size=1, max_size=12))
@counted
def test_rates_are_never_negative_and_none_across_a_fall(steps):
    """Whatever the guest does, a rate is None or at least 0, and None right after any counter fell."""
    tracker = Tracker()
    current = _first()
    tracker.update(current)
    for seconds, reset, deltas in steps:
        if reset:
            current = _machine_reset(current, 1)
            tracker.update(current)
            assert all(tracker.rate(current, name) is None for name in RATED)
            current = _restarted(current, 1 + abs(seconds), **{n.replace("-", "_"): 0 for n in RATED})
        previous = current
        values = dict(current.stats.values)
        for name, delta in zip(RATED, deltas):
            values[name] = max(0, values[name] + delta)
        current = dataclasses.replace(
            current,
            stats=GuestStats(values=values, last_update=current.last_update + seconds),
            sampled_at=current.sampled_at + abs(seconds),
        )
        tracker.update(current)
        rates = [tracker.rate(current, name) for name in RATED]
        assert all(r is None or r >= 0 for r in rates), rates
        if seconds and any(values[n] < previous.get(n) for n in RATED):
            assert rates == [None] * len(RATED)


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

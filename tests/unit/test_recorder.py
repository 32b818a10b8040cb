"""Recording: collector cycles over recorded scenarios become history points, read back from a real file."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.unit.conftest import World, load, now_for
from virt_balloon_stats.collector import Collector, Cycle
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.history import History
from virt_balloon_stats.recorder import Recorder, point_of
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import GuestStats, Status

INTERVAL = 10.0


def _cycle(name: str, stack: str = "debian12") -> Cycle:
    """One real collector cycle over one recorded scenario."""
    fixtures = [load(name, stack)]
    world = World(fixtures, now=now_for(fixtures[0]), stack=stack)
    with Collector(clients=[world.client], timeout=5.0) as collector:
        return collector.collect()


def _at(cycle: Cycle, started_at: float, **stats: int) -> Cycle:
    """The cycle as if it had started at ``started_at``, its sample's figures changed as given (synthetic)."""
    [sample] = cycle.samples
    if stats:
        assert sample.stats is not None
        values = {**sample.stats.values, **stats}
        changed = GuestStats(values=values, last_update=sample.stats.last_update)
        sample = dataclasses.replace(sample, stats=changed)
    return dataclasses.replace(cycle, started_at=started_at, samples=(sample,))


def _one(cycle: Cycle) -> Sample:
    [sample] = cycle.samples
    return sample


@pytest.fixture
def history(tmp_path: Any) -> Any:
    with History.open(str(tmp_path / "history.sqlite"), writer=True, clock=lambda: 1_800_000_000.0) as opened:
        yield opened


def test_an_ok_sample_is_a_point_with_its_used_memory_and_balloon_size():
    sample = _one(_cycle("virtio"))
    assert sample.status is Status.OK and sample.stats is not None
    point = point_of(None, sample, start=100.0, seconds=INTERVAL)
    total, available = sample.get("stat-total-memory"), sample.get("stat-available-memory")
    assert total is not None and available is not None
    assert point.used_peak == total - available > 0
    assert point.actual == sample.actual_bytes
    assert (point.start, point.seconds, point.ok_seconds) == (100.0, INTERVAL, INTERVAL)
    assert (point.swap_in, point.major_faults, point.oom_kills) == (0, 0, 0)  # no reading before it


@pytest.mark.parametrize(
    "scenario, stack",
    [("stale", "debian12"), ("nodriver", "debian12"), ("paused", "debian12"), ("reset", "next")],
)
def test_any_other_status_is_a_gap(scenario, stack):
    """Stale, never updated, paused: no figures in the history, only the interval, as a gap."""
    sample = _one(_cycle(scenario, stack))
    assert sample.status is not Status.OK
    point = point_of(_one(_cycle("virtio")), sample, start=5.0, seconds=INTERVAL)
    assert point.ok_seconds == 0 and point.used_peak is None
    assert point.major_faults == point.swap_in == 0


def test_counters_are_increases_and_a_reset_counts_zero():
    base = _cycle("virtio")
    first = _one(_at(base, 0.0, **{"stat-major-faults": 10, "stat-swap-in": 4096}))
    later = _one(_at(base, 10.0, **{"stat-major-faults": 25, "stat-swap-in": 8192}))
    point = point_of(first, later, start=0.0, seconds=INTERVAL)
    assert (point.major_faults, point.swap_in) == (15, 4096)
    rebooted = _one(_at(base, 20.0, **{"stat-major-faults": 3, "stat-swap-in": 0}))
    point = point_of(later, rebooted, start=10.0, seconds=INTERVAL)
    assert (point.major_faults, point.swap_in) == (0, 0)


def test_the_six_of_a_612_guest_are_recorded_as_increases():
    base = _cycle("virtio", "next")
    before = _one(_at(base, 0.0, **{"stat-oom-kills": 1, "stat-alloc-stalls": 2, "stat-direct-reclaims": 0}))
    after = _one(_at(base, 10.0, **{"stat-oom-kills": 3, "stat-alloc-stalls": 2,
                                    "stat-direct-reclaims": 8192}))
    point = point_of(before, after, start=0.0, seconds=INTERVAL)
    assert (point.oom_kills, point.alloc_stalls, point.direct_reclaims) == (2, 0, 8192)


def test_recorder_tiles_time_and_reads_back(history):
    base = _cycle("virtio")
    uuid = _one(base).uuid
    recorder = Recorder(history, INTERVAL)
    starts = [1_799_999_000.0 + 10 * n for n in range(4)]
    for n, start in enumerate(starts):
        assert recorder.record(_at(base, start, **{"stat-major-faults": 100 + 5 * n})) == 1
    points = history.points(uuid, 0.0, 2e9)
    assert [p.start for p in points] == [starts[0] - INTERVAL] + starts[:-1]
    assert all(p.seconds == INTERVAL and p.ok_seconds == INTERVAL for p in points)
    assert [p.major_faults for p in points] == [0, 5, 5, 5]
    assert recorder.points == 4
    assert [d.name for d in history.domains()] == [_one(base).domain]


def test_a_domain_back_after_an_absence_starts_afresh(history):
    base = _cycle("virtio")
    other = _cycle("nostats")
    recorder = Recorder(history, INTERVAL)
    recorder.record(_at(base, 1_799_999_000.0, **{"stat-major-faults": 50}))
    recorder.record(dataclasses.replace(other, started_at=1_799_999_010.0))  # the first domain is gone
    recorder.record(_at(base, 1_799_999_020.0, **{"stat-major-faults": 90}))
    points = history.points(_one(base).uuid, 0.0, 2e9)
    # Not one 20 s point with 40 faults: the domain left, so its next point is one interval, counting none.
    assert [(p.start, p.seconds, p.major_faults) for p in points] == [
        (1_799_999_000.0 - INTERVAL, INTERVAL, 0),
        (1_799_999_020.0 - INTERVAL, INTERVAL, 0),
    ]


def test_gaps_are_written_as_gaps(history):
    recorder = Recorder(history, INTERVAL)
    cycle = _cycle("stale")
    recorder.record(dataclasses.replace(cycle, started_at=1_799_999_000.0))
    [point] = history.points(_one(cycle).uuid, 0.0, 2e9)
    assert point.ok_seconds == 0 and point.used_peak is None


def test_interval_must_be_positive(history):
    with pytest.raises(InvalidArgument, match="positive"):
        Recorder(history, 0)


def test_the_command_lines_default_history_is_the_stores():
    """The parser names the default without importing sqlite3; the two must not drift apart."""
    from virt_balloon_stats.cli.common import HISTORY_PATH
    from virt_balloon_stats.history import DEFAULT_PATH

    assert HISTORY_PATH == DEFAULT_PATH

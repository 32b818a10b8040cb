"""virt_balloon_stats.history: the SQLite file reclaim advice reads, written by one process.

Every point goes in through ``History.record`` with a clock the test holds,
so downsampling and retention run as they would over days. Writers that
must be another process (a holder of the lock, one killed with SIGKILL) are
a ``python -c`` running :func:`write_forever` from this module. Waits have
generous bounds: they are there so that a broken store fails instead of
hanging, not to measure speed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

from tests.bench.history_size import fill, size_of
from virt_balloon_stats.advice import COUNTERS, Point
from virt_balloon_stats.errors import BalloonStatsError, HistoryError, InvalidArgument
from virt_balloon_stats import history as history_module
from virt_balloon_stats.history import RETENTION_SECONDS, SCHEMA_VERSION, History, RecordedDomain

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
HOUR = 3600
DAY = 24 * HOUR
#: On every bucket boundary (5 minutes), so tier boundaries fall on whole points.
T0 = 1_800_000_000.0
UUID = "5a0f6e52-3c9d-4e0b-9a55-0c6c2f7d2b11"
#: Bound on anything that should take well under a second.
PATIENCE = 10.0


class Clock:
    """The writer's "now", moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fed(i: int, start: float, seconds: float) -> Point:
    """The i-th point of a synthetic guest: gaps, half-ok intervals, a changing balloon, counters.

    Lengths and ok seconds are multiples of 1/4 s, so sums are exact.
    """
    if i % 11 == 0:
        return Point(start, seconds, 0.0, None, None if i % 22 == 0 else (1024 + i % 3) * MiB)
    return Point(
        start,
        seconds,
        seconds / 4 if i % 7 == 0 else seconds,
        (i * 7919 % 1000 + 100) * MiB + (5000 * MiB if i % 1009 == 0 else 0),
        (1024 + i % 3) * MiB,
        swap_in=4096 * (i % 13),
        major_faults=i % 5,
        oom_kills=1 if i % 997 == 0 else 0,
        alloc_stalls=i % 3,
        direct_reclaims=4096 * (i % 17),
    )


def series(start: float, seconds: float, count: int, first: int = 0) -> List[Point]:
    return [fed(first + n, start + n * seconds, seconds) for n in range(count)]


def feed(
    history: History, clock: Clock, points: Sequence[Point], uuid: str = UUID, name: str = "vbs-a"
) -> None:
    """Record each point when it ends, as the collector does."""
    for point in points:
        clock.now = point.end
        history.record(uuid, name, point)


def assert_covers(stored: Sequence[Point], sources: Sequence[Point]) -> None:
    """Each stored point is exactly the merge of the consecutive source points it replaced.

    Its peak is their highest, its ok seconds and counters their sums, its
    balloon the last known; together, stored points cover every source
    point from the first one kept, once.
    """
    assert stored, "nothing stored"
    starts = [p.start for p in sources]
    i = starts.index(stored[0].start)
    for point in stored:
        assert sources[i].start == point.start, f"{point} does not start where the history left off"
        covered = []
        while i < len(sources) and sources[i].start < point.end:
            covered.append(sources[i])
            i += 1
        peaks = [p.used_peak for p in covered if p.used_peak is not None]
        actuals = [p.actual for p in covered if p.actual is not None]
        assert point.seconds == sum(p.seconds for p in covered)
        assert point.ok_seconds == sum(p.ok_seconds for p in covered)
        assert point.used_peak == (max(peaks) if peaks else None)
        assert point.actual == (actuals[-1] if actuals else None)
        for counter in COUNTERS:
            assert getattr(point, counter) == sum(getattr(p, counter) for p in covered), counter
    assert i == len(sources), f"{len(sources) - i} source points are missing at the end"


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "history.sqlite")


@pytest.fixture
def writer(path: str) -> Iterator[History]:
    with History.open(path, writer=True, clock=Clock(T0)) as history:
        yield history


# -- round trip, schema, refusals ----------------------------------------------------------


def test_points_come_back_as_recorded_gaps_included(path: str):
    clock = Clock(T0)
    mine, other = series(T0, 5.0, 40), series(T0, 5.0, 40, first=500)
    assert any(p.ok_seconds == 0 for p in mine) and any(0 < p.ok_seconds < p.seconds for p in mine)
    with History.open(path, writer=True, clock=clock) as history:
        for a, b in zip(mine, other):
            clock.now = a.end
            history.record(UUID, "vbs-a", a)
            history.record("other-uuid", "vbs-b", b)
        assert history.points(UUID, T0, T0 + 200) == mine
        assert history.points(UUID, T0 + 5, T0 + 15) == mine[1:3], "since is in the window, until is not"
        history.record(UUID, "vbs-a-renamed", fed(41, T0 + 200, 5.0))
    with History.open(path, writer=False) as reader:
        assert reader.points(UUID, 0, T0 + 200) == mine
        assert reader.points("other-uuid", 0, T0 + 200) == other
        assert reader.points("unknown", 0, T0 + 200) == []
        assert reader.domains() == [
            RecordedDomain(UUID, "vbs-a-renamed"), RecordedDomain("other-uuid", "vbs-b")
        ]


def test_points_read_back_are_the_points_the_constructor_makes(path: str):
    """The reader builds points unchecked (they were checked when recorded): the same fields, the same points.

    Oldest first, even from a scan SQLite runs backwards, as it may: the
    order SQLite hands rows to an aggregate is its own, unless asked.
    """
    recorded = series(T0, 5.0, 30)
    with History.open(path, writer=True, clock=Clock(T0)) as history:
        for point in reversed(recorded):
            history.record(UUID, "vbs-a", point)
    with History.open(path, writer=False) as reader:
        reader._db.execute("PRAGMA reverse_unordered_selects = ON")
        read = reader.points(UUID, 0, T0 + 200)
    assert read == recorded
    for back, point in zip(read, recorded):
        assert type(back) is Point
        assert vars(back) == vars(point) and hash(back) == hash(point) and repr(back) == repr(point)
        assert list(vars(back)) == [field.name for field in dataclasses.fields(Point)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        read[0].start = 0.0  # type: ignore[misc]


def test_the_file_is_wal_with_its_schema_version(path: str, writer: History):
    writer.record(UUID, "vbs-a", fed(1, T0, 5.0))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_from_a_newer_schema_is_refused_untouched(path: str):
    with History.open(path, writer=True) as history:
        history.record(UUID, "vbs-a", fed(1, T0, 5.0))
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = Path(path).read_bytes()
    for writer in (True, False):
        with pytest.raises(HistoryError) as caught:
            History.open(path, writer=writer)
        assert caught.value.path == path and caught.value.schema_version == SCHEMA_VERSION + 1
        assert str(caught.value) == (
            f"{path}: written by a newer virt-balloon-stats (history schema {SCHEMA_VERSION + 1}; "
            f"this one reads up to {SCHEMA_VERSION}): upgrade, or give another --history file"
        )
    assert Path(path).read_bytes() == before


@pytest.mark.parametrize("writer", [True, False])
def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path, writer: bool):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the figures you are looking for\n" * 200)
    with pytest.raises(HistoryError) as caught:
        History.open(str(path), writer=writer)
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: not a SQLite database, so not a history file; nothing was")
    assert path.read_bytes() == b"these are not the figures you are looking for\n" * 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "no lock, no WAL left beside it"


def test_another_programs_database_is_refused_untouched(path: str):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE bookmarks (url TEXT)")
    before = Path(path).read_bytes()
    with pytest.raises(HistoryError, match="a SQLite database, but not a history file; nothing was written"):
        History.open(path, writer=True)
    assert Path(path).read_bytes() == before


@pytest.mark.parametrize("writer", [True, False])
def test_a_damaged_database_is_a_history_error_and_left_alone(path: str, writer: bool):
    damaged = b"SQLite format 3\x00" + bytes(range(256)) * 16
    Path(path).write_bytes(damaged)
    with pytest.raises(HistoryError, match=f"^{path}: cannot open the history: ") as caught:
        History.open(path, writer=writer)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert Path(path).read_bytes() == damaged


def test_a_reader_needs_the_file_and_does_not_create_it(path: str):
    with pytest.raises(HistoryError, match="no history here yet"):
        History.open(path, writer=False)
    assert not os.path.exists(path)


def test_a_reader_cannot_record(path: str, writer: History):
    writer.record(UUID, "vbs-a", fed(1, T0, 5.0))
    with History.open(path, writer=False) as reader:
        with pytest.raises(HistoryError, match="only its writer records"):
            reader.record(UUID, "vbs-a", fed(2, T0 + 5, 5.0))


def test_the_writer_creates_its_folder_0750_and_the_file_0640(tmp_path: Path):
    umask = os.umask(0o022)
    try:
        with History.open(str(tmp_path / "lib" / "vbs" / "history.sqlite"), writer=True) as history:
            history.record(UUID, "vbs-a", fed(1, T0, 5.0))
            modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "lib" / "vbs").iterdir()}
    finally:
        os.umask(umask)
    assert (tmp_path / "lib" / "vbs").stat().st_mode & 0o777 == 0o750
    assert modes == dict.fromkeys(["history.sqlite", "history.sqlite-wal", "history.sqlite-shm",
                                   "history.sqlite.lock"], 0o640)


def test_a_figure_sqlite_cannot_hold_is_refused_and_nothing_is_written(path: str, writer: History):
    huge = Point(T0, 5.0, 5.0, 2**64 - 2, 2**30)  # a guest may report anything
    with pytest.raises(InvalidArgument, match="cannot hold") as caught:
        writer.record(UUID, "vbs-a", huge)
    assert isinstance(caught.value, BalloonStatsError) and caught.value.domain == "vbs-a"
    assert writer.points(UUID, 0, 2 * T0) == [] and writer.domains() == []


def test_a_cycle_is_stored_whole_but_for_the_point_it_cannot_hold(writer: History):
    """record_many (a cycle's points, one transaction): the point it cannot hold is refused by
    its domain's name, after every other point is stored; nothing else is lost with it."""
    huge = Point(T0, 5.0, 5.0, 2**64 - 2, 2**30)
    good = fed(1, T0, 5.0)
    with pytest.raises(InvalidArgument, match="cannot hold") as caught:
        writer.record_many([(UUID, "vbs-a", good), ("other-uuid", "vbs-b", huge), ("third", "vbs-c", good)])
    assert caught.value.domain == "vbs-b"
    assert writer.points(UUID, 0, 2 * T0) == [good] and writer.points("third", 0, 2 * T0) == [good]
    assert writer.points("other-uuid", 0, 2 * T0) == []
    assert sorted(d.name for d in writer.domains()) == ["vbs-a", "vbs-c"]


# -- downsampling and retention ------------------------------------------------------------


def test_nine_days_recorded_keep_eight_at_falling_resolution(path: str):
    """5 s points for the last 6 h, minutes to 24 h, 5 minutes to 8 days, nothing older.

    Fed as the collector would, oldest first: 5-minute points (coarser than
    any tier) from 9 days back, 20 s points from 30 h back, then 5 s points
    for the last 7 hours; peaks, ok seconds and counters survive every merge.
    """
    end = T0 + 9 * DAY
    sources = (
        series(T0, 300.0, int((9 * DAY - 30 * HOUR) / 300))
        + series(end - 30 * HOUR, 20.0, 23 * 180, first=10_000)
        + series(end - 7 * HOUR, 5.0, 7 * 720, first=20_000)
    )
    assert sources[-1].end == end
    clock = Clock(T0)
    with History.open(path, writer=True, clock=clock) as history:
        feed(history, clock, sources)
    with History.open(path, writer=False) as reader:
        stored = reader.points(UUID, 0, end)

    assert stored[0].start == end - RETENTION_SECONDS, "nothing older than the retention, and all of it"
    lengths = {
        "over 24 h": {p.seconds for p in stored if p.start < end - DAY},
        "6 to 24 h": {p.seconds for p in stored if end - DAY <= p.start < end - 6 * HOUR},
        "last 6 h": {p.seconds for p in stored if p.start >= end - 6 * HOUR},
    }
    assert lengths == {"over 24 h": {300.0}, "6 to 24 h": {60.0}, "last 6 h": {5.0}}
    assert len(stored) == 7 * 288 + 18 * 60 + 6 * 720
    assert_covers(stored, sources)
    # The 1009th points' 5 GiB peaks landed in each tier, and were kept there.
    assert {p.seconds for p in stored if p.used_peak and p.used_peak > 5000 * MiB} == {300.0, 60.0, 5.0}


def test_downsampling_waits_a_minute_of_the_clock_then_merges_whole_minutes(path: str):
    cutoff = T0 + 6 * HOUR  # the first tier's, once the clock reaches T0 + 12 h
    minute = series(cutoff - 60, 5.0, 12) + series(cutoff, 5.0, 2, first=12)
    clock = Clock(T0 + 12 * HOUR - 1)
    with History.open(path, writer=True, clock=clock) as history:
        for point in minute:
            history.record(UUID, "vbs-a", point)  # the first record runs a pass: nothing is old enough
        clock.now = T0 + 12 * HOUR + 30
        history.record(UUID, "vbs-a", fed(14, cutoff + 10, 5.0))
        assert len(history.points(UUID, 0, 2 * T0)) == 15, "30 s since the last pass: none yet"
        clock.now = T0 + 12 * HOUR + 59
        history.record(UUID, "vbs-a", fed(15, cutoff + 15, 5.0))
        stored = history.points(UUID, 0, 2 * T0)
    assert [p.seconds for p in stored] == [60.0, 5.0, 5.0, 5.0, 5.0]
    assert_covers(stored, minute + [fed(14, cutoff + 10, 5.0), fed(15, cutoff + 15, 5.0)])


def test_a_shorter_retention_drops_a_domain_that_is_gone(path: str):
    clock = Clock(T0)
    with History.open(path, writer=True, retention=HOUR, clock=clock) as history:
        feed(history, clock, series(T0, 5.0, 10), uuid="gone", name="vbs-gone")
        feed(history, clock, series(T0 + 2 * HOUR, 5.0, 10), uuid=UUID)
        assert history.domains() == [RecordedDomain(UUID, "vbs-a")]
        assert history.points("gone", 0, 2 * T0) == []
    with pytest.raises(InvalidArgument, match="retention must be over 0 s"):
        History.open(path, writer=True, retention=0)


# -- one writer, readers alongside, SIGKILL ---------------------------------------------------


def write_forever(path: str, first: int) -> None:
    """A writer process: record 5 s points from the ``first``-th on, saying how many are done."""
    clock = Clock(T0)
    with History.open(path, writer=True, clock=clock) as history:
        for i in range(first, 10**9):
            point = fed(i, T0 + 5 * i, 5.0)
            clock.now = point.end
            history.record(UUID, "vbs-killed", point)
            print(i + 1, flush=True)


class WriterProcess:
    """:func:`write_forever` in another process, its progress read as it goes."""

    def __init__(self, path: str, first: int = 0) -> None:
        code = f"from tests.unit.test_history import write_forever; write_forever({path!r}, {first})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
        self.done: Optional[int] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.endswith(b"\n"):  # a line cut short by the kill says nothing
                self.done = int(line)

    def wait_for(self, count: int) -> int:
        deadline = time.monotonic() + PATIENCE
        while (self.done or 0) < count:
            assert self.proc.poll() is None, f"the writer exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"the writer recorded {self.done} points, not {count}"
            time.sleep(0.01)
        return self.done or 0

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        self.proc.wait(PATIENCE)
        self._reader.join(PATIENCE)
        return self.done or 0


@pytest.fixture
def writers() -> Iterator[List[WriterProcess]]:
    """Writer processes a test starts, killed at its end whatever happens."""
    started: List[WriterProcess] = []
    yield started
    for writer in started:
        if writer.proc.poll() is None:
            writer.kill()


def test_a_second_writer_is_refused_naming_the_file_and_the_holder(path: str, writer: History):
    with pytest.raises(HistoryError) as caught:
        History.open(path, writer=True)
    assert caught.value.holder_pid == os.getpid()
    assert str(caught.value).startswith(f"{path}: pid {os.getpid()} (")
    assert "only one writer at a time" in str(caught.value)
    writer.close()
    with History.open(path, writer=True):
        pass


def test_readers_and_the_writer_in_another_process_never_wait_for_each_other(
    path: str, writers: List[WriterProcess]
):
    writers.append(WriterProcess(path))
    child = writers[0]
    child.wait_for(1)
    with pytest.raises(HistoryError) as caught:
        History.open(path, writer=True)
    assert caught.value.holder_pid == child.proc.pid
    assert f"pid {child.proc.pid} (" in str(caught.value) and "write_forever" in str(caught.value)

    seen = []
    for _ in range(5):
        began = time.monotonic()
        with History.open(path, writer=False) as reader:
            seen.append(sum(p.seconds for p in reader.points(UUID, 0, 2 * T0)))
        assert time.monotonic() - began < PATIENCE / 2
        time.sleep(0.05)
    assert seen == sorted(seen) and seen[-1] > seen[0], "each reader saw the writer's progress"

    # A reader in the middle of a long read holds the writer up no more.
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None) as db:
        db.execute("BEGIN")
        snapshot = db.execute("SELECT count(*) FROM point").fetchone()[0]
        child.wait_for(child.wait_for(1) + 200)
        assert db.execute("SELECT count(*) FROM point").fetchone()[0] == snapshot
        db.execute("COMMIT")


def test_a_writer_killed_mid_write_loses_at_most_its_last_interval(path: str, writers: List[WriterProcess]):
    """Three writers in turn, each killed at a random moment, the next one taking over the lock."""
    rng = random.Random()
    stored = 0
    for _ in range(3):
        writers.append(WriterProcess(path, first=stored))
        writer = writers[-1]
        writer.wait_for(stored + 1)
        time.sleep(rng.uniform(0.05, 0.6))
        done = writer.kill()
        with History.open(path, writer=False) as reader:
            points = reader.points(UUID, 0, 2 * T0)
        stored = int(sum(p.seconds for p in points) / 5)
        assert done <= stored <= done + 1
        assert_covers(points, series(T0, 5.0, stored))
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    lock = Path(path + ".lock")
    assert lock.read_text().split("\n")[0] == str(writers[-1].proc.pid), "the dead holder's pid is left"
    with History.open(path, writer=True) as history:
        assert lock.read_text().split("\n")[0] == str(os.getpid()), "the stale lock was taken over"
        history.record(UUID, "vbs-killed", fed(stored, T0 + 5 * stored, 5.0))


# -- size ----------------------------------------------------------------------------------


def test_size_of_8_days_of_100_domains(tmp_path: Path):
    """Three domains' 8 days, extrapolated: 100 domains at a 5 s interval stay under 100 MB.

    The file holds the same rows whether what got downsampled was recorded
    at 5 s or coarser, so only the last 7 hours are recorded at 5 s (the
    raw tier and an hour of its merging). ``tests/bench/history_size.py``
    measures the full-scale file.
    """
    empty = str(tmp_path / "empty.sqlite")
    with History.open(empty, writer=True):
        pass
    path = str(tmp_path / "history.sqlite")
    domains = 3
    fill(path, domains, ((RETENTION_SECONDS, 300), (DAY, 60), (7 * HOUR, 5)))
    with History.open(path, writer=False) as reader:
        rows = [len(reader.points(d.uuid, 0, 2 * T0)) for d in reader.domains()]
    assert rows == [7 * 288 + 18 * 60 + 6 * 720] * domains, "every tier full: 7,416 rows per domain"
    per_domain = (size_of(path) - size_of(empty)) / domains
    projected = size_of(empty) + 100 * per_domain
    print(f"history: {per_domain / 8:.0f} B per domain-day; 100 domains, 8 days: {projected / 1e6:.1f} MB")
    assert projected < 100e6


# -- the balloon stepper's memory (schema 2) -------------------------------------------------------------


def _schema_1(path: str) -> None:
    """A file as schema 1 wrote it: its three tables, version 1, one domain with one point."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in history_module._SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO domain (id, uuid, name) VALUES (1, ?, 'vbs-a')", (UUID,))
        db.execute("INSERT INTO point VALUES (1, ?, 0, 5000, 5000, 100, 200, 0, 0, 0, 0, 0)",
                   (int(T0 * 1000),))
        db.execute("PRAGMA user_version = 1")


def test_a_schema_1_file_is_read_as_it_is_and_brought_up_to_date_by_its_writer(path: str):
    _schema_1(path)
    with History.open(path, writer=False) as reader:
        assert reader.steps() == {}, "no step table yet: no steps"
        assert len(reader.points(UUID, 0, 2 * T0)) == 1
    with History.open(path, writer=True, clock=Clock(T0)) as history:
        assert history.steps() == {}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM step").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM point").fetchone()[0] == 1, "its points kept"


def test_a_stepper_keeps_steps_beside_the_writer_and_readers_see_them(path: str, writer: History):
    writer.record(UUID, "vbs-a", fed(1, T0, 5.0))
    with History.open(path, writer=False, stepper=True, clock=Clock(T0)) as stepper:
        assert stepper.save_step(UUID, '{"settled": true}')
        assert not stepper.save_step("00000000-0000-4000-8000-000000000000", "{}"), "no history, no step"
        with pytest.raises(HistoryError) as caught:
            stepper.record(UUID, "vbs-a", fed(2, T0 + 5, 5.0))
        assert "only its writer records" in str(caught.value)
        writer.record(UUID, "vbs-a", fed(2, T0 + 5, 5.0))  # the writer goes on meanwhile
    with History.open(path, writer=False) as reader:
        assert reader.steps() == {UUID: '{"settled": true}'}
        with pytest.raises(HistoryError) as caught:
            reader.save_step(UUID, "{}")
        assert "only its stepper keeps steps" in str(caught.value)


def test_one_stepper_at_a_time_and_the_second_is_told_who(path: str, writer: History):
    with History.open(path, writer=False, stepper=True):
        with pytest.raises(HistoryError) as caught:
            History.open(path, writer=False, stepper=True)
    message = str(caught.value)
    assert f"pid {os.getpid()} (" in message and "already steps this history's guests" in message
    assert "only one stepper at a time" in message
    with History.open(path, writer=False, stepper=True):
        pass  # the lock went with its holder


def test_a_guest_that_left_the_history_leaves_its_step_too(path: str):
    clock = Clock(T0)
    with History.open(path, writer=True, clock=clock, retention=3600) as history:
        history.record(UUID, "vbs-a", fed(1, T0, 5.0))
        with History.open(path, writer=False, stepper=True) as stepper:
            assert stepper.save_step(UUID, "{}")
        clock.now = T0 + 7200  # past retention: its points, its domain and its step go
        history.record("00000000-0000-4000-8000-000000000001", "vbs-b", fed(2, T0 + 7200, 5.0))
        assert history.steps() == {}

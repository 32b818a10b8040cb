"""Each domain's history for reclaim advice: one SQLite file, one writer, any number of readers.

The exporter and ``record`` append one :class:`~virt_balloon_stats.advice.Point`
per domain per collector interval; ``advise`` reads a window of them. This is
the only module that imports :mod:`sqlite3`: stdlib, one file, and its WAL
mode lets a reader see the last committed interval while the writer goes on,
neither waiting for the other.

What is kept (:data:`TIERS`, :data:`RETENTION_SECONDS`): every interval as
recorded for the last 6 hours, one point per minute from 6 to 24 hours back,
one per 5 minutes from 24 hours to 8 days back, nothing older. A coarser point
is :func:`~virt_balloon_stats.advice.merge` of the finer ones it replaces, so
the peak, the seconds of ok figures and the counters' increases survive
downsampling; only the timing inside the minute (or 5 minutes) is lost, which
advice over days does not need. The size target decides the tiers: at a 5 s
interval a domain has 4,320 points in 6 hours, 1,080 one-minute points up to
24 hours and 2,016 five-minute points up to 8 days: 7,416 rows of some 50
bytes on disk (B-tree included), so 100 domains take 37 MB of the 100 MB
allowed (``tests/bench/history_size.py``), where 8 days of raw points
(138,240 rows a domain) would take 690 MB. Raw points for a whole day would
take 19,296 rows a domain, some 96 MB: at the limit. The raw tier covers the
last hours, which the advice weighs most, and reading a domain's 8 days is
one range scan of 7,416 rows.

Durability: each interval is its own transaction, with ``synchronous=NORMAL``
in WAL mode, so a process killed with SIGKILL loses at most the interval it
was writing and the file stays consistent (a power cut may lose the last
few seconds of commits as well, never the file's consistency). Downsampling
runs at most once a minute of the injected clock, in a transaction of its
own, and each pass merges at most :data:`PASS_SPAN_SECONDS` of history per
tier, so a writer that was stopped for hours catches up in bounded steps.

One writer at a time: a writer holds ``flock`` on ``PATH.lock`` (beside the
file, holding its pid and command line) for as long as it is open. The
kernel drops the lock when the holder dies, however it dies, so a stale lock
file is simply taken over. The lock file is never removed: removing it would
let a second writer lock a new file while the first still holds the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from virt_balloon_stats.advice import Point, merge
from virt_balloon_stats.errors import HistoryError, InvalidArgument

__all__ = [
    "DEFAULT_PATH", "SCHEMA_VERSION", "Tier", "TIERS", "RETENTION_SECONDS", "PASS_EVERY_SECONDS",
    "PASS_SPAN_SECONDS", "RecordedDomain", "History",
]

DEFAULT_PATH = "/var/lib/virt-balloon-stats/history.sqlite"

#: ``PRAGMA user_version`` of the files this version writes; it refuses any newer.
SCHEMA_VERSION = 2

_HOUR = 3600
_DAY = 24 * _HOUR


class Tier(NamedTuple):
    """A resolution: points that start more than ``after_seconds`` ago are merged per bucket."""

    after_seconds: int
    bucket_seconds: int


#: Coarser and coarser with age; raw points (tier 0) are younger than the first.
TIERS: Tuple[Tier, ...] = (Tier(6 * _HOUR, 60), Tier(_DAY, 300))

#: Points that start longer ago than this are deleted; the advice's window is 8 days.
RETENTION_SECONDS = 8 * _DAY

#: Downsampling runs at most this often (clock seconds), after a record.
PASS_EVERY_SECONDS = 60

#: A pass merges at most this much history per tier, so it stays short after a long stop.
PASS_SPAN_SECONDS = 15 * 60

#: SQLite's integers are signed 64-bit; a guest's figure beyond that cannot be stored.
_MAX_INT = 2**63 - 1

_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = (
    "CREATE TABLE domain (id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, name TEXT NOT NULL)",
    # Integers only (times in ms, zeros stored in no bytes), one B-tree keyed by
    # domain then start: one domain's window is one range scan.
    """CREATE TABLE point (
        domain_id INTEGER NOT NULL,
        start_ms INTEGER NOT NULL,
        tier INTEGER NOT NULL,
        seconds_ms INTEGER NOT NULL,
        ok_ms INTEGER NOT NULL,
        used_peak INTEGER,
        actual INTEGER,
        swap_in INTEGER NOT NULL,
        major_faults INTEGER NOT NULL,
        oom_kills INTEGER NOT NULL,
        alloc_stalls INTEGER NOT NULL,
        direct_reclaims INTEGER NOT NULL,
        PRIMARY KEY (domain_id, start_ms)
    ) WITHOUT ROWID""",
    # Per tier, where the last pass stopped: the next one starts there.
    "CREATE TABLE downsampled (tier INTEGER PRIMARY KEY, until_ms INTEGER NOT NULL)",
)

#: What each schema version adds to the one before: a writer or a stepper
#: brings an older file up to date, in the transaction that checks its version.
_MIGRATIONS: Dict[int, Tuple[str, ...]] = {
    # 2: what the balloon stepper remembers of each guest (stepping.memory_to_dict, as JSON).
    2: ("CREATE TABLE step (domain_id INTEGER PRIMARY KEY, state TEXT NOT NULL,"
        " updated_ms INTEGER NOT NULL)",),
}

_FIGURES = (
    "seconds_ms, ok_ms, used_peak, actual, swap_in, major_faults, oom_kills, alloc_stalls, direct_reclaims"
)
_COLUMNS = f"domain_id, start_ms, tier, {_FIGURES}"

#: A Point's fields in the order of its constructor; SQLite divides exactly as Python does.
_AS_POINT = (
    "start_ms / 1000.0, seconds_ms / 1000.0, ok_ms / 1000.0, used_peak, actual,"
    " swap_in, major_faults, oom_kills, alloc_stalls, direct_reclaims"
)

# ``IN (SELECT id FROM domain)`` lets SQLite range-scan the key once per domain.
_EVERY_DOMAIN = "domain_id IN (SELECT id FROM domain)"

#: One domain's points in ``[since, until)``, oldest first, each handed to ``vbs_point``; returns their count.
_READ_POINTS = (
    f"SELECT count(vbs_point({_AS_POINT})) FROM (SELECT start_ms, {_FIGURES} FROM point"
    " WHERE domain_id = (SELECT id FROM domain WHERE uuid = ?) AND start_ms >= ? AND start_ms < ?"
    " ORDER BY start_ms)"
)


class RecordedDomain(NamedTuple):
    """A domain the history has points of, under the last name it was recorded with."""

    uuid: str
    name: str


def _ms(seconds: float) -> int:
    return round(seconds * 1000)  # exact back and forth for any time on the millisecond


def _row(domain_id: int, tier: int, point: Point) -> Tuple[Optional[int], ...]:
    return (
        domain_id, _ms(point.start), tier, _ms(point.seconds), _ms(point.ok_seconds), point.used_peak,
        point.actual, point.swap_in, point.major_faults, point.oom_kills, point.alloc_stalls,
        point.direct_reclaims,
    )


def _check(name: str, point: Point) -> None:
    """Refuse what SQLite cannot hold (a guest's figures are its own), or a length of under 1 ms.

    A :class:`Point` checks the rest itself: lengths, ok seconds, signs.
    """
    figures = (point.used_peak, point.actual, point.swap_in, point.major_faults, point.oom_kills,
               point.alloc_stalls, point.direct_reclaims)
    if _ms(point.seconds) <= 0 or abs(_ms(point.start)) > _MAX_INT or any(
        v is not None and v > _MAX_INT for v in figures
    ):
        raise InvalidArgument(f"the history cannot hold this point (over 2^63-1, or under 1 ms): {point!r}",
                              domain=name)


@contextlib.contextmanager
def _sqlite_errors(path: str, doing: str, hint: str = "") -> Iterator[None]:
    """``sqlite3.Error`` never leaves this module: it becomes a :class:`HistoryError` naming the file."""
    try:
        yield
    except sqlite3.Error as err:
        raise HistoryError(f"{path}: cannot {doing} the history: {err}{hint}", path=path) from err


def _reader_hint(path: str) -> str:
    """What SQLite does not say: with no writer running, a reader creates ``PATH-shm`` beside the file."""
    if os.path.exists(path + "-shm") or os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return ""
    return " (no writer runs, and reading then needs write access to the folder, for SQLite's -shm file)"


def _refuse_foreign(path: str) -> None:
    """Refuse a file that is not SQLite before SQLite opens it, so nothing is written to it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as err:
        raise HistoryError(f"{path}: cannot read the history file: {err.strerror}", path=path) from err
    if head and head != _SQLITE_MAGIC:
        raise HistoryError(
            f"{path}: not a SQLite database, so not a history file; nothing was written to it: "
            "give another --history file",
            path=path,
        )


def _create(path: str) -> None:
    """Create the file 0640 if missing: SQLite gives its -wal and -shm the file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
    except FileExistsError:
        pass
    except OSError as err:
        raise HistoryError(f"{path}: cannot create the history file: {err.strerror}", path=path) from err


def _own_command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "unknown"


def _lock(path: str, suffix: str = ".lock", does: str = "writes this history", role: str = "writer") -> int:
    """Take the writer's lock (or the stepper's), or say who holds it; return the lock file's descriptor."""
    lock_path = path + suffix
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as err:
        raise HistoryError(f"{lock_path}: cannot open the {role}'s lock: {err.strerror}", path=path) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            os.close(fd)
            raise HistoryError(f"{lock_path}: cannot lock: {err.strerror}", path=path) from err
        # The holder writes its pid just after locking: between the two, it is "a process".
        pid_line, _, command = os.pread(fd, 4096, 0).decode(errors="replace").partition("\n")
        os.close(fd)
        pid = int(pid_line) if pid_line.isdigit() else None
        who = f"pid {pid} ({command.strip()[:200] or 'command unknown'})" if pid else "a process"
        raise HistoryError(
            f"{path}: {who} already {does} (lock {lock_path}); only one {role} at a time: "
            "stop it, or give this one another --history file",
            path=path,
            holder_pid=pid,
        ) from err
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{_own_command_line()}\n".encode(), 0)
    return fd


class History:
    """One history file, open as its writer or as a reader (see the module's docstring).

    Open it with :meth:`open`. Thread-safe: calls are serialized.
    """

    def __init__(self, db: sqlite3.Connection, path: str, *, lock_fd: Optional[int], retention: float,
                 clock: Callable[[], float]) -> None:
        self.path = path
        self._db = db
        self._writer = lock_fd is not None
        self._lock_fd = lock_fd
        self._retention_ms = _ms(retention)
        self._clock = clock
        self._mutex = threading.Lock()
        self._ids: Dict[str, Tuple[int, str]] = {}
        self._last_pass: Optional[float] = None
        self._step_fd: Optional[int] = None

    @classmethod
    def open(
        cls,
        path: str = DEFAULT_PATH,
        *,
        writer: bool,
        stepper: bool = False,
        retention: float = RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> History:
        """Open the history at ``path``; a writer creates it (and its folder, mode 0750) if missing.

        :param writer: One process at a time may write; readers (``advise``)
            open the file read-only and neither wait for the writer nor hold it up.
        :param stepper: Open it to keep the balloon steps' memory as well
            (:meth:`save_step`): one stepper at a time, holding ``PATH.balloon.lock``,
            beside the writer if there is one (SQLite orders their short
            transactions); a stepper that is not the writer records no points.
        :param retention: Seconds of history the writer keeps.
        :param clock: The writer's "now", for downsampling and retention (tests pass their own).
        :raise HistoryError: When the file is not a history (nothing is
            written to it then), was written by a newer schema, is held by
            another writer, or cannot be opened; and, for a reader, when it
            does not exist.
        :raise InvalidArgument: When ``retention`` is not positive.
        """
        if not retention > 0:
            raise InvalidArgument(f"the history's retention must be over 0 s, not {retention!r}")
        _refuse_foreign(path)
        lock_fd = step_fd = None
        if writer:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            except OSError as err:
                raise HistoryError(f"{path}: cannot create its folder: {err.strerror}", path=path) from err
            lock_fd = _lock(path)
        elif not os.path.exists(path):
            raise HistoryError(
                f"{path}: no history here yet: 'record' writes it (see --history)", path=path
            )
        try:
            if stepper:
                step_fd = _lock(path, ".balloon.lock", "steps this history's guests", "stepper")
            if writer:
                _create(path)
            db = cls._connect(path, writer or stepper)
        except BaseException:
            for fd in (lock_fd, step_fd):
                if fd is not None:
                    os.close(fd)
            raise
        history = cls(db, path, lock_fd=lock_fd, retention=retention, clock=clock)
        history._step_fd = step_fd
        return history

    @staticmethod
    def _connect(path: str, writer: bool) -> sqlite3.Connection:
        with _sqlite_errors(path, "open"):
            if writer:
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            else:
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            with _sqlite_errors(path, "open", "" if writer else _reader_hint(path)):
                db.execute("PRAGMA busy_timeout = 5000")
                # Read before anything is written: a newer or foreign file stays as it was.
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise HistoryError(
                        f"{path}: written by a newer virt-balloon-stats (history schema {version}; this one "
                        f"reads up to {SCHEMA_VERSION}): upgrade, or give another --history file",
                        path=path,
                        schema_version=version,
                    )
                if version == 0 and tables:
                    raise HistoryError(
                        f"{path}: a SQLite database, but not a history file; nothing was written to it: "
                        "give another --history file",
                        path=path,
                        schema_version=0,
                    )
                if version == 0 and not writer:
                    raise HistoryError(f"{path}: no history in it yet", path=path, schema_version=0)
                if writer:
                    History._prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        """WAL, and the schema on a new file, created with its version in one transaction."""
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"WAL mode is not available here (journal mode {mode})")
        # A commit is durable against a killed process without an fsync; a checkpoint fsyncs.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA journal_size_limit = 8388608")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA:
                    db.execute(statement)
                version = 1
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- reading -----------------------------------------------------------------------------

    def domains(self) -> List[RecordedDomain]:
        """Every domain with points, by name."""
        with self._mutex, _sqlite_errors(self.path, "read"):
            rows = self._db.execute("SELECT uuid, name FROM domain ORDER BY name, uuid").fetchall()
        return [RecordedDomain(uuid, name) for uuid, name in rows]

    def points(self, uuid: str, since: float, until: float) -> List[Point]:
        """One domain's points that start in ``[since, until)``, oldest first; none for an unknown UUID.

        ``advise --all`` reads 100 domains' 8 days, 743,000 rows, within its
        2 s. Fetched as rows, that took 0.85 s: Python's sqlite3 (3.11) lets
        go of the GIL around every column of every row, 7.4 million times.
        Instead SQLite hands each row to a function of ours, one call per
        row, which builds the point there, trusting the figures: they were
        checked when recorded (see ``Point._collector``). The query returns
        only their count. Reading 100 domains so takes 0.3 s in SQLite and
        the calls, and 0.5 s building the points.
        """
        points: List[Point] = []
        with self._mutex, _sqlite_errors(self.path, "read"):
            self._db.create_function("vbs_point", 10, Point._collector(points))
            self._db.execute(_READ_POINTS, (uuid, _ms(since), _ms(until))).fetchall()
        return points

    def steps(self) -> Dict[str, str]:
        """The balloon steps' memory of every guest that has one, by UUID (the stepper's JSON text).

        None in a file of schema 1, which no stepper has opened yet.
        """
        with self._mutex, _sqlite_errors(self.path, "read"):
            if not self._db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'step'").fetchone()[0]:
                return {}
            rows = self._db.execute(
                "SELECT domain.uuid, step.state FROM step JOIN domain ON domain.id = step.domain_id"
            ).fetchall()
        return {uuid: state for uuid, state in rows}

    def save_step(self, uuid: str, state: str) -> bool:
        """Keep one guest's step memory (JSON text), in a transaction of its own.

        Only for a guest the history has points of: a guest without history
        has no advice, so nothing to step. Returns whether it was kept.

        :raise HistoryError: When the history was not opened as its stepper, or the write fails.
        """
        if self._step_fd is None:
            raise HistoryError(f"{self.path}: not opened to step; only its stepper keeps steps",
                               path=self.path)
        with self._mutex:
            with self._transaction():
                cursor = self._db.execute(
                    "INSERT OR REPLACE INTO step (domain_id, state, updated_ms)"
                    " SELECT id, ?, ? FROM domain WHERE uuid = ?",
                    (state, _ms(self._clock()), uuid),
                )
        return cursor.rowcount == 1

    # -- writing -----------------------------------------------------------------------------

    def record(self, uuid: str, name: str, point: Point) -> None:
        """Append one domain's interval (a gap: ``ok_seconds`` 0): :meth:`record_many` of one.

        :raise InvalidArgument: When the point's figures cannot be stored.
        :raise HistoryError: When the history was opened read-only, or a write
            fails (when the pass fails, the point is stored already).
        """
        self.record_many([(uuid, name, point)])

    def record_many(self, points: Sequence[Tuple[str, str, Point]]) -> None:
        """Append a cycle's intervals, one per domain (UUID, name, point), in one transaction.

        A transaction per point cost the exporter more than half of what
        recording a cycle of 30 domains costs. Then, at most once a minute
        of the clock, downsample and drop what is past the retention, in
        another transaction. A point with the same start as one already
        there (the clock stepped back) replaces it.

        :raise InvalidArgument: For a point whose figures cannot be stored,
            once the others are (nothing else is lost with it).
        :raise HistoryError: When the history was opened read-only, or a write
            fails (when the pass fails, the points are stored already).
        """
        if not self._writer:
            raise HistoryError(f"{self.path}: opened to read; only its writer records", path=self.path)
        good: List[Tuple[str, str, Point]] = []
        refused: List[InvalidArgument] = []
        for uuid, name, point in points:
            try:
                _check(name, point)
            except InvalidArgument as err:
                refused.append(err)
                continue
            good.append((uuid, name, point))
        with self._mutex:
            ids: Dict[str, Tuple[int, str]] = {}
            with self._transaction():
                for uuid, name, point in good:
                    known = ids.get(uuid) or self._ids.get(uuid)
                    if known is None or known[1] != name:
                        known = (self._domain_id(uuid, name), name)
                    self._db.execute(
                        f"INSERT OR REPLACE INTO point ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                        _row(known[0], 0, point),
                    )
                    ids[uuid] = known
            self._ids.update(ids)  # committed
            now = self._clock()
            if self._last_pass is None or not 0 <= now - self._last_pass < PASS_EVERY_SECONDS:
                self._last_pass = now
                with self._transaction():
                    self._downsample(_ms(now))
                self._ids.clear()  # domains without points left are gone
        if refused:
            raise refused[0]

    def _domain_id(self, uuid: str, name: str) -> int:
        found = self._db.execute("SELECT id, name FROM domain WHERE uuid = ?", (uuid,)).fetchone()
        if found is None:
            cursor = self._db.execute("INSERT INTO domain (uuid, name) VALUES (?, ?)", (uuid, name))
            return int(cursor.lastrowid or 0)
        if found[1] != name:
            self._db.execute("UPDATE domain SET name = ? WHERE id = ?", (name, found[0]))
        return int(found[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with _sqlite_errors(self.path, "write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _downsample(self, now_ms: int) -> None:
        for tier, spec in enumerate(TIERS, start=1):
            self._merge_tier(tier, spec, now_ms)
        self._db.execute(f"DELETE FROM point WHERE {_EVERY_DOMAIN} AND start_ms < ?",
                         (now_ms - self._retention_ms,))
        self._db.execute("DELETE FROM domain WHERE NOT EXISTS (SELECT 1 FROM point WHERE domain_id = id)")
        self._db.execute("DELETE FROM step WHERE domain_id NOT IN (SELECT id FROM domain)")

    def _merge_tier(self, tier: int, spec: Tier, now_ms: int) -> None:
        """Merge the finer points that start before this tier's cutoff, by whole bucket.

        The cutoff is a bucket boundary, so a bucket is merged once, complete.
        A pass starts where the last one stopped (a point recorded later with
        an older start keeps its resolution until retention drops it) and
        covers at most :data:`PASS_SPAN_SECONDS`, from the oldest point to merge.
        """
        size = spec.bucket_seconds * 1000
        done = self._db.execute("SELECT until_ms FROM downsampled WHERE tier = ?", (tier,)).fetchone()
        low = done[0] if done else 0
        high = (now_ms - spec.after_seconds * 1000) // size * size
        if high <= low:
            return
        if high - low > PASS_SPAN_SECONDS * 1000:
            oldest = self._db.execute(
                f"SELECT min(start_ms) FROM point WHERE {_EVERY_DOMAIN} AND start_ms >= ? AND tier < ?",
                (low, tier),
            ).fetchone()[0]
            if oldest is not None and oldest < high:
                low = max(low, oldest // size * size)
                high = min(high, low + PASS_SPAN_SECONDS * 1000 // size * size)
            else:
                low = high
        rows = self._db.execute(
            f"SELECT domain_id, start_ms / {size}, {_AS_POINT} FROM point"
            f" WHERE {_EVERY_DOMAIN} AND start_ms >= ? AND start_ms < ? AND tier < ?"
            " ORDER BY domain_id, start_ms",
            (low, high, tier),
        ).fetchall()
        gone: List[Tuple[int, int]] = []
        merged: List[Tuple[Optional[int], ...]] = []
        for (domain_id, _), bucket in itertools.groupby(rows, key=lambda row: (row[0], row[1])):
            points = [Point(*row[2:]) for row in bucket]
            gone.extend((domain_id, _ms(p.start)) for p in points)
            merged.append(_row(domain_id, tier, merge(points)))
        self._db.executemany("DELETE FROM point WHERE domain_id = ? AND start_ms = ?", gone)
        self._db.executemany(f"INSERT OR REPLACE INTO point ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                             merged)
        self._db.execute("INSERT OR REPLACE INTO downsampled (tier, until_ms) VALUES (?, ?)", (tier, high))

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file and, for the writer, release the lock. Closing twice is harmless."""
        with self._mutex:
            self._db.close()
            for fd in (self._lock_fd, self._step_fd):
                if fd is not None:
                    os.close(fd)
            self._lock_fd = self._step_fd = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

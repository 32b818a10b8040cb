"""The history file's size and read time at full scale: 100 domains, 8 days at a 5 s interval.

Run with ``python tests/bench/history_size.py [--json PATH]`` where the
package is installed (``tox -e bench`` does it); no testbed, no root. Every
point goes through ``History.record``, as the exporter writes them, with a
synthetic clock, so downsampling and retention run as they would over 8
days. The unit tests
call :func:`fill` with a scaled-down history (``tests/unit/test_history.py``,
``test_size_of_8_days_of_100_domains``).

Besides reading, it times ``advise --all`` without libvirt: every domain's
window read and advised, in turn. Filling takes some 12 minutes; ``--reuse
PATH`` times the reads and the advice on a history kept by ``--keep PATH``.

The synthetic guests use between 200 MiB and 4 GiB and hold 4 to 8 GiB: the
figures take the bytes real ones take. About one interval in 50 is a gap;
swap-in and major faults show now and then; the 6.12 counters mostly stay 0,
as on a healthy guest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from virt_balloon_stats.advice import Limits, Point, Policy, advise
from virt_balloon_stats.history import RETENTION_SECONDS, History

MiB = 2**20
GiB = 2**30
HOUR = 3600
DAY = 24 * HOUR

#: Epoch seconds at which the synthetic history ends (on a 5-minute boundary).
END = 1_800_000_000

#: The full-scale history: 8 days at a 5 s interval.
FULL: Tuple[Tuple[int, int], ...] = ((RETENTION_SECONDS, 5),)


def uuid_of(domain: int) -> str:
    return f"00000000-0000-4000-8000-{domain:012d}"


def synthetic(rng: random.Random, start: float, seconds: float) -> Point:
    """One interval of a synthetic guest: a gap now and then, pressure seldom."""
    actual = rng.choice((4, 6, 8)) * 1024 * MiB
    if rng.random() < 0.02:
        return Point(start, seconds, 0.0, None, actual)
    return Point(
        start,
        seconds,
        seconds,
        rng.randrange(200 * MiB, 4096 * MiB),
        actual,
        swap_in=4096 * rng.randrange(1, 256) if rng.random() < 0.05 else 0,
        major_faults=rng.randrange(1, 50) if rng.random() < 0.2 else 0,
        oom_kills=1 if rng.random() < 0.0001 else 0,
        alloc_stalls=rng.randrange(1, 10) if rng.random() < 0.001 else 0,
        direct_reclaims=4096 * rng.randrange(1, 1000) if rng.random() < 0.001 else 0,
    )


def fill(path: str, domains: int, segments: Sequence[Tuple[int, int]] = FULL, end: int = END,
         ids: Optional[Sequence[Tuple[str, str]]] = None) -> int:
    """Write a synthetic history through the real recording code; return the points recorded.

    :param segments: ``(seconds before end, interval)`` pairs, oldest first:
        from each such moment on, every domain records one point per
        interval, as a collector cycle does, until the next segment or ``end``.
        A coarse interval for what will be downsampled anyway gives the same
        file as 5 s, faster.
    :param ids: ``(uuid, name)`` of each domain, for real ones (the bench's);
        else :func:`uuid_of` and a synthetic name.
    """
    names = list(ids) if ids is not None else [
        (uuid_of(domain), f"vbs-synthetic-{domain:03d}") for domain in range(domains)
    ]
    rngs = [random.Random(domain) for domain in range(len(names))]
    now = [float(end - segments[0][0])]
    recorded = 0
    with History.open(path, writer=True, clock=lambda: now[0]) as history:
        for number, (before, interval) in enumerate(segments):
            until = end - segments[number + 1][0] if number + 1 < len(segments) else end
            for start in range(end - before, until, interval):
                now[0] = start + interval
                for (uuid, name), rng in zip(names, rngs):
                    history.record(uuid, name, synthetic(rng, start, interval))
                    recorded += 1
    return recorded


def size_of(path: str) -> int:
    """The bytes on disk of the history: the file and, if any, its WAL."""
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def examine(path: str) -> Dict[str, Any]:
    """A full history's size, and how long reading it takes: one domain's 8 days, every domain's, and advised.

    The advice is ``advise --all``'s without libvirt, in its order: a
    domain's window read, then advised, then the next domain. Every guest
    is given the synthetic guests' largest size, 8 GiB, for its balloon and
    ``<memory>``; the policy is the default one, ``now`` the history's end.
    """
    policy = Policy()
    limits = Limits(actual=8 * GiB, maximum=8 * GiB, min_guarantee=None)
    with History.open(path, writer=False) as history:
        domains = len(history.domains())
        began = time.perf_counter()
        one = history.points(uuid_of(0), END - RETENTION_SECONDS, END)
        one_seconds = time.perf_counter() - began
        began = time.perf_counter()
        rows = sum(len(history.points(d.uuid, END - RETENTION_SECONDS, END)) for d in history.domains())
        all_seconds = time.perf_counter() - began
        began = time.perf_counter()
        for domain in history.domains():
            advise(history.points(domain.uuid, END - policy.window_seconds, END), limits, policy, END)
        advise_seconds = time.perf_counter() - began
    size = size_of(path)
    return {
        "domains": domains,
        "rows": rows,
        "rows_per_domain": len(one),
        "bytes": size,
        "bytes_per_row": round(size / rows, 1),
        "bytes_per_domain_day": round(size / domains / (RETENTION_SECONDS / DAY)),
        "read_one_domain_seconds": round(one_seconds, 4),
        "read_all_domains_seconds": round(all_seconds, 3),
        "advise_all_domains_seconds": round(advise_seconds, 3),
    }


def measure(domains: int = 100, segments: Sequence[Tuple[int, int]] = FULL, path: Optional[str] = None
            ) -> Dict[str, Any]:
    """Fill a history at full scale and report its size, and how long reading it and advising from it take."""
    with tempfile.TemporaryDirectory(prefix="vbs-history-") as folder:
        path = path or os.path.join(folder, "history.sqlite")
        began = time.perf_counter()
        recorded = fill(path, domains, segments)
        fill_seconds = time.perf_counter() - began
        return {
            "domains": domains,
            "segments": [list(s) for s in segments],
            "recorded": recorded,
            "record_us": round(fill_seconds / recorded * 1e6, 1),
            **examine(path),
        }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=100, help="N: domains (100)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    history = parser.add_mutually_exclusive_group()
    history.add_argument("--keep", metavar="PATH", help="write the history there, and keep it")
    history.add_argument("--reuse", metavar="PATH",
                         help="fill nothing: measure the history --keep PATH kept (--domains does not apply)")
    args = parser.parse_args(argv)
    if args.reuse:
        report = {"reused": args.reuse, **examine(args.reuse)}
    else:
        report = measure(args.domains, path=args.keep)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["bytes"] < 100 * 10**6 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reclaim advice: ``advise``.

It reads the history file (read-only: the writer never waits for it) and,
for each domain, libvirt's XML; the advice itself is
:mod:`~virt_balloon_stats.advising`'s and :mod:`~virt_balloon_stats.advice`'s.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from typing import Dict, List

from virt_balloon_stats.advice import Policy
from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FORMATS,
    HISTORY_PATH,
    AddCommand,
    Run,
    UsageError,
    add_domains,
    add_history,
)
from virt_balloon_stats.errors import BalloonStatsError, HistoryError

__all__ = ["add_parsers", "cmd_advise", "duration", "spell_duration"]

#: Seconds per unit of a duration.
_UNITS: Dict[str, int] = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def duration(text: str) -> float:
    """``8d``, ``36h``, ``90m``, ``300s`` or plain seconds (``1.5h`` too) -> seconds, more than 0.

    :raise argparse.ArgumentTypeError: For anything else, 0, or a length past a float's range.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([dhms]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text[:40]!r}; give a number with d, h, m or s (8d, 36h, 90m, 300s) or seconds"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"a duration must be more than 0 and finite, not {text[:40]!r}")
    return seconds


def spell_duration(seconds: float) -> str:
    """Seconds in the largest unit that divides them: ``691200`` -> ``8d``; what :func:`duration` reads."""
    for unit, size in _UNITS.items():
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def cmd_advise(run: Run) -> int:
    """How much memory each domain could give back, judged from its history."""
    from virt_balloon_stats.advising import (
        DomainAdvice,
        advise_guest,
        render_advice_json,
        render_advice_prometheus,
        render_advice_table,
    )
    from virt_balloon_stats.history import History

    args = run.args
    if args.min_history > args.window:
        raise UsageError(
            f"--min-history {spell_duration(args.min_history)} is longer than --window "
            f"{spell_duration(args.window)}: no domain could ever have enough history"
        )
    policy = Policy(window_seconds=args.window, min_history_seconds=args.min_history)
    advices: List[DomainAdvice] = []
    answered: List[str] = []
    with History.open(args.history or HISTORY_PATH, writer=False) as history:
        now = time.time()
        for client in run.clients():
            answered.append(client.host.uri)
            for guest in run.guests(client):
                try:
                    advices.append(advise_guest(guest, client.host.uri, history.points, policy, now))
                except HistoryError:
                    raise  # every domain's failure, not this one's: one line, from main
                except BalloonStatsError as err:
                    run.report(guest.name, client.host.uri, err)
    if args.format == "json":
        run.write(render_advice_json(advices))
    elif args.format == "prometheus":
        run.write(render_advice_prometheus(advices, answered))
    else:
        run.write(render_advice_table(advices, answered, show_uri=run.several_hosts))
    return EXIT_FAILED if run.failed else EXIT_OK


def add_parsers(command: AddCommand) -> None:
    """``advise``, with its options."""
    defaults = Policy()
    p = command(
        "advise",
        cmd_advise,
        "how much memory each guest could give back",
        "Judge each domain from its history (the file 'record' writes): demand is the p95 of its daily "
        "peaks of used memory over a decaying window, raised after pressure (swap-in or major-fault "
        "bursts, OOM kills, allocation stalls, direct reclaims); recommended is demand plus a margin "
        "(15 %, at least 64 MiB), widened while the history is short, never below <min_guarantee> or "
        "128 MiB, never above <memory>; reclaimable is the balloon size above it. A domain with less "
        "usable history than --min-history gets 'insufficient history'. The table ends with what each "
        "host could take back. The history file is only read: its writer never waits for it.",
        examples=(
            "advise --all",
            "advise --all --format json --history /srv/vbs/history.sqlite",
            "advise --window 2d --min-history 12h web1 db1",
        ),
        formats=FORMATS,
    )
    add_domains(p)
    add_history(p)
    p.add_argument(
        "--window",
        type=duration,
        default=defaults.window_seconds,
        metavar="D",
        help=f"how far back the history counts, e.g. 8d, 36h, 90m, 300s (default: "
        f"{spell_duration(defaults.window_seconds)})",
    )
    p.add_argument(
        "--min-history",
        type=duration,
        default=defaults.min_history_seconds,
        metavar="D",
        help="usable history needed before advising at all (default: "
        f"{spell_duration(defaults.min_history_seconds)})",
    )

"""Reclaim advice: ``advise``.

It reads each domain's history, from the history file (read-only: the
writer never waits for it) or from Prometheus (``--prometheus URL``), and
libvirt's XML for each domain; the advice itself is
:mod:`~virt_balloon_stats.advising`'s and :mod:`~virt_balloon_stats.advice`'s.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Iterator, List

from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    NEEDS_READ_WRITE,
    FORMATS,
    HISTORY_PATH,
    AddCommand,
    Run,
    UsageError,
    add_domains,
    add_history,
    add_policy,
    add_source,
    add_stepping,
    add_timeout,
    ballooner_of,
    policy_of,
    tell,
)
from virt_balloon_stats.errors import BalloonStatsError, HistoryError

if TYPE_CHECKING:
    from virt_balloon_stats.advising import PointSource

__all__ = ["add_parsers", "cmd_advise"]


@contextlib.contextmanager
def _history_of(run: Run) -> Iterator["PointSource"]:
    """Where the points come from: Prometheus when asked, else the history file, read-only."""
    if run.args.prometheus:
        from virt_balloon_stats.promhistory import PrometheusHistory

        with PrometheusHistory(run.args.prometheus) as prometheus:
            yield prometheus.points
    else:
        from virt_balloon_stats.history import History

        with History.open(run.args.history or HISTORY_PATH, writer=False) as history:
            yield history.points


def _apply(run: Run) -> int:
    """``advise --apply``: one balloon step for each domain, toward its advice; a dry run without ``--yes``.

    One collector cycle gives every domain's figures (fresh or not), and
    :mod:`~virt_balloon_stats.ballooning` decides and acts; each domain's
    outcome is one line.
    """
    args = run.args
    if args.prometheus:
        raise UsageError(
            "--apply keeps each guest's steps in the history file; give --history, not --prometheus"
        )
    if args.format == "prometheus":
        raise UsageError("--apply prints one line per domain (or JSON lines); its counters go to --textfile")
    if args.yes and args.readonly:
        raise UsageError(NEEDS_READ_WRITE)
    collector = run.collector(timeout=args.timeout)
    try:
        with ballooner_of(run, collector) as ballooner:
            cycle = collector.collect()
            run.report_cycle(cycle)
            outcomes = ballooner.on_cycle(cycle)
            tell(run, ballooner, outcomes)
    finally:
        collector.stop()
    if not args.yes and any(o.target is not None for o in outcomes):
        run.err.write("dry run: nothing was changed; add --yes to make these calls\n")
    failed = any(o.error is not None and o.target is not None for o in outcomes)
    return EXIT_FAILED if run.failed or failed else EXIT_OK


def cmd_advise(run: Run) -> int:
    """How much memory each domain could give back, judged from its history."""
    if run.args.apply:
        return _apply(run)
    from virt_balloon_stats.advising import (
        DomainAdvice,
        advise_guest,
        render_advice_json,
        render_advice_prometheus,
        render_advice_table,
    )

    args = run.args
    policy = policy_of(args)
    advices: List[DomainAdvice] = []
    answered: List[str] = []
    with _history_of(run) as points:
        now = time.time()
        for client in run.clients():
            answered.append(client.host.uri)
            for guest in run.guests(client):
                try:
                    advices.append(advise_guest(guest, client.host.uri, points, policy, now))
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
        "host could take back. The history file is only read: its writer never waits for it. With "
        "--prometheus, the history is read from a Prometheus server that scrapes the exporter of each "
        "host, by PromQL over its series, one point a minute. With --apply, it takes one balloon step "
        "for each domain toward its advice, within the safety rules 'balloon' follows, and prints each "
        "domain's outcome; without --yes that is a dry run that prints the setMemoryFlags calls it would "
        "make and changes nothing.",
        examples=(
            "advise --all",
            "advise --all --format json --history /srv/vbs/history.sqlite",
            "advise --window 2d --min-history 12h web1 db1",
            "advise --all --prometheus http://prometheus.example:9090",
            "advise --all --apply",
            "advise --apply --yes --step 10% --max-total 2G web1 db1",
        ),
        formats=FORMATS,
    )
    add_domains(p)
    source = p.add_mutually_exclusive_group()
    add_history(source)
    source.add_argument(
        "--prometheus",
        metavar="URL",
        help="read the history from this Prometheus server (http://HOST:9090) instead of a history file",
    )
    add_policy(p)
    p.add_argument(
        "--apply", action="store_true",
        help="take one balloon step for each domain toward its advice (a dry run without --yes)",
    )
    add_stepping(p, long_running=False)
    # libvirt's figures, which a read-only connection gives, are enough for a step; the QMP's add
    # the counters of 6.12 guests (OOM kills, stalls) to the pressure feedback.
    add_source(p, default="libvirt")
    add_timeout(p)

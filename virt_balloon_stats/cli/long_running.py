"""The long-running commands: ``watch``, ``stream``, ``record``, ``exporter`` and ``balloon``.

Each drives a long-running collector: libvirt's events keep its caches, a
hung QEMU costs only its own row, line or metric, and a lost connection is
retried while the output says so. A failure is reported once, not every cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, List, Set, Tuple

from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    NEEDS_READ_WRITE,
    HISTORY_PATH,
    OWN_OUTPUT,
    AddCommand,
    Run,
    UsageError,
    add_domains,
    add_grace,
    add_history,
    add_policy,
    add_source,
    add_stepping,
    add_timeout,
    ballooner_of,
    duration,
    policy_of,
    positive,
    spell_duration,
    tell,
)
from virt_balloon_stats.errors import BalloonStatsError

if TYPE_CHECKING:
    from virt_balloon_stats.collector import Collector, Cycle
    from virt_balloon_stats.exporter import Exporter

__all__ = ["add_parsers", "cmd_watch", "cmd_stream", "cmd_record", "cmd_exporter", "cmd_balloon"]

#: The exporter's default port (kept in step with ``exporter.DEFAULT_PORT``,
#: which needs prometheus_client to import).
_EXPORTER_PORT = 9474

#: The exporter's default refresh of its advice (kept in step with
#: ``keeper.DEFAULT_ADVISE_EVERY_SECONDS``, which a unit test checks: the
#: parser does not import the advice for a help text).
_ADVISE_EVERY = 3600.0
#: ``balloon``'s (``ballooning.DEFAULT_ADVISE_EVERY_SECONDS``, checked likewise).
_BALLOON_ADVISE_EVERY = 600.0


def cmd_watch(run: Run) -> int:
    """Redraw a live view every ``--interval`` seconds until Ctrl-C.

    A long-running collector: libvirt's events keep its caches, a hung QEMU
    costs only its own row, and a lost connection is retried while its rows
    and the header say so.
    """
    from virt_balloon_stats.watch import Tracker, render_frame

    args = run.args
    tty = run.out.isatty()
    tracker = Tracker()
    collector = run.collector(events=True, timeout=args.timeout or args.interval)
    reported: Set[Tuple[str, str, str]] = set()
    frames: List[Cycle] = []

    def show(cycle: Cycle) -> None:
        run.report_cycle(cycle, reported)
        if not frames and not cycle.samples and (
            not any(h.up for h in cycle.hosts.values()) or (not args.all and cycle.problems)
        ):
            # Nothing to show: no host answers, or no named domain resolved.
            collector.request_stop()
            return
        for s in cycle.samples:
            tracker.update(s)
        frame = render_frame(
            cycle.samples, tracker, time.time(), show_uri=run.several_hosts, hosts=cycle.hosts.values()
        )
        if tty and not frames:
            run.out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide cursor
        frames.append(cycle)
        run.out.write(("\x1b[H\x1b[J" + frame + "\n") if tty else frame + "\n\n")
        run.out.flush()

    try:
        collector.run(args.interval, show, count=args.count)
    except KeyboardInterrupt:
        pass
    finally:
        if tty and frames:
            run.out.write("\x1b[?25h\x1b[?1049l")  # cursor back, leave the alternate screen
            run.out.flush()
        collector.stop()
    return EXIT_FAILED if run.failed or not frames else EXIT_OK


def cmd_balloon(run: Run) -> int:
    """Step the domains toward their advice every ``--interval``, until SIGTERM or Ctrl-C.

    Every pass is a dry run without ``--yes``. A step is printed every time,
    a domain's other outcomes when they change (a stopped QEMU once, not
    every interval). SIGTERM ends it after the pass in progress, so a step
    is never left half made.
    """
    from virt_balloon_stats.ballooning import News
    from virt_balloon_stats.errors import HistoryError

    args = run.args
    if args.yes and args.readonly:
        raise UsageError(NEEDS_READ_WRITE)
    collector = run.collector(events=True, timeout=args.timeout or args.interval, log_changes=True)
    reported: Set[Tuple[str, str, str]] = set()
    news = News()
    history_failed = [""]
    with ballooner_of(run, collector) as ballooner:

        def on_cycle(cycle: Cycle) -> None:
            run.report_cycle(cycle, reported)
            try:
                outcomes = ballooner.on_cycle(cycle)
            except HistoryError as err:  # nobody is stepped this pass; said once until it comes back
                if str(err) != history_failed[0]:
                    run.report("history", "", err)
                    history_failed[0] = str(err)
                return
            history_failed[0] = ""
            try:
                tell(run, ballooner, news(outcomes))
            except BalloonStatsError as err:  # the --textfile: the steps are made and kept already
                key = ("textfile", "", str(err))
                if key not in reported:
                    reported.add(key)
                    run.report("textfile", "", err)

        _run_until_stopped(collector, args.interval, args.count, on_cycle)
    return EXIT_OK


def _run_until_stopped(
    collector: "Collector", interval: float, count: int, on_cycle: Callable[["Cycle"], None]
) -> None:
    """Run cycles until ``count`` (0: no end), SIGTERM (after the current cycle) or Ctrl-C."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: collector.request_stop())
    try:
        collector.run(interval, on_cycle, count=count)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        collector.stop()


def cmd_stream(run: Run) -> int:
    """JSON Lines: one document per domain per cycle, until SIGTERM, Ctrl-C or a closed pipe."""
    from virt_balloon_stats.stream import JsonLines

    args = run.args
    collector = run.collector(events=True, timeout=args.timeout or args.interval, log_changes=True)
    lines = JsonLines(collector, run.out)
    reported: Set[Tuple[str, str, str]] = set()

    def on_cycle(cycle: Cycle) -> None:
        run.report_cycle(cycle, reported)
        lines(cycle)

    _run_until_stopped(collector, args.interval, args.count, on_cycle)
    if lines.closed:
        # The reader went away: that is how a pipe ends. Whatever is left in
        # stdout's buffer goes nowhere, so the exit does not fail on it.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), run.out.fileno())
        return EXIT_OK
    return EXIT_FAILED if run.failed and not lines.lines else EXIT_OK


def cmd_record(run: Run) -> int:
    """Keep each domain's figures in the history file, one point per cycle, until SIGTERM or Ctrl-C.

    The history is what ``advise`` reads; only one process writes a file at
    a time, and a second one is refused at once with the holder named.
    """
    from virt_balloon_stats.history import History
    from virt_balloon_stats.recorder import Recorder

    args = run.args
    with History.open(args.history or HISTORY_PATH, writer=True) as history:
        recorder = Recorder(history, args.interval)
        collector = run.collector(events=True, timeout=args.timeout or args.interval, log_changes=True)
        reported: Set[Tuple[str, str, str]] = set()

        def on_cycle(cycle: Cycle) -> None:
            run.report_cycle(cycle, reported)
            recorder.record(cycle)

        _run_until_stopped(collector, args.interval, args.count, on_cycle)
    return EXIT_FAILED if run.failed and not recorder.points else EXIT_OK


def cmd_exporter(run: Run) -> int:
    """Serve Prometheus metrics from a background collector until SIGTERM or Ctrl-C.

    With ``--history``, it also records every cycle in the history file and
    serves the advice made from it (:mod:`~virt_balloon_stats.keeper`).
    """
    from virt_balloon_stats import exporter as exporter_mod  # needs the 'exporter' extra

    args = run.args
    if args.hash_password:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise UsageError("give the password on stdin")
        run.write(exporter_mod.hash_password(password))
        return EXIT_OK
    config = exporter_mod.ExporterConfig(
        listen=args.listen,
        interval=args.interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        basic_auth_file=args.basic_auth_file,
    )
    policy = policy_of(args)  # a usage error before anything starts
    collector = run.collector(events=True, timeout=args.timeout or args.interval, log_changes=True)
    with contextlib.ExitStack() as keeping:
        keeper = None
        if args.history:
            from virt_balloon_stats.history import History
            from virt_balloon_stats.keeper import HistoryKeeper

            history = keeping.enter_context(History.open(args.history, writer=True))
            keeper = HistoryKeeper(collector, history, args.interval, policy, advise_every=args.advise_every)
        exporter = exporter_mod.Exporter(
            collector, config, on_cycle=keeper.on_cycle if keeper else None, extra=[keeper] if keeper else []
        )
        _serve(exporter)
    return EXIT_OK


def _serve(exporter: "Exporter") -> None:
    """Serve until SIGTERM or Ctrl-C; SIGHUP reloads the TLS files and the users."""
    import logging
    import signal

    done = threading.Event()

    log = logging.getLogger("virt_balloon_stats.cli")  # the command line's: the name its lines carry in logs

    def reload(_signum: int, _frame: object) -> None:
        try:
            exporter.reload()
            log.info("reloaded the TLS certificate and the basic-auth file")
        except BalloonStatsError as err:
            log.error("reload failed, keeping the old ones: %s", err)

    handlers = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda _signum, _frame: done.set()),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda _signum, _frame: done.set()),
        signal.SIGHUP: signal.signal(signal.SIGHUP, reload),
    }
    try:
        exporter.start()
        # Asleep until a signal's handler sets it: a signal interrupts the wait (Python >= 3.2 on POSIX).
        done.wait()
    finally:
        exporter.stop()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _add_cycles(parser: argparse.ArgumentParser) -> None:
    """``--interval``, ``--count`` and ``--timeout`` of the commands that run cycles until stopped."""
    parser.add_argument(
        "--interval", type=positive, default=10.0, metavar="S", help="seconds between cycles (default: 10)"
    )
    parser.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N cycles (default: never)"
    )
    add_timeout(parser, None)


def add_parsers(command: AddCommand) -> None:
    """``watch``, ``stream``, ``record``, ``exporter`` and ``balloon``, with their options."""
    p = command(
        "watch",
        cmd_watch,
        "live view with rates and trends",
        "Redraw a table every --interval seconds: free and available memory with a small "
        "trend, faults and swap per second. On a terminal it redraws in place (plain ANSI); "
        "otherwise it prints one block per interval. Ctrl-C quits.",
        examples=("watch --all", "watch --interval 5 web1 db1"),
        formats=OWN_OUTPUT,
        long_running=True,
    )
    add_domains(p)
    add_source(p, long_running=True)
    add_grace(p)
    add_timeout(p, None)
    p.add_argument(
        "--interval", type=positive, default=2.0, metavar="S", help="seconds between refreshes (default: 2)"
    )
    p.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N refreshes (default: until Ctrl-C)"
    )

    p = command(
        "stream",
        cmd_stream,
        "JSON Lines, one per domain per cycle",
        "Print one JSON document per domain (the one 'stats --format json' prints) per line, every "
        "--interval seconds, each line flushed. A long-running collector: domains come and go, a "
        "hung QEMU is one unresponsive line, a libvirtd restart makes unreachable lines until it "
        "answers again. SIGTERM ends it after the current line; a closed pipe ends it with status 0.",
        examples=("stream --all --interval 10", "stream --count 1 web1 | jq .status"),
        formats=OWN_OUTPUT,
        long_running=True,
    )
    add_domains(p)
    add_source(p, long_running=True)
    add_grace(p)
    _add_cycles(p)

    p = command(
        "record",
        cmd_record,
        "keep each domain's figures for 'advise'",
        "Collect every --interval seconds and keep each domain's figures in the history file, a "
        "SQLite file that 'advise' reads: figures only while they are ok, and stale, never-updated, "
        "unresponsive or paused intervals as gaps. Eight days are kept, older ones at a lower "
        "resolution. One process writes a file at a time. Without DOMAIN, every running domain. "
        "SIGTERM stops it; a SIGKILL loses at most the cycle being written.",
        examples=("record", "record --history /srv/vbs/history.sqlite --interval 5"),
        formats=OWN_OUTPUT,
        long_running=True,
    )
    add_domains(p, all_unless_named=True)
    add_source(p, long_running=True)
    add_grace(p)
    add_history(p)
    _add_cycles(p)

    p = command(
        "exporter",
        cmd_exporter,
        "Prometheus exporter",
        "Collect every --interval seconds in the background and serve the last cycle at /metrics; a "
        "scrape never waits on libvirt. Listens on loopback unless --listen says otherwise. Without "
        "DOMAIN, every running domain. SIGTERM stops it; SIGHUP re-reads the TLS certificate and "
        "the basic-auth file. With --history it also keeps each domain's history, as 'record' does, "
        "and serves the reclaim advice 'advise' would give (virt_balloon_recommended_bytes, "
        "virt_balloon_reclaimable_bytes, virt_balloon_advice_confidence), made again every "
        "--advise-every.",
        examples=(
            "exporter",
            "exporter --listen [::1]:9474 --interval 30",
            "exporter --listen 0.0.0.0:9474 --tls-cert cert.pem --tls-key key.pem --basic-auth-file users",
            "exporter --hash-password < password.txt",
            "exporter --history /srv/vbs/history.sqlite --advise-every 10m",
        ),
        formats=OWN_OUTPUT,
        long_running=True,
    )
    add_domains(p, all_unless_named=True)
    add_source(p, long_running=True)
    add_grace(p)
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{_EXPORTER_PORT}",
        metavar="HOST:PORT",
        help=f"address to serve on, [IPV6]:PORT for IPv6 (default: 127.0.0.1:{_EXPORTER_PORT})",
    )
    p.add_argument(
        "--interval", type=positive, default=15.0, metavar="S", help="seconds between cycles (default: 15)"
    )
    add_timeout(p, None)
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--basic-auth-file",
        metavar="PATH",
        help="require basic auth: USER:HASH lines, HASH from --hash-password (file mode 0600)",
    )
    p.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password on stdin, print its hash for --basic-auth-file, and exit",
    )
    add_history(p, optional=True)
    p.add_argument(
        "--advise-every",
        type=duration,
        default=_ADVISE_EVERY,
        metavar="D",
        help="with --history: how often the served advice is made again, e.g. 5m, 60s "
        f"(default: {spell_duration(_ADVISE_EVERY)})",
    )
    add_policy(p)

    p = command(
        "balloon",
        cmd_balloon,
        "step guests toward their advice, with pressure feedback",
        "Every --interval seconds, take one bounded balloon step for each domain toward the size "
        "'advise' recommends from the history file ('record' or 'exporter --history' writes it): at "
        "most --step of its size or --step-max, never below the advice's floor nor above its size when "
        "stepping began (or --max). Only domains with fresh figures, not paused, with no job (a "
        "migration) and whose last step has settled are stepped; no shrink on confidence under "
        "--min-confidence. After a shrink, pressure (swap-in or major-fault bursts, OOM kills, "
        "allocation stalls, direct reclaim, available memory under --pressure-available) gives the "
        "step back at once, raises that guest's floor and holds it for --cooldown. Each guest's steps "
        "are kept in the history file, so a restart resumes. Every pass is a dry run that prints the "
        "setMemoryFlags calls it would make unless --yes is given. SIGTERM stops it after the pass "
        "in progress.",
        examples=(
            "balloon --all",
            "balloon --all --yes --interval 60 --format json",
            "balloon --yes --target-host-available 4G --max-total 16G web1 db1",
        ),
        formats=("table", "json"),
        long_running=True,
    )
    add_domains(p, all_unless_named=True)
    add_source(p, long_running=True)
    add_grace(p)
    add_history(p)
    p.add_argument(
        "--interval", type=positive, default=60.0, metavar="S", help="seconds between passes (default: 60)"
    )
    p.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N passes (default: never)"
    )
    add_timeout(p, None)
    add_policy(p)
    p.add_argument(
        "--advise-every",
        type=duration,
        default=_BALLOON_ADVISE_EVERY,
        metavar="D",
        help="how long a domain's advice is used before it is made again from the history; pressure is "
        f"read every pass (default: {spell_duration(_BALLOON_ADVISE_EVERY)})",
    )
    add_stepping(p, long_running=True)

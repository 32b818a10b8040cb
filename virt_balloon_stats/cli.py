"""``virt-balloon-stats``: the command line, shaped like virsh.

Connection habits are virsh's (``-c URI``, ``LIBVIRT_DEFAULT_URI``, ``-r``),
domains are named as virsh names them (name, UUID or id), and ``-c`` may be
given more than once to cover several hosts in one run.

Errors are one line per failing domain on stderr, ``DOMAIN: what went wrong,
and what to do``; a traceback only with ``--debug``. Exit status: 0 when
every domain succeeded, 1 when some failed, 2 on a usage error, 130 when
interrupted; ``check`` uses the Nagios codes instead (0-3).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import re
import sys
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    TextIO,
    Tuple,
    cast,
)

from virt_balloon_stats import __version__
from virt_balloon_stats.client import DEFAULT_TIMEOUT, BalloonStats
from virt_balloon_stats.errors import BalloonStatsError, InvalidArgument
from virt_balloon_stats.formats import render_json, render_stats, render_table
from virt_balloon_stats.host import Guest, default_uri, silence_libvirt_stderr
from virt_balloon_stats.polling import ROUTES, PollingState, validate_interval
from virt_balloon_stats.sample import SOURCES, Sample
from virt_balloon_stats.stats import DEFAULT_GRACE_SECONDS, Status

if TYPE_CHECKING:  # imported where used: a one-domain reading needs no collector
    from virt_balloon_stats.collector import Collector, Cycle, Totals

__all__ = ["main", "build_parser"]


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Interval ``enable`` sets when none is given (what virt-manager uses).
DEFAULT_ENABLE_PERIOD = 5

_FORMATS = ("table", "json", "prometheus")

#: The exporter's default port (kept in step with ``exporter.DEFAULT_PORT``,
#: which needs prometheus_client to import).
_EXPORTER_PORT = 9474


class UsageError(Exception):
    """A command line that cannot be acted on; exit 2."""


@dataclasses.dataclass
class Run:
    """What one invocation needs: the parsed options and where to write."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    failed: bool = False
    first_error: str = ""
    hosts: Dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def uris(self) -> List[str]:
        return list(self.args.connect or [default_uri()])

    @property
    def several_hosts(self) -> bool:
        return len(self.uris) > 1

    def report(self, what: str, uri: str, error: BalloonStatsError) -> None:
        """One line on stderr for one failing domain (or host)."""
        self.failed = True
        where = f" ({uri})" if self.several_hosts else ""
        line = f"{what}{where}: {error}"
        self.first_error = self.first_error or line
        self.err.write(line + "\n")
        if self.args.debug:
            import traceback

            traceback.print_exception(type(error), error, error.__traceback__, file=self.err)

    def clients(self) -> Iterator[BalloonStats]:
        """Open each ``-c`` URI in turn; a host that fails is reported and skipped."""
        for uri in self.uris:
            try:
                client = BalloonStats.open(
                    uri, readonly=self.args.readonly, grace=getattr(self.args, "grace", DEFAULT_GRACE_SECONDS)
                )
            except BalloonStatsError as err:
                self.hosts[uri] = False
                self.report(uri, uri, err)
                continue
            self.hosts[uri] = True
            try:
                yield client
            finally:
                client.close()

    def guests(self, client: BalloonStats) -> List[Guest]:
        """The domains named on the command line, or every running one with ``--all``.

        Names that do not resolve are reported and left out; when none
        resolves the list is empty, and nothing is done.
        """
        if getattr(self.args, "all", False):
            try:
                return client.guests()
            except BalloonStatsError as err:
                self.report(client.host.uri, client.host.uri, err)
                return []
        found = []
        for spec in self.args.domains:
            try:
                found.append(client.guest(spec))
            except BalloonStatsError as err:
                self.report(spec, client.host.uri, err)
        return found

    def write(self, text: str) -> None:
        if text:
            self.out.write(text if text.endswith("\n") else text + "\n")


# -- subcommands ----------------------------------------------------------------


def _collector(
    run: Run, *, events: bool = False, timeout: Optional[float] = None, log_changes: bool = False
) -> Collector:
    """The collector over the command's URIs and domains (every running one with ``--all``)."""
    from virt_balloon_stats.collector import Collector

    args = run.args
    _log_to_stderr(args)
    return Collector(
        run.uris,
        domains=None if getattr(args, "all", False) else args.domains,
        source=getattr(args, "source", "both"),
        timeout=timeout or args.timeout,
        events=events,
        readonly=args.readonly,
        grace=getattr(args, "grace", DEFAULT_GRACE_SECONDS),
        log_changes=log_changes,
    )


def _log_to_stderr(args: argparse.Namespace) -> None:
    """Send the collector's log to stderr: the only part of the package that logs.

    The long-running commands log their state changes (one line each, not
    per cycle); the others only warnings, or everything with ``--debug``.
    """
    import logging

    service = args.command in ("exporter", "stream")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if service else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _report_cycle(run: Run, cycle: Cycle, reported: Optional[Set[Tuple[str, str, str]]] = None) -> None:
    """One stderr line per failure of the cycle; ``reported`` keeps a long run from repeating them."""
    for problem in cycle.problems:
        key = (problem.what, problem.uri, str(problem.error))
        if reported is None or key not in reported:
            run.report(problem.what, problem.uri, problem.error)
            if reported is not None:
                reported.add(key)
    for uri, state in cycle.hosts.items():
        run.hosts[uri] = state.up
    if reported is None:
        for s in cycle.samples:
            if s.error is not None:
                run.report(s.domain, s.uri, s.error)


def _one_cycle(run: Run) -> Tuple[Cycle, Totals]:
    """One collector cycle: every domain within ``--timeout``, the failures reported."""
    collector = _collector(run)
    try:
        cycle = collector.collect()
    finally:
        collector.stop()
    _report_cycle(run, cycle)
    return cycle, collector.totals


def _sample_all(run: Run) -> List[Sample]:
    """The samples of the command's domains, the failures reported."""
    args = run.args
    if len(run.uris) > 1 or getattr(args, "all", False) or len(args.domains) != 1:
        return list(_one_cycle(run)[0].samples)
    # One domain on one host: read as a script would, within the same
    # deadline; a collector's threads and bulk calls only pay off for several.
    samples: List[Sample] = []
    for client in run.clients():
        for guest in run.guests(client):
            source = getattr(args, "source", "both")
            sample = client.sample(guest, source, timeout=args.timeout or DEFAULT_TIMEOUT)
            if sample.error is not None:
                run.report(sample.domain, sample.uri, sample.error)
            samples.append(sample)
    return samples


def cmd_stats(run: Run) -> int:
    """Print every figure of the domains, with libvirt's beside it."""
    fmt = run.args.format
    if fmt == "prometheus" or run.args.textfile:
        from virt_balloon_stats import metrics  # needs the 'exporter' extra

        cycle, totals = _one_cycle(run)
        if run.args.textfile:
            metrics.write_textfile(run.args.textfile, cycle, totals)
        else:
            run.write(metrics.render(cycle, totals))
        return EXIT_FAILED if run.failed else EXIT_OK
    samples = _sample_all(run)
    if fmt == "json":
        run.write(render_json([s.to_dict() for s in samples]))
    else:
        run.write(render_stats(samples, raw_bytes=run.args.bytes, show_uri=run.several_hosts))
    return EXIT_FAILED if run.failed else EXIT_OK


def _period_targets(args: argparse.Namespace) -> Tuple[List[str], Optional[str]]:
    """``period DOM... [SECONDS]``: a trailing number after a domain is SECONDS."""
    words = list(args.words)
    seconds = args.set
    # Any number, even a bad one (-1, 1.5), is meant as SECONDS: it must be
    # refused as an interval, not looked up as a domain name.
    if seconds is None and len(words) > 1 and re.fullmatch(r"[-+]?[0-9]+(\.[0-9]*)?", words[-1]):
        seconds = words.pop()
    return words, seconds


def _polling_row(uri: str, guest: Guest, state: PollingState, via: Optional[str]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"uri": uri, "domain": guest.name, "uuid": guest.uuid}
    if via:
        row["via"] = via
    row.update(state.to_dict())
    return row


def _secs(value: Optional[int]) -> str:
    return "-" if value is None else f"{value} s"


def _set_or_show(run: Run, seconds: Optional[int]) -> int:
    args = run.args
    rows: List[Dict[str, Any]] = []
    for client in run.clients():
        for guest in run.guests(client):
            try:
                if seconds is None:
                    state = client.polling(guest)
                else:
                    live, config = args.live, args.config
                    if not live and not config:  # virsh's --current
                        live, config = guest.id is not None, guest.id is None
                    state = client.set_polling_interval(
                        guest, seconds, via=args.via, live=live, config=config
                    )
            except BalloonStatsError as err:
                run.report(guest.name, client.host.uri, err)
                continue
            rows.append(
                _polling_row(client.host.uri, guest, state, args.via if seconds is not None else None)
            )
    if args.format == "json":
        run.write(render_json(rows))
    elif rows:
        name = (lambda r: f"{r['domain']}@{r['uri']}") if run.several_hosts else (lambda r: r["domain"])
        if seconds is None:
            header: Tuple[str, ...] = ("DOMAIN", "QEMU INTERVAL", "LIBVIRT PERIOD", "DRIFT")
            table: List[Tuple[str, ...]] = [
                (
                    name(r),
                    _secs(r["polling_interval"]),
                    _secs(r["libvirt_period"]),
                    "yes" if r["drift"] else "no",
                )
                for r in rows
            ]
        else:
            header = ("DOMAIN", "VIA", "BEFORE", "QEMU NOW", "LIBVIRT PERIOD", "DRIFT")
            table = [
                (
                    name(r),
                    r["via"],
                    _secs(r["changed_from"]),
                    _secs(r["polling_interval"]),
                    _secs(r["libvirt_period"]),
                    "yes" if r["drift"] else "no",
                )
                for r in rows
            ]
        run.write(render_table(header, table))
        drifting = [r for r in rows if r["drift"]]
        for r in drifting:
            run.write(f"{name(r)}: {r['message']}")
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_period(run: Run) -> int:
    """Show, or set and read back, the polling interval."""
    domains, seconds = _period_targets(run.args)
    if not domains:
        raise UsageError("name at least one domain")
    run.args.domains = domains
    if seconds is None and (run.args.live or run.args.config):
        raise UsageError("--live and --config apply when setting; give SECONDS")
    return _set_or_show(run, None if seconds is None else validate_interval(seconds, via=run.args.via))


def cmd_enable(run: Run) -> int:
    """Turn polling on (default every 5 s)."""
    return _set_or_show(run, validate_interval(run.args.period, via=run.args.via))


def cmd_disable(run: Run) -> int:
    """Turn polling off (interval 0)."""
    return _set_or_show(run, 0)


def cmd_path(run: Run) -> int:
    """Show where each balloon lives in QOM and how it was found."""
    rows: List[Dict[str, Any]] = []
    for client in run.clients():
        for guest in run.guests(client):
            try:
                path = client.qom_path(guest)
            except BalloonStatsError as err:
                run.report(guest.name, client.host.uri, err)
                continue
            rows.append(
                {
                    "uri": client.host.uri,
                    "domain": guest.name,
                    "uuid": guest.uuid,
                    "qom_path": path.path,
                    "qom_type": path.qom_type,
                    "method": path.method,
                    "detail": path.detail,
                }
            )
    if run.args.format == "json":
        run.write(render_json(rows))
    elif rows:
        run.write(
            render_table(
                ("DOMAIN", "QOM PATH", "QOM TYPE", "FOUND BY"),
                [
                    (
                        r["domain"] + (f"@{r['uri']}" if run.several_hosts else ""),
                        r["qom_path"],
                        r["qom_type"],
                        r["method"],
                    )
                    for r in rows
                ],
            )
        )
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_check(run: Run) -> int:
    """Nagios / Icinga plugin: one status line, perfdata, exit 0-3."""
    from virt_balloon_stats.nagios import State, render_check  # each command imports its own

    samples = _sample_all(run)
    if run.failed and not samples:
        run.write(f"BALLOON UNKNOWN - no domain could be checked: {run.first_error}")
        return int(State.UNKNOWN)
    if not samples:
        run.write("BALLOON OK - no running domain")
        return int(State.OK)
    state, text = render_check(samples, run.args.max_age)
    if run.failed and state is State.OK:
        state = State.UNKNOWN
        text = text.replace("BALLOON OK -", f"BALLOON UNKNOWN - {run.first_error};", 1)
    run.write(text)
    return int(state)


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
    collector = _collector(run, events=True, timeout=args.timeout or args.interval)
    reported: Set[Tuple[str, str, str]] = set()
    frames: List[Cycle] = []

    def show(cycle: Cycle) -> None:
        _report_cycle(run, cycle, reported)
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


def cmd_stream(run: Run) -> int:
    """JSON Lines: one document per domain per cycle, until SIGTERM, Ctrl-C or a closed pipe."""
    import signal

    from virt_balloon_stats.stream import JsonLines

    args = run.args
    collector = _collector(run, events=True, timeout=args.timeout or args.interval, log_changes=True)
    lines = JsonLines(collector, run.out)
    reported: Set[Tuple[str, str, str]] = set()

    def on_cycle(cycle: Cycle) -> None:
        _report_cycle(run, cycle, reported)
        lines(cycle)

    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: collector.request_stop())
    try:
        collector.run(args.interval, on_cycle, count=args.count)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        collector.stop()
    if lines.closed:
        # The reader went away: that is how a pipe ends. Whatever is left in
        # stdout's buffer goes nowhere, so the exit does not fail on it.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), run.out.fileno())
        return EXIT_OK
    return EXIT_FAILED if run.failed and not lines.lines else EXIT_OK


def cmd_exporter(run: Run) -> int:
    """Serve Prometheus metrics from a background collector until SIGTERM or Ctrl-C."""
    import logging
    import signal

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
    collector = _collector(run, events=True, timeout=args.timeout or args.interval, log_changes=True)
    exporter = exporter_mod.Exporter(collector, config)
    done = threading.Event()

    def reload(_signum: int, _frame: object) -> None:
        try:
            exporter.reload()
            logging.getLogger(__name__).info("reloaded the TLS certificate and the basic-auth file")
        except BalloonStatsError as err:
            logging.getLogger(__name__).error("reload failed, keeping the old ones: %s", err)

    handlers = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda _signum, _frame: done.set()),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda _signum, _frame: done.set()),
        signal.SIGHUP: signal.signal(signal.SIGHUP, reload),
    }
    try:
        exporter.start()
        while not done.wait(1.0):
            pass
    finally:
        exporter.stop()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return EXIT_OK


def cmd_rearm(run: Run, sleep: Callable[[float], None] = time.sleep) -> int:
    """Re-arm the stats timer of stale domains, then show whether they answer again."""
    args = run.args
    results: List[Dict[str, Any]] = []
    for client in run.clients():
        before = client.sample_many(run.guests(client), "qmp", timeout=args.timeout)
        rearmed: List[Tuple[Sample, PollingState]] = []
        for s in before:
            entry: Dict[str, Any] = {
                "uri": s.uri,
                "domain": s.domain,
                "uuid": s.uuid,
                "status_before": s.status.value,
                "last_update_before": s.last_update,
                "rearmed": False,
                "status_after": None,
                "last_update_after": None,
            }
            results.append(entry)
            if s.error is not None:
                run.report(s.domain, s.uri, s.error)
                continue
            if s.status is not Status.STALE and not args.force:
                entry["message"] = "nothing to re-arm (not stale; --force re-arms anyway)"
                continue
            try:
                state = client.rearm(s.uuid, via=args.via)
            except BalloonStatsError as err:
                run.report(s.domain, s.uri, err)
                entry["message"] = f"re-arm failed: {err}"
                continue
            entry["rearmed"] = True
            rearmed.append((s, state))
        if rearmed and args.wait:
            sleep(min(max(st.qemu_interval or 0 for _, st in rearmed) + 1.0, args.wait))
        for s, state in rearmed:
            after = client.sample(s.uuid, "qmp")
            entry = next(e for e in results if e["uuid"] == s.uuid and e["uri"] == s.uri)
            moved = after.last_update is not None and after.last_update != s.last_update
            entry.update(status_after=after.status.value, last_update_after=after.last_update)
            entry["message"] = f"re-armed the {state.qemu_interval} s timer via {args.via}; " + (
                "the guest answered again"
                if moved
                else "no answer yet: the guest's balloon driver is not responding (check the guest)"
            )
    if args.format == "json":
        run.write(render_json(results))
    else:
        for e in results:
            if "message" in e:
                where = f"@{e['uri']}" if run.several_hosts else ""
                change = (
                    f"{e['status_before']} -> {e['status_after']}" if e["rearmed"] else e["status_before"]
                )
                run.write(f"{e['domain']}{where}: {change}: {e['message']}")
    return EXIT_FAILED if run.failed else EXIT_OK


# -- parser -------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the subcommand, as virsh users expect."""
    default = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument(
        "-c",
        "--connect",
        # After the subcommand, a separate list: argparse would otherwise
        # replace the URIs given before it instead of adding to them.
        dest="connect_after" if suppress else "connect",
        action="append",
        metavar="URI",
        default=default(None),
        help="libvirt URI; repeat for several hosts (default: $LIBVIRT_DEFAULT_URI, " "else qemu:///system)",
    )
    parser.add_argument(
        "-r",
        "--readonly",
        action="store_true",
        default=default(False),
        help="read-only connection (only --source libvirt works then)",
    )
    parser.add_argument(
        "--format", choices=_FORMATS, default=default("table"), help="output format (prometheus: stats only)"
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show tracebacks and debug logging"
    )


def _domains(parser: argparse.ArgumentParser, all_allowed: bool = True) -> None:
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain name, UUID or id")
    if all_allowed:
        parser.add_argument("--all", action="store_true", help="every running domain")


def _source(parser: argparse.ArgumentParser, default: str = "both") -> None:
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default=default,
        help="qmp: QEMU via the passthrough (taints the domain as custom-monitor); "
        "libvirt: memoryStats only, works read-only; both: cross-checked "
        f"(default: {default})",
    )


def _grace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE_SECONDS,
        metavar="S",
        help="seconds beyond 2 x interval before figures count as stale "
        f"(default: {DEFAULT_GRACE_SECONDS})",
    )


def _timeout(parser: argparse.ArgumentParser, default: Optional[float] = DEFAULT_TIMEOUT) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default,
        metavar="S",
        help="seconds to wait for each domain's QEMU before calling it unresponsive "
        + (f"(default: {default:g})" if default else "(default: the --interval)"),
    )


def _setting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--via",
        choices=ROUTES,
        default="libvirt",
        help="libvirt: setMemoryStatsPeriod, keeps libvirt's XML true (default); "
        "qmp: qom-set guest-stats-polling-interval",
    )
    parser.add_argument("--live", action="store_true", help="change the running domain")
    parser.add_argument(
        "--config",
        action="store_true",
        help="change the persistent definition (libvirt route); "
        "neither flag: the running domain, or the definition if it is not running",
    )


def _seconds(text: str, *, zero: bool = True) -> float:
    """A finite number of seconds, 0 or more (``--grace``); NaN and infinity are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    in_range = value >= 0 if zero else value > 0
    if not in_range or not math.isfinite(value):
        least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {least} seconds, not {text}")
    return value


def _positive(text: str) -> float:
    """More than 0 seconds, finite (timeouts, intervals, ``--max-age``)."""
    return _seconds(text, zero=False)


_EXAMPLES = {
    "stats": (
        "stats web1",
        "stats --all --format json",
        "stats -c qemu:///system -c qemu+tcp://hv2/system --all",
        "stats --source libvirt -r web1",
    ),
    "period": ("period web1", "period web1 db1 10", "period --via qmp web1 0", "period --config web1 5"),
    "enable": ("enable web1", "enable --period 10 web1 db1"),
    "disable": ("disable web1",),
    "path": ("path web1",),
    "check": ("check --all", "check --max-age 60 web1 db1"),
    "watch": ("watch --all", "watch --interval 5 web1 db1"),
    "rearm": ("rearm --all", "rearm --force web1"),
    "stream": ("stream --all --interval 10", "stream --count 1 web1 | jq .status"),
    "exporter": (
        "exporter",
        "exporter --listen [::1]:9474 --interval 30",
        "exporter --listen 0.0.0.0:9474 --tls-cert cert.pem --tls-key key.pem --basic-auth-file users",
        "exporter --hash-password < password.txt",
    ),
}


class _Unbuilt:
    """Stands in for the parser of a command that is not the one being run.

    Neither it nor its arguments are built: argparse spends most of a
    one-shot command's start-up building parsers, and only the command given
    needs one. ``--help`` on the top level (no command word) builds them all.
    """

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to build."""

    def set_defaults(self, **kwargs: Any) -> None:
        """Nothing to set."""


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, sized to the terminal without importing shutil.

    argparse makes a formatter for every option it adds (to check the
    metavar), and one given no width imports shutil to size the terminal;
    shutil brings bz2 and lzma along, a tenth of a one-shot command's own
    start-up. The width is what ``shutil.get_terminal_size()`` would give.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: Optional[int] = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _RawDescriptionFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """A command's help: its description and examples keep their line breaks."""


def _columns() -> int:
    """``$COLUMNS``, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns or 80


def _command_word(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in ``argv``, if one is; ``None`` means build every command."""
    takes_value = {"-c", "--connect"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif word in ("-h", "--help"):
            return None
        elif not word.startswith("-"):
            return word if word in _EXAMPLES else None
    return None


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that command's options are built."""
    parser = argparse.ArgumentParser(
        prog="virt-balloon-stats",
        formatter_class=_HelpFormatter,
        description="Read, control and cross-check QEMU virtio-balloon guest memory statistics "
        "through libvirt.",
        epilog="Domains are named as virsh names them: name, UUID or id. "
        "Run 'virt-balloon-stats COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(
        name: str, func: Callable[[Run], int], help_text: str, description: str
    ) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return cast(argparse.ArgumentParser, _Unbuilt())
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog="examples:\n" + "\n".join(f"  virt-balloon-stats {e}" for e in _EXAMPLES[name]),
            formatter_class=_RawDescriptionFormatter,
        )
        _common(p, suppress=True)
        p.set_defaults(func=func)
        return p

    p = command(
        "stats",
        cmd_stats,
        "balloon figures, beside libvirt's",
        "Show every guest-stats figure of each domain with libvirt's memoryStats value beside "
        "it, the status, the age of the figures and the cross-check verdict.",
    )
    _domains(p)
    _source(p)
    _grace(p)
    _timeout(p)
    p.add_argument(
        "--bytes", action="store_true", help="raw numbers (bytes, and libvirt's KiB) instead of MiB/GiB"
    )
    p.add_argument(
        "--textfile",
        metavar="PATH",
        help="write the Prometheus format to PATH, replaced atomically (node_exporter's textfile "
        "collector); prints nothing",
    )

    p = command(
        "period",
        cmd_period,
        "show or set the polling interval",
        "Without SECONDS, show QEMU's live interval, libvirt's <stats period> and any drift. "
        "With SECONDS (0 disables), set it and read QEMU's value back. A trailing number "
        "after at least one domain is SECONDS; use --set when that is ambiguous.",
    )
    p.add_argument(
        "words",
        nargs="+",
        metavar="DOMAIN",
        help="domain name, UUID or id; a number after the last is SECONDS",
    )
    p.add_argument("--set", metavar="SECONDS", help="the interval to set, in whole seconds (0 disables)")
    _setting(p)

    p = command(
        "enable",
        cmd_enable,
        "turn stats polling on",
        f"Set the polling interval (default {DEFAULT_ENABLE_PERIOD} s) and read it back.",
    )
    _domains(p, all_allowed=False)
    p.add_argument(
        "--period",
        default=DEFAULT_ENABLE_PERIOD,
        metavar="N",
        help=f"interval in seconds (default: {DEFAULT_ENABLE_PERIOD})",
    )
    _setting(p)

    p = command(
        "disable",
        cmd_disable,
        "turn stats polling off",
        "Set the polling interval to 0; QEMU stops asking the guest, the last figures stay.",
    )
    _domains(p, all_allowed=False)
    _setting(p)

    p = command(
        "path",
        cmd_path,
        "the balloon's QOM path",
        "Show the balloon device's QOM path, its QOM type, and how it was found "
        "(by its alias under /machine/peripheral, or by searching the QOM tree).",
    )
    _domains(p)

    p = command(
        "check",
        cmd_check,
        "Nagios/Icinga check (exit 0-3)",
        "Monitoring-plugin check: one status line with performance data; exit 0 OK, "
        "1 WARNING, 2 CRITICAL, 3 UNKNOWN. stale, unresponsive and --max-age: CRITICAL; "
        "never_updated, polling_disabled, cross-check mismatch: WARNING; no_balloon, "
        "unreachable: UNKNOWN; ok, paused: OK. It ends within --timeout whatever one QEMU does.",
    )
    _domains(p)
    _source(p)
    _grace(p)
    _timeout(p)
    p.add_argument(
        "--max-age", type=_positive, metavar="S", help="CRITICAL when figures are older than S seconds"
    )

    p = command(
        "watch",
        cmd_watch,
        "live view with rates and trends",
        "Redraw a table every --interval seconds: free and available memory with a small "
        "trend, faults and swap per second. On a terminal it redraws in place (plain ANSI); "
        "otherwise it prints one block per interval. Ctrl-C quits.",
    )
    _domains(p)
    _source(p)
    _grace(p)
    _timeout(p, None)
    p.add_argument(
        "--interval", type=_positive, default=2.0, metavar="S", help="seconds between refreshes (default: 2)"
    )
    p.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N refreshes (default: until Ctrl-C)"
    )

    p = command(
        "rearm",
        cmd_rearm,
        "re-arm the stats timer of stale domains",
        "QEMU re-arms its stats timer only when the guest answers. For each stale domain, "
        "set the same interval again (which re-arms it), wait one interval, and report "
        "whether the guest answered.",
    )
    _domains(p)
    _grace(p)
    _timeout(p)
    p.add_argument("--via", choices=ROUTES, default="libvirt", help="route for the re-set (default: libvirt)")
    p.add_argument("--force", action="store_true", help="re-arm every named domain, stale or not")
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="S",
        help="longest wait for the guest to answer, 0 to not wait (default: 30)",
    )
    p = command(
        "stream",
        cmd_stream,
        "JSON Lines, one per domain per cycle",
        "Print one JSON document per domain (the one 'stats --format json' prints) per line, every "
        "--interval seconds, each line flushed. A long-running collector: domains come and go, a "
        "hung QEMU is one unresponsive line, a libvirtd restart makes unreachable lines until it "
        "answers again. SIGTERM ends it after the current line; a closed pipe ends it with status 0.",
    )
    _domains(p)
    _source(p)
    _grace(p)
    p.add_argument(
        "--interval", type=_positive, default=10.0, metavar="S", help="seconds between cycles (default: 10)"
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N cycles (default: never)")
    _timeout(p, None)

    p = command(
        "exporter",
        cmd_exporter,
        "Prometheus exporter",
        "Collect every --interval seconds in the background and serve the last cycle at /metrics; a "
        "scrape never waits on libvirt. Listens on loopback unless --listen says otherwise. Without "
        "DOMAIN, every running domain. SIGTERM stops it; SIGHUP re-reads the TLS certificate and "
        "the basic-auth file.",
    )
    _domains(p)
    _source(p)
    _grace(p)
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{_EXPORTER_PORT}",
        metavar="HOST:PORT",
        help=f"address to serve on, [IPV6]:PORT for IPv6 (default: 127.0.0.1:{_EXPORTER_PORT})",
    )
    p.add_argument(
        "--interval", type=_positive, default=15.0, metavar="S", help="seconds between cycles (default: 15)"
    )
    _timeout(p, None)
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
    return parser


def _validate(args: argparse.Namespace) -> None:
    domains = getattr(args, "domains", None)
    if args.command == "exporter" and not domains:
        args.all = True  # without names, an exporter serves every running domain
    if domains is not None and hasattr(args, "all"):
        if args.all and domains:
            raise UsageError("give domains or --all, not both")
        if not args.all and not domains:
            raise UsageError("name at least one domain, or use --all")
    elif domains is not None and not domains:
        raise UsageError("name at least one domain")
    if args.format == "prometheus" and args.command != "stats":
        raise UsageError("--format prometheus applies to 'stats' only")
    if getattr(args, "textfile", None) and args.format == "json":
        raise UsageError("--textfile writes the Prometheus format; drop --format json")
    if args.format != "table" and args.command in ("check", "watch", "stream", "exporter"):
        raise UsageError(f"'{args.command}' has its own output; --format does not apply")
    if args.readonly and args.command in ("period", "enable", "disable", "path", "rearm"):
        raise UsageError(
            f"'{args.command}' needs the QMP passthrough or a change through libvirt, which a read-only "
            "connection refuses; drop -r"
        )
    if args.readonly and getattr(args, "source", "libvirt") != "libvirt":
        raise UsageError("a read-only connection cannot use the QMP passthrough; add --source libvirt")


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the command line; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_word(words))
    args = parser.parse_args(words)
    args.connect = (args.connect or []) + (getattr(args, "connect_after", None) or []) or None
    if args.command in ("exporter", "stream", "watch"):
        # The entry point keeps the cyclic collector off for start-up only (see __main__).
        gc.enable()
    silence_libvirt_stderr()
    try:
        _validate(args)
        return int(args.func(Run(args, out, err)))
    except UsageError as exc:
        parser.print_usage(err)
        err.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except InvalidArgument as exc:
        err.write(f"{exc.domain + ': ' if exc.domain else ''}{exc}\n")
        return EXIT_USAGE
    except BalloonStatsError as exc:
        err.write(f"{exc.domain + ': ' if exc.domain else ''}{exc}\n")
        if args.debug:
            import traceback

            traceback.print_exc(file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("Aborted at user request\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED

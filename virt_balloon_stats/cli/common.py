"""What every command shares: :class:`Run`, the options, and what a command declares to the dispatch.

:class:`Run` is one invocation: the parsed options, where to write, and
the failures so far (one stderr line each). The ``add_*`` functions add the
options several commands take, each with its help text and default; a
command's own options stay in its family's module. :class:`AddCommand` is
how a family's ``add_parsers`` adds a command, and says what the dispatch
checks for it (the ``--format`` values it prints, whether it needs a
read-write connection, whether it runs until stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Set, TextIO, Tuple, cast

from virt_balloon_stats.client import DEFAULT_TIMEOUT, BalloonStats
from virt_balloon_stats.errors import BalloonStatsError
from virt_balloon_stats.host import Guest, default_uri
from virt_balloon_stats.sample import SOURCES
from virt_balloon_stats.stats import DEFAULT_GRACE_SECONDS

if TYPE_CHECKING:  # imported where used: a one-domain reading needs no collector, nor the advice
    from virt_balloon_stats.advice import Policy
    from virt_balloon_stats.ballooning import Ballooner, Outcome
    from virt_balloon_stats.collector import Collector, Cycle

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "FORMATS",
    "TABLE_AND_JSON",
    "OWN_OUTPUT",
    "UsageError",
    "Run",
    "AddCommand",
    "add_common",
    "add_domains",
    "add_history",
    "add_policy",
    "policy_of",
    "duration",
    "spell_duration",
    "HISTORY_PATH",
    "add_source",
    "add_grace",
    "add_timeout",
    "seconds",
    "positive",
    "size",
    "NEEDS_READ_WRITE",
    "add_stepping",
    "ballooner_of",
    "tell",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Every ``--format``; each command declares the ones it prints.
FORMATS = ("table", "json", "prometheus")
TABLE_AND_JSON = ("table", "json")
#: A command that prints its own output (a check line, a live view, JSON
#: Lines, a server) takes no ``--format``.
OWN_OUTPUT = ("table",)


class UsageError(Exception):
    """A command line that cannot be acted on; exit 2."""


class Run:
    """What one invocation needs: the parsed options, where to write, and how it went so far.

    A plain class: a dataclass writes its methods with ``exec()`` when it is
    defined, which every command's start-up would pay for.
    """

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.failed = False
        self.first_error = ""
        self.hosts: Dict[str, bool] = {}

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

    def collector(
        self, *, events: bool = False, timeout: Optional[float] = None, log_changes: bool = False
    ) -> Collector:
        """The collector over the command's URIs and domains (every running one with ``--all``).

        Its log goes to stderr: the long-running services (``log_changes``)
        log their state changes, one line each and not per cycle; the other
        commands only warnings, or everything with ``--debug``.
        """
        import logging

        from virt_balloon_stats.collector import Collector

        args = self.args
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO if log_changes else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return Collector(
            self.uris,
            domains=None if getattr(args, "all", False) else args.domains,
            source=getattr(args, "source", "both"),
            timeout=timeout or args.timeout,
            events=events,
            readonly=args.readonly,
            crosscheck_every=getattr(args, "crosscheck_every", CROSSCHECK_EVERY),
            grace=getattr(args, "grace", DEFAULT_GRACE_SECONDS),
            log_changes=log_changes,
        )

    def report_cycle(self, cycle: Cycle, reported: Optional[Set[Tuple[str, str, str]]] = None) -> None:
        """One stderr line per failure of the cycle; ``reported`` keeps a long run from repeating them."""
        for problem in cycle.problems:
            key = (problem.what, problem.uri, str(problem.error))
            if reported is None or key not in reported:
                self.report(problem.what, problem.uri, problem.error)
                if reported is not None:
                    reported.add(key)
        for uri, state in cycle.hosts.items():
            self.hosts[uri] = state.up
        if reported is None:
            for s in cycle.samples:
                if s.error is not None:
                    self.report(s.domain, s.uri, s.error)

    def write(self, text: str) -> None:
        if text:
            self.out.write(text if text.endswith("\n") else text + "\n")


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


class AddCommand:
    """What a family's ``add_parsers`` calls to add a command: it adds the parser, with the
    options every command takes, and returns it.

    It builds the one command it was made for and hands back a stand-in for
    the family's others: a family is asked once per command, so that
    ``--help`` lists them in the order of the CLI's ``COMMANDS``.
    """

    def __init__(
        self,
        sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
        name: str,
        formatter_class: "type[argparse.HelpFormatter]",
    ) -> None:
        self.sub = sub
        self.name = name
        self.formatter_class = formatter_class

    def __call__(
        self,
        name: str,
        func: Callable[[Run], int],
        help_text: str,
        description: str,
        *,
        examples: Tuple[str, ...],
        formats: Tuple[str, ...] = TABLE_AND_JSON,
        read_write: bool = False,
        long_running: bool = False,
    ) -> argparse.ArgumentParser:
        """:param formats: The ``--format`` values the command prints;
            :data:`OWN_OUTPUT` when it takes none.
        :param read_write: It needs a read-write connection (``-r`` is refused).
        :param long_running: It runs until stopped (the cyclic garbage
            collector is turned back on before it starts).
        """
        if name != self.name:
            return cast(argparse.ArgumentParser, _Unbuilt())
        p = self.sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog="examples:\n" + "\n".join(f"  virt-balloon-stats {e}" for e in examples),
            formatter_class=self.formatter_class,
        )
        add_common(p, suppress=True)
        p.set_defaults(func=func, formats=formats, read_write=read_write, long_running=long_running)
        return p


def add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
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
        help="read-only connection (for stats: only --source libvirt works then)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=default("table"),
        help="output format (prometheus: stats and advise only)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show tracebacks and debug logging"
    )


def add_domains(
    parser: argparse.ArgumentParser, all_allowed: bool = True, *, all_unless_named: bool = False
) -> None:
    """DOMAIN... and ``--all``; with ``all_unless_named``, naming no domain means every running one."""
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain name, UUID or id")
    if all_allowed:
        # None: not given, which the dispatch turns into True when no domain is named.
        default = None if all_unless_named else False
        parser.add_argument("--all", action="store_true", default=default, help="every running domain")


#: The history file's default place (kept in step with ``history.DEFAULT_PATH``,
#: which a unit test checks: the parser does not import sqlite3 for a help text).
HISTORY_PATH = "/var/lib/virt-balloon-stats/history.sqlite"


def add_history(parser: "argparse._ActionsContainer", *, optional: bool = False) -> None:
    """``--history PATH``: the history file ``record`` writes and ``advise`` reads.

    With ``optional`` (the exporter), keeping history is asked for by
    ``--history`` alone, with the file optional.
    """
    if optional:
        parser.add_argument(
            "--history",
            nargs="?",
            const=HISTORY_PATH,
            metavar="PATH",
            help="keep each domain's history in this file, as 'record' does, and serve reclaim advice "
            f"from it (default: no history; {HISTORY_PATH} when PATH is left out)",
        )
    else:
        parser.add_argument("--history", metavar="PATH", help=f"the history file (default: {HISTORY_PATH})")


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


def add_policy(parser: argparse.ArgumentParser) -> None:
    """``--window`` and ``--min-history``: the advice's knobs a user sets (``advise``, ``exporter``)."""
    from virt_balloon_stats.advice import Policy

    defaults = Policy()
    parser.add_argument(
        "--window",
        type=duration,
        default=defaults.window_seconds,
        metavar="D",
        help=f"how far back the history counts, e.g. 8d, 36h, 90m, 300s (default: "
        f"{spell_duration(defaults.window_seconds)})",
    )
    parser.add_argument(
        "--min-history",
        type=duration,
        default=defaults.min_history_seconds,
        metavar="D",
        help="usable history needed before advising at all (default: "
        f"{spell_duration(defaults.min_history_seconds)})",
    )


def policy_of(args: argparse.Namespace) -> "Policy":
    """The advice policy of :func:`add_policy`'s options.

    :raise UsageError: When no domain could ever have enough history.
    """
    if args.min_history > args.window:
        raise UsageError(
            f"--min-history {spell_duration(args.min_history)} is longer than --window "
            f"{spell_duration(args.window)}: no domain could ever have enough history"
        )
    from virt_balloon_stats.advice import Policy

    return Policy(window_seconds=args.window, min_history_seconds=args.min_history)


#: ``--crosscheck-every``'s default: the collector's own (not imported, to
#: keep the collector out of the one-domain commands' start; a test holds them equal).
CROSSCHECK_EVERY = 4


def add_source(parser: argparse.ArgumentParser, default: str = "both", *, long_running: bool = False) -> None:
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default=default,
        help="qmp: QEMU via the passthrough (taints the domain as custom-monitor); "
        "libvirt: memoryStats only, works read-only; both: cross-checked "
        f"(default: {default})",
    )
    if long_running:
        parser.add_argument(
            "--crosscheck-every",
            type=whole,
            default=CROSSCHECK_EVERY,
            metavar="N",
            help="with --source both: read QEMU and compare each domain with libvirt one cycle in N, "
            "the domains taking turns (between turns, libvirt's figures once they agreed); 1: every "
            f"cycle (default: {CROSSCHECK_EVERY})",
        )


def whole(text: str) -> int:
    """A whole number, 1 or more (``--crosscheck-every``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_grace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GRACE_SECONDS,
        metavar="S",
        help="seconds beyond 2 x interval before figures count as stale "
        f"(default: {DEFAULT_GRACE_SECONDS})",
    )


def add_timeout(parser: argparse.ArgumentParser, default: Optional[float] = DEFAULT_TIMEOUT) -> None:
    parser.add_argument(
        "--timeout",
        type=positive,
        default=default,
        metavar="S",
        help="seconds to wait for each domain's QEMU before calling it unresponsive "
        + (f"(default: {default:g})" if default else "(default: the --interval)"),
    )


def seconds(text: str, *, zero: bool = True) -> float:
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


def positive(text: str) -> float:
    """More than 0 seconds, finite (timeouts, intervals, ``--max-age``)."""
    return seconds(text, zero=False)


#: What ``--yes`` with ``-r`` is told.
NEEDS_READ_WRITE = "--yes changes guests through libvirt, which a read-only connection refuses; drop -r"

#: Bytes per unit of a size: binary units, as virsh's own.
_SIZES: Dict[str, int] = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30,
                          "gib": 2**30, "t": 2**40, "tib": 2**40}


def size(text: str) -> int:
    """``512M``, ``2GiB``, ``1.5G``, ``4096k`` or plain bytes -> whole bytes (binary units, as virsh's).

    :raise argparse.ArgumentTypeError: For anything else: a sign, an exponent, an unknown unit, 8 EiB or more.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZES:
        raise argparse.ArgumentTypeError(
            f"not a size: {text[:40]!r}; give bytes or a number with K, M, G or T"
        )
    value = float(match.group(1)) * _SIZES[unit]
    if not value < 2**63:
        raise argparse.ArgumentTypeError(f"a size under 8 EiB, not {text[:40]!r}")
    return int(value)


def _percent(text: str) -> float:
    """``5``, ``5%`` or ``12.5 %`` -> 0.05...; more than 0 and at most 100."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text[:40]!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"a percentage over 0 and at most 100, not {text[:40]!r}")
    return value / 100


def _fraction(text: str) -> float:
    """A number from 0 to 1 (``--min-confidence``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number from 0 to 1: {text[:40]!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a number from 0 to 1, not {text[:40]!r}")
    return value


def add_stepping(parser: argparse.ArgumentParser, *, long_running: bool) -> None:
    """The balloon steps' options (``advise --apply``, ``balloon``): confirmation, bounds and feedback."""
    from virt_balloon_stats.stepping import StepPolicy

    d = StepPolicy()
    parser.add_argument(
        "--yes", action="store_true",
        help="make the setMemoryFlags calls; without it, " + ("every pass is" if long_running else "this is")
        + " a dry run that prints the calls it would make and changes nothing",
    )
    parser.add_argument("--step", type=_percent, default=d.step_fraction, metavar="PERCENT",
                        help="a step moves at most this share of the balloon size "
                        f"(default: {d.step_fraction * 100:g}%%)")
    parser.add_argument("--step-max", type=size, default=d.step_max_bytes, metavar="SIZE",
                        help=f"...and at most this much (default: {d.step_max_bytes // 2**20}M)")
    parser.add_argument("--min-confidence", type=_fraction, default=d.min_confidence, metavar="F",
                        help=f"no shrink on advice less confident than this; 0.5 is one full day of history "
                        f"(default: {d.min_confidence:g})")
    parser.add_argument("--cooldown", type=duration, default=d.cooldown_seconds, metavar="D",
                        help="hold after pressure, and at most one change of direction in it (default: "
                        f"{spell_duration(d.cooldown_seconds)})")
    parser.add_argument("--settle", type=duration, default=d.settle_seconds, metavar="D",
                        help="how long a step may take to reach its target before the guest is held "
                        f"(default: {spell_duration(d.settle_seconds)})")
    parser.add_argument("--pressure-available", type=_percent, default=d.available_floor_fraction,
                        metavar="PERCENT", help="available memory under this share of the guest's total is "
                        f"pressure (default: {d.available_floor_fraction * 100:g}%%)")
    parser.add_argument("--max", type=size, metavar="SIZE",
                        help="grow no guest over this (default: its balloon size when stepping began)")
    parser.add_argument("--target-host-available", type=size, metavar="SIZE",
                        help="shrink only while the host has less available (free + cached + buffers), "
                        "the most over-provisioned guests first, and grow back only while it has more")
    parser.add_argument("--max-total", type=size, metavar="SIZE",
                        help="take back at most this much in all"
                        + (" while it runs" if long_running else ""))
    parser.add_argument("--textfile", metavar="PATH",
                        help="write the step counters there after each pass, in Prometheus' text format "
                        "(for node_exporter's textfile collector)")


@contextlib.contextmanager
def ballooner_of(run: Run, collector: "Collector") -> Iterator["Ballooner"]:
    """The :class:`~virt_balloon_stats.ballooning.Ballooner` of the command's options, on its history.

    The history is opened as its stepper only with ``--yes`` (one stepper
    at a time); a dry run only reads it.

    :raise UsageError: When the options contradict each other.
    """
    from virt_balloon_stats.ballooning import Ballooner
    from virt_balloon_stats.errors import InvalidArgument
    from virt_balloon_stats.history import History
    from virt_balloon_stats.stepping import StepPolicy

    args = run.args
    advice = policy_of(args)
    try:
        policy = StepPolicy(step_fraction=args.step, step_max_bytes=args.step_max,
                            min_confidence=args.min_confidence,
                            cooldown_seconds=args.cooldown, settle_seconds=args.settle,
                            available_floor_fraction=args.pressure_available, floor_bytes=advice.floor_bytes)
    except InvalidArgument as err:
        raise UsageError(str(err)) from None
    if args.step_max < 2**20:
        raise UsageError("--step-max must be at least 1M: a balloon moves in whole MiB")
    with History.open(args.history or HISTORY_PATH, writer=False, stepper=args.yes) as history:
        options = {"advise_every": args.advise_every} if hasattr(args, "advise_every") else {}
        yield Ballooner(collector, history, advice, policy, apply=args.yes, maximum=args.max,
                        target_host_available=args.target_host_available, max_total=args.max_total, **options)


def tell(run: Run, ballooner: "Ballooner", outcomes: List["Outcome"]) -> None:
    """Each outcome as a line (a JSON line with ``--format json``), then the counters to ``--textfile``."""
    args = run.args
    import json

    for outcome in outcomes:
        if args.format == "json":
            run.write(json.dumps(outcome.to_dict()))
        else:
            run.write(outcome.line(show_uri=run.several_hosts))
    run.out.flush()
    if args.textfile:
        ballooner.write_textfile(args.textfile)

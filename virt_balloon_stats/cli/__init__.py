"""``virt-balloon-stats``: the command line, shaped like virsh.

Connection habits are virsh's (``-c URI``, ``LIBVIRT_DEFAULT_URI``, ``-r``),
domains are named as virsh names them (name, UUID or id), and ``-c`` may be
given more than once to cover several hosts in one run.

Errors are one line per failing domain on stderr, ``DOMAIN: what went wrong,
and what to do``; a traceback only with ``--debug``. Exit status: 0 when
every domain succeeded, 1 when some failed, 2 on a usage error, 130 when
interrupted; ``check`` uses the Nagios codes instead (0-3).

This module parses and dispatches. :data:`COMMANDS` names each command's
family, a module beside this one that adds the command's parser and runs
it: :mod:`~virt_balloon_stats.cli.reads` (``stats``, ``path``, ``check``),
:mod:`~virt_balloon_stats.cli.control` (``period``, ``enable``, ``disable``,
``rearm``), :mod:`~virt_balloon_stats.cli.long_running` (``watch``,
``stream``, ``record``, ``exporter``, ``balloon``) and :mod:`~virt_balloon_stats.cli.advising`
(``advise``, and ``advise --apply``); what they share is in
:mod:`~virt_balloon_stats.cli.common`. Only the family of the command given
is imported. A new command is a function in its family and a row here.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from typing import Optional, Sequence, TextIO

from virt_balloon_stats import __version__
from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    AddCommand,
    Run,
    UsageError,
    add_common,
)
from virt_balloon_stats.errors import BalloonStatsError, InvalidArgument
from virt_balloon_stats.host import silence_libvirt_stderr

__all__ = ["main", "build_parser", "COMMANDS"]

#: Every command, in the order ``--help`` lists them, and the module of its
#: family (under ``virt_balloon_stats.cli``), whose ``add_parsers`` builds it.
COMMANDS = {
    "stats": "reads",
    "period": "control",
    "enable": "control",
    "disable": "control",
    "path": "reads",
    "check": "reads",
    "watch": "long_running",
    "rearm": "control",
    "stream": "long_running",
    "record": "long_running",
    "exporter": "long_running",
    "balloon": "long_running",
    "advise": "advising",
}


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
            return word if word in COMMANDS else None
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
    add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, family in COMMANDS.items():
        if only is None or name == only:
            command = AddCommand(sub, name, _RawDescriptionFormatter)
            importlib.import_module(f"{__name__}.{family}").add_parsers(command)
    return parser


def _validate(args: argparse.Namespace) -> None:
    domains = getattr(args, "domains", None)
    if domains is not None and getattr(args, "all", False) is None:
        args.all = not domains  # --all left unset where naming none means every running domain
    if domains is not None and hasattr(args, "all"):
        if args.all and domains:
            raise UsageError("give domains or --all, not both")
        if not args.all and not domains:
            raise UsageError("name at least one domain, or use --all")
    elif domains is not None and not domains:
        raise UsageError("name at least one domain")
    if args.format == "prometheus" and args.format not in args.formats:
        raise UsageError("--format prometheus applies to 'stats' and 'advise' only")
    if getattr(args, "textfile", None) and args.format == "json" and args.command == "stats":
        raise UsageError("--textfile writes the Prometheus format; drop --format json")
    if args.format not in args.formats:
        raise UsageError(f"'{args.command}' has its own output; --format does not apply")
    if args.readonly and args.read_write:
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
    if args.long_running:
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

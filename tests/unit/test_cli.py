"""virt_balloon_stats.cli and its entry point: what the command line does before any domain is read.

Commands run in-process against libvirt's own test driver (``test:///default``,
part of libvirt itself, no daemon): it has no QMP passthrough, so every
reading fails, which is enough for what is checked here.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import shutil
import subprocess
import sys
from typing import Any, Iterator, List
from unittest import mock

import pytest

from virt_balloon_stats.cli import COMMANDS, _columns, build_parser, main

TEST_URI = "test:///default"


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off, as the entry point leaves it for start-up; on again after."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run(argv: List[str]) -> int:
    return main(["-c", TEST_URI, *argv], out=io.StringIO(), err=io.StringIO())


@pytest.mark.parametrize("argv", [["watch", "--count", "1", "--all"], ["stream", "--count", "1", "--all"]])
def test_long_running_commands_turn_the_cyclic_collector_back_on(collector_off, argv):
    _run(argv)
    assert gc.isenabled()


@pytest.mark.parametrize("argv", [["stats", "--all"], ["stats", "test"], ["check", "--all"]])
def test_one_shot_commands_leave_it_off(collector_off, argv):
    assert _run(argv) != 0  # the test driver has no QMP passthrough
    assert not gc.isenabled()


@pytest.mark.parametrize("columns", ["60", "132", "", "junk", "-5", "0"])
def test_help_is_as_wide_as_argparse_would_make_it(monkeypatch, capsys, columns):
    """The width argparse gets from shutil, without importing shutil: options wrap at $COLUMNS - 2."""
    monkeypatch.setenv("COLUMNS", columns)
    width = shutil.get_terminal_size().columns
    assert _columns() == width
    with pytest.raises(SystemExit) as stop:
        main(["stats", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    start = text.index("\noptions:\n")
    options = text[start:].split("\n\n")[0].splitlines()[1:]
    assert len(options) > 10
    assert max(len(line) for line in options) <= width - 2
    assert max(len(line) for line in options) > min(width, 80) - 2 - 10  # the room is used


def test_every_command_is_in_the_table_and_its_family_builds_it():
    """A command a family adds but the table lacks would never be built: each family adds its table rows."""
    for family in set(COMMANDS.values()):
        added: List[str] = []

        def command(name: str, *args: Any, **kwargs: Any) -> Any:
            added.append(name)
            return mock.Mock(spec=argparse.ArgumentParser)

        importlib.import_module(f"virt_balloon_stats.cli.{family}").add_parsers(command)
        assert added == [name for name, f in COMMANDS.items() if f == family]


def test_help_lists_the_commands_in_the_tables_order():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)


def test_a_one_shot_command_imports_its_own_family_and_no_collector():
    """What a one-domain ``stats`` loads: no other command family, no collector (the cold start)."""
    code = (
        "import io, sys\n"
        "from virt_balloon_stats.cli import main\n"
        f"main(['-c', '{TEST_URI}', 'stats', 'test'], out=io.StringIO(), err=io.StringIO())\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('virt_balloon_stats'))))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split())
    assert "virt_balloon_stats.cli.reads" in loaded
    assert loaded.isdisjoint(
        {
            "virt_balloon_stats.cli.control",
            "virt_balloon_stats.cli.long_running",
            "virt_balloon_stats.collector",
            "virt_balloon_stats.facade",
            "virt_balloon_stats.nagios",
            # No events serve one reading (1.4 ms of -X importtime).
            "virt_balloon_stats.events",
        }
    )


@pytest.mark.parametrize("command", ["watch", "stream", "record", "exporter", "balloon"])
def test_long_running_commands_take_crosscheck_every_to_their_collector(command):
    """``--crosscheck-every N`` reaches the collector; its default is the collector's own."""
    import io as _io

    from virt_balloon_stats.cli.common import CROSSCHECK_EVERY, Run
    from virt_balloon_stats.collector import DEFAULT_CROSSCHECK_EVERY

    assert CROSSCHECK_EVERY == DEFAULT_CROSSCHECK_EVERY
    extra = ["--history", "/nonexistent/h.sqlite"] if command == "record" else []
    for argv, every in (([], DEFAULT_CROSSCHECK_EVERY), (["--crosscheck-every", "2"], 2)):
        args = build_parser().parse_args([command, *extra, *argv, "dom"])
        assert args.crosscheck_every == every
        with Run(args, _io.StringIO(), _io.StringIO()).collector(events=True) as collector:
            assert collector.crosscheck_every == every


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_a_bad_crosscheck_every_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["exporter", "--crosscheck-every", value, "dom"])
    assert exit_.value.code == 2
    assert "--crosscheck-every" in capsys.readouterr().err

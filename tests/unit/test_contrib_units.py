"""The systemd units in contrib/ are hardened: ``systemd-analyze security --offline=true`` scores each.

Exposure is systemd's own 0-10 score of what a unit may do (10: everything).
Every unit shipped here must score 2.5 or less, and must pass ``systemd-analyze
verify`` apart from the command path, which does not exist on a test machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.conftest import missing

UNITS_DIR = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = sorted(p.name for p in UNITS_DIR.glob("*.service"))
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing("systemd-analyze (Debian package systemd)")
    assert tool is not None
    return tool


def test_there_are_units_to_check():
    """The exporter's service, the textfile timer's service and the stepper's are shipped."""
    assert {"virt-balloon-stats.service", "virt-balloon-stats-exporter.service",
            "virt-balloon-stats-balloon.service"} <= set(UNITS)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_2_5(unit):
    proc = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", unit],
        cwd=UNITS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit):
    proc = subprocess.run(
        [_analyze(), "verify", unit], cwd=UNITS_DIR, capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in proc.stderr.splitlines()
        if line.strip() and "/usr/local/bin/virt-balloon-stats" not in line
    ]
    assert not problems, proc.stderr


def test_the_stepper_unit_ships_as_a_dry_run_the_parser_accepts():
    """Its ExecStart is a valid 'balloon' command line, without --yes: an operator adds it after a look."""
    import shlex

    from virt_balloon_stats.cli import build_parser

    text = (UNITS_DIR / "virt-balloon-stats-balloon.service").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(line.partition("=")[2])[1:]
    args = build_parser(argv[0]).parse_args(argv)
    assert args.command == "balloon" and args.all and not args.yes
    assert args.history == "/var/lib/virt-balloon-stats/history.sqlite"
    assert f"ReadWritePaths={Path(args.history).parent}" in text

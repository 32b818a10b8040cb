"""``advise --apply`` and ``balloon`` on real guests: steps libvirt carries out, pressure that undoes them.

Two 384 MiB guests are recorded every 2 s by the installed ``record`` for
:data:`MIN_HISTORY` seconds: ``idle`` and ``hog``, which holds
:data:`HOG_MIB` MiB once its ``MemTotal`` falls under :data:`HOG_BELOW_MIB`
(``vbs-testbed create --hog-below``): memory it needs only after the host
took some away. Then, in this order (the tests share the guests and the
history file, as one operator's day would):

1. ``advise --apply`` without ``--yes`` changes nothing anywhere;
2. with ``--yes`` and ``idle``'s QEMU stopped, ``hog`` is stepped and
   ``idle`` is left alone;
3. ``balloon --yes`` shrinks ``hog`` step by step, ``dommemstat`` following,
   until the hog starts; the pressure gives memory back within two
   intervals, and the guest's console shows no OOM kill;
4. SIGTERM during a pass ends ``balloon`` after the pass, with libvirt's
   balloon target and the history's step memory agreeing.

The expected sizes come from the step bounds the commands are given and from
``virsh dommemstat``, never from the commands' own output alone.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.integration.conftest import QEMU_LOG_DIR, Domains, create_many, wait_for
from tests.integration.test_advise import Recorder
from tests.integration.test_cli import CLI, dommemstat, vbs, virsh
from tests.integration.test_collector import stopped

MiB = 2**20
#: Usable history the commands ask for before they step (``--min-history``).
MIN_HISTORY = 30
#: ``balloon``'s interval, seconds.
INTERVAL = 4
#: The guests' size, and the hog's.
MEMORY_MIB = 384
HOG_MIB = 120
HOG_BELOW_MIB = 220
#: A step's bound in these tests: 25 % (the default 5 % would take 20 passes to reach the advice).
STEP = 0.25
#: The options every stepping command gets here: history short enough for a test, a larger step,
#: pressure when available memory is under 20 % of the total.
STEPPING = ["--min-history", f"{MIN_HISTORY}s", "--min-confidence", "0", "--step", f"{STEP * 100:g}",
            "--pressure-available", "20"]


class Guests:
    """The two guests, the history file, and what libvirt says of them."""

    def __init__(self, idle: str, hog: str, history: Path) -> None:
        self.idle = idle
        self.hog = hog
        self.history = history
        #: The steps ``advise --apply --yes`` took, as it printed them.
        self.shrunk: List[Dict[str, Any]] = []

    def steps(self) -> Dict[str, Dict[str, Any]]:
        """The step memory kept in the history, by domain name (read-only, as any reader)."""
        with sqlite3.connect(f"file:{self.history}?mode=ro", uri=True) as db:
            if not db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'step'").fetchone()[0]:
                return {}
            rows = db.execute(
                "SELECT domain.name, step.state FROM step JOIN domain ON domain.id = step.domain_id"
            )
            return {name: json.loads(state) for name, state in rows}


@pytest.fixture(scope="module")
def guests(libvirt_conn: Any, tmp_path_factory: Any) -> Iterator[Guests]:
    """The two guests and their history; ``libvirt_conn`` fails the module under CI=true when the
    testbed cannot be reached (and skips it elsewhere), as every integration test does."""
    domains = Domains()
    tmp = tmp_path_factory.mktemp("balloon")
    history = tmp / "history.sqlite"
    try:
        [idle] = create_many(domains, 1, "virtio", "bal-idle", "--memory", str(MEMORY_MIB), wait=True)
        [hog] = create_many(domains, 1, "virtio", "bal-hog", "--memory", str(MEMORY_MIB),
                            "--hog", str(HOG_MIB),
                            "--hog-below", str(HOG_BELOW_MIB), wait=True)
        recorder = Recorder(history, tmp / "record.log", [idle, hog])
        try:
            time.sleep(MIN_HISTORY + 6)
            assert recorder.alive(), (tmp / "record.log").read_text()
            yield Guests(idle, hog, history)
        finally:
            assert recorder.stop() == 0, (tmp / "record.log").read_text()
    finally:
        domains.destroy_all()


def actual(name: str) -> int:
    """Bytes: the balloon size libvirt reports (``virsh dommemstat``'s actual)."""
    return dommemstat(name)["actual"] * 1024


def current_memory(name: str) -> int:
    """Bytes: the live XML's ``<currentMemory>``, the target libvirt last asked of the balloon."""
    return int(virsh("dominfo", name).split("Used memory:")[1].split()[0]) * 1024


def lines(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_1_apply_without_yes_changes_nothing(guests: Guests):
    before = {name: actual(name) for name in (guests.idle, guests.hog)}
    proc = vbs("advise", "--apply", "--history", str(guests.history), *STEPPING, guests.idle, guests.hog)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "dry run: nothing was changed; add --yes to make these calls\n"
    said = proc.stdout.splitlines()
    assert len(said) == 2 and all(" dry run, not applied: " in line for line in said), said
    for line in said:
        size = int(line.split("setMemoryFlags(")[1].split(",")[0]) * 1024
        assert MEMORY_MIB * MiB * (1 - STEP) - MiB <= size < MEMORY_MIB * MiB, line
    time.sleep(2)
    assert {name: actual(name) for name in before} == before
    assert guests.steps() == {}


def test_2_a_stopped_qemu_is_left_alone_and_the_other_guest_stepped(guests: Guests):
    before = actual(guests.idle)
    with stopped(guests.idle):
        proc = vbs("advise", "--apply", "--yes", "--format", "json", "--timeout", "3", "--history",
                   str(guests.history), *STEPPING, guests.idle, guests.hog)
        time.sleep(1)
        assert actual_unchanged_while_stopped(guests.idle, before)
    out = {doc["domain"]: doc for doc in lines(proc.stdout)}
    assert proc.returncode == 1, "a domain that could not be read fails the run, as in 'stats'"
    assert out[guests.idle]["target"] is None
    assert out[guests.idle]["reason"].startswith("left alone: unresponsive")
    step = out[guests.hog]
    guests.shrunk.append(step)
    assert step["applied"] and step["action"] == "shrink"
    assert step["actual"] - step["target"] <= STEP * step["actual"]
    wait_for(lambda: abs(actual(guests.hog) - step["target"]) <= 2 * MiB, timeout=20,
             what=f"{guests.hog}'s balloon to reach {step['target']}")
    assert current_memory(guests.hog) == step["target"]
    assert actual(guests.idle) == before
    assert guests.idle not in guests.steps()
    assert guests.steps()[guests.hog]["last"]["target"] == step["target"]


def actual_unchanged_while_stopped(name: str, before: int) -> bool:
    """libvirt answers dominfo from its own records while the QEMU is stopped."""
    return current_memory(name) == before


class Balloon:
    """The installed ``balloon`` in its own process; its JSON lines collected as they come."""

    def __init__(self, guests: Guests, *names: str, extra: Optional[List[str]] = None) -> None:
        self.proc = subprocess.Popen(
            [CLI, "balloon", "--yes", "--format", "json", "--interval", str(INTERVAL), "--history",
             str(guests.history), *STEPPING, *(extra or []), *names],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.seen: List[Dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            doc = json.loads(line)
            doc["seen_at"] = time.time()
            self.seen.append(doc)

    def said(self) -> List[str]:
        """What it said, short: for a failing assertion."""
        return [f"{d['at'] % 1000:.1f} {d['action']} {(d['actual'] or 0) / MiB:.0f}->"
                f"{(d['target'] or 0) / MiB:.0f} {d['reason']}" for d in self.seen]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(5)
        return self.proc.wait()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""


def console(name: str) -> str:
    return (QEMU_LOG_DIR / f"{name}-console.log").read_text(errors="replace")


def test_3_balloon_shrinks_step_by_step_and_pressure_gives_memory_back(guests: Guests):
    """The hog starts once a shrink took the guest's MemTotal under 220 MiB: it fits, but leaves the
    guest short (available under 20 %), and the next pass gives the shrink back."""
    hog = guests.hog
    balloon = Balloon(guests, hog)
    try:
        wait_for(lambda: any(d["action"] in ("return", "grow") for d in balloon.seen), timeout=150,
                 what=f"{hog} to be shrunk until its hog runs short, then given memory back", step=0.2)
        back = next(d for d in balloon.seen if d["action"] in ("return", "grow"))
        shrinks = [d for d in balloon.seen if d["action"] == "shrink" and d["at"] < back["at"]]
        assert len(shrinks) >= 1, balloon.said()
        chain = guests.shrunk[-1:] + shrinks  # test 2's step, then this run's
        assert len(chain) >= 2, balloon.said()
        for previous, step in zip(chain, chain[1:]):
            assert step["applied"] and step["actual"] - step["target"] <= STEP * step["actual"]
            assert abs(step["actual"] - previous["target"]) <= 2 * MiB, "a step starts where the last settled"
        assert "hog holds" in console(hog), "the hog started once the guest was shrunk"
        # The pressure that the last shrink caused gave the memory back within two intervals.
        assert back["applied"] and back["target"] > back["actual"], back
        assert "pressure" in back["reason"] and "floor raised" in back["reason"], back
        waited = back["at"] - shrinks[-1]["at"]
        assert waited <= 2 * INTERVAL + 1, f"memory came back {waited:.1f} s after the shrink that pressed"
        wait_for(lambda: abs(actual(hog) - back["target"]) <= 2 * MiB, timeout=20,
                 what=f"{hog}'s balloon to give back to {back['target']}")
        print(f"\n{hog}: shrinks to {[round(d['target'] / MiB) for d in shrinks]} MiB; pressure "
              f"({back['reason']}); {back['action']} to {back['target'] / MiB:.0f} MiB {waited:.1f} s after "
              "the last shrink")
        time.sleep(INTERVAL + 1)
        # Held: no shrink after the pressure, and no OOM kill in the guest.
        assert not any(d["action"] == "shrink" and d["at"] > back["at"] for d in balloon.seen), balloon.said()
        log = console(hog)
        for sign in ("Out of memory", "oom-kill", "Killed process"):
            assert sign not in log, log[-2000:]
    finally:
        assert balloon.stop() == 0, balloon.stderr()
    memory = guests.steps()[hog]
    assert memory["raised_floor"][0] >= back["target"] and memory["hold_until"] > time.time()


def test_4_sigterm_during_a_pass_leaves_no_half_made_step(guests: Guests):
    """SIGTERM lands while a pass waits on the stopped QEMU: the pass ends whole, then the process."""
    idle = guests.idle
    balloon = Balloon(guests, idle, guests.hog, extra=["--timeout", "3"])
    try:
        wait_for(lambda: any(d["domain"] == idle for d in balloon.seen), timeout=60,
                 what="the first pass")
        with stopped(idle):
            time.sleep(INTERVAL + 1)  # the next pass is waiting on the stopped QEMU (up to --timeout)
            balloon.proc.send_signal(signal.SIGTERM)
            code = balloon.proc.wait(timeout=20)
        assert code == 0, balloon.stderr()
    finally:
        balloon.stop()
    kept = guests.steps()
    for name in (idle, guests.hog):
        if name in kept and kept[name]["last"] is not None:
            # The history remembers the step libvirt was last asked for: nothing half made.
            assert kept[name]["last"]["target"] == current_memory(name), name
    steps = [d for d in balloon.seen if d["target"] is not None]
    assert all(d["applied"] for d in steps), steps
    assert os.path.exists(guests.history)

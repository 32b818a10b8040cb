"""``record`` then ``advise``, on real guests: the advice against what ``virsh`` says they hold.

One test, kept short (its recording lasts about 100 s): three guests, an
idle one, one holding 100 MiB (``--hog``) and one without a balloon driver,
are recorded every 2 s by the installed ``record``. That recorder is
SIGKILLed at a random moment; ``advise`` reads the file it left, and a new
``record`` takes the file over (the kernel dropped the dead writer's lock).
Then ``advise --min-history 60s`` runs while the second recorder writes.
The expected figures come from ``virsh dommemstat`` and
:class:`~virt_balloon_stats.advice.Policy`'s defaults, not from the advice.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

from tests.integration.conftest import Domains, wait_for
from tests.integration.test_cli import CLI, dommemstat, vbs
from virt_balloon_stats.advice import Policy

#: Seconds between the recorder's cycles.
INTERVAL = 2
#: Usable history ``advise`` asks for, and how long the second recorder runs before it is asked.
MIN_HISTORY = 60
RECORD_FOR = MIN_HISTORY + 20


class Recorder:
    """The installed ``record`` in its own process, its log in a file."""

    def __init__(self, history: Path, log: Path, names: List[str]) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [CLI, "record", "--interval", str(INTERVAL), "--history", str(history), *names],
                stdout=subprocess.DEVNULL, stderr=err, text=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def points(history: Path) -> int:
    """Rows in the file, read as any other reader would (read-only, WAL)."""
    try:
        with sqlite3.connect(f"file:{history}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM point").fetchone()[0])
    except sqlite3.Error:  # not created yet, or no schema yet
        return 0


def advise(history: Path, *names: str) -> Dict[str, Dict[str, Any]]:
    proc = vbs("advise", "--history", str(history), "--min-history", f"{MIN_HISTORY}s", "--format", "json",
               *names)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    docs = json.loads(proc.stdout)
    return {doc["domain"]: doc for doc in docs}


def test_record_then_advise(domains: Domains, tmp_path: Path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        # 384 MiB each: <memory> caps no recommendation, even one widened by half for a short history.
        idle_f = pool.submit(domains.create, "virtio", "adv-idle", "--memory", "384", wait_stats=True)
        hog_f = pool.submit(domains.create, "virtio", "adv-hog", "--memory", "384", "--hog", "100",
                            wait_stats=True)
        nodrv_f = pool.submit(domains.create, "virtio", "adv-nodrv", "--guest", "nodriver")
        idle, hog, nodrv = idle_f.result(), hog_f.result(), nodrv_f.result()
    names = [idle, hog, nodrv]
    history = tmp_path / "history.sqlite"

    # A recorder killed at a random moment of its cycles: the file stays readable, its lock is taken over.
    first = Recorder(history, tmp_path / "record1.log", names)
    try:
        wait_for(lambda: points(history) >= 3, timeout=30, what="the first recorder's first points")
        time.sleep(random.uniform(0, 3 * INTERVAL))
        assert first.alive(), first.log.read_text()
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    after_kill = advise(history, *names)
    assert sorted(after_kill) == sorted(names)
    assert all(doc["recommended"] is None for doc in after_kill.values()), "under a minute recorded yet"

    second = Recorder(history, tmp_path / "record2.log", names)
    try:
        began = time.monotonic()
        wait_for(lambda: Path(f"{history}.lock").read_text().startswith(f"{second.proc.pid}\n"),
                 timeout=15, what="the second recorder to take the lock over")
        recorded = points(history)
        wait_for(lambda: points(history) > recorded, timeout=15, what="the second recorder's points")
        time.sleep(max(0.0, RECORD_FOR - (time.monotonic() - began)))
        assert second.alive(), second.log.read_text()
        stat = dommemstat(hog)
        hog_used = (stat["available"] - stat["usable"]) * 1024  # what the guest says it uses now, in KiB
        docs = advise(history, *names)
        recorded = points(history)
        wait_for(lambda: points(history) > recorded, timeout=10, what="the recorder to go on after advise")
    finally:
        code = second.stop()
    assert code == 0, second.log.read_text()
    assert "already writes" not in second.log.read_text()

    policy = Policy()
    margin = max(policy.margin_fraction * hog_used, policy.margin_min_bytes)
    assert hog_used >= 100 * 2**20, f"the hog guest holds its 100 MiB: {stat}"
    assert docs[hog]["recommended"] >= hog_used + margin, (stat, docs[hog])
    assert docs[idle]["reclaimable"] > 0, docs[idle]
    assert docs[idle]["actual"] == 384 * 2**20
    for name in (idle, hog):
        assert docs[name]["history_seconds"] >= MIN_HISTORY and docs[name]["confidence"] > 0, docs[name]
    assert docs[nodrv]["recommended"] is None and docs[nodrv]["reclaimable"] is None, docs[nodrv]
    assert docs[nodrv]["reason"].startswith("insufficient history"), docs[nodrv]
    assert os.path.exists(f"{history}.lock"), "the lock file stays; only the lock goes with its holder"

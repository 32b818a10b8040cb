"""virt_balloon_stats.ballooning and the commands on it: decisions carried out, kept and logged.

A real collector over the fake libvirt World of recorded domains (the
``step`` scenario: a 384 MiB guest, recorded with its ``jobInfo`` and the
host's ``getMemoryStats``), a real history file in ``tmp_path`` filled with
days of points, and the Ballooner on one pinned clock. The balloon does not
move by itself in the fake: a test that needs the guest to follow a step
sets the recorded ``actual`` itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from typing import Any, Dict, Iterator, List, Optional

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import URI, World, load, now_for, recorded_error
from virt_balloon_stats.advice import Point, Policy
from virt_balloon_stats.ballooning import Ballooner, News, Outcome
from virt_balloon_stats.cli import main
from virt_balloon_stats.collector import Collector
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.history import History
from virt_balloon_stats.stepping import Action, Memory, StepPolicy, memory_from_dict

MiB = 2**20
DAY = 86400.0
STEP = 300.0
SIZE = 384 * MiB  # the step scenario's balloon size
NAME = "vbs-tb-rec-step"


class Harness:
    """The step scenario's world (and more recorded domains), its collector, and a filled history."""

    def __init__(self, path: str, *others: str, live: bool = False) -> None:
        fixtures = [load("step"), *(load(name) for name in others)]
        self.now = now_for(fixtures[0])
        if live:  # for the commands, whose clocks are the real one: the figures are as fresh as now
            self.now = time.time()
            fixtures[0]["memory_stats"]["last_update"] = int(self.now)
            fixtures[0]["all_domain_stats"]["balloon.last-update"] = int(self.now)
        self.world = World(fixtures, now=self.now)
        self.fixture = fixtures[0]
        self.domain = self.world.domains[0]
        self.uuid = self.domain.UUIDString()
        self.collector = Collector(clients=[self.world.client], timeout=5.0, clock=lambda: self.now)
        self.path = path
        with History.open(path, writer=True, clock=lambda: self.now) as history:
            for fixture in fixtures:
                info = fixture["domain"]
                count = int(3 * DAY / STEP)
                for i in range(count):
                    point = Point(self.now - (count - i) * STEP, STEP, STEP, 40 * MiB, SIZE)
                    history.record(info["uuid"], info["name"], point)
        self.history: Optional[History] = None

    def ballooner(self, apply: bool = True, **kwargs: Any) -> Ballooner:
        if self.history is None:
            self.history = History.open(self.path, writer=False, stepper=apply, clock=lambda: self.now)
        return Ballooner(self.collector, self.history, Policy(), kwargs.pop("policy", StepPolicy()),
                         apply=apply, clock=lambda: self.now, **kwargs)

    def follow(self, target: int) -> None:
        """The guest's balloon reached ``target`` (as the step recording shows libvirt then reports)."""
        self.fixture["memory_stats"]["actual"] = target // 1024
        self.fixture["all_domain_stats"]["balloon.current"] = target // 1024
        self.world.transport.answer(self.uuid, {"execute": "query-balloon"},
                                    json.dumps({"return": {"actual": target}}))
        self.fixture["xml_live"] = self.fixture["xml_live"].replace(
            "<currentMemory unit='KiB'>393216</currentMemory>", f"<currentMemory unit='KiB'>{target // 1024}"
            "</currentMemory>")

    def calls(self) -> List[Any]:
        return [args for call, args in self.domain.calls if call == "setMemoryFlags"]

    def kept(self) -> Dict[str, Memory]:
        with History.open(self.path, writer=False) as reader:
            return {uuid: memory_from_dict(json.loads(text)) for uuid, text in reader.steps().items()}

    def close(self) -> None:
        self.collector.stop()
        if self.history is not None:
            self.history.close()


@pytest.fixture
def harness(tmp_path: Any) -> Iterator[Harness]:
    with contextlib.closing(Harness(str(tmp_path / "history.sqlite"))) as h:
        yield h


def one(h: Harness, ballooner: Ballooner) -> Outcome:
    [outcome] = [o for o in ballooner.on_cycle(h.collector.collect()) if o.uuid == h.uuid]
    return outcome


# -- dry run and apply -----------------------------------------------------------------------------------


def test_a_dry_run_prints_the_exact_call_and_changes_nothing(harness):
    outcome = one(harness, harness.ballooner(apply=False))
    # 5 % of 384 MiB is 19.2 MiB: a step in whole MiB.
    assert outcome.action is Action.SHRINK and outcome.target == SIZE - 19 * MiB
    assert outcome.call == f"setMemoryFlags({(SIZE - 19 * MiB) // 1024}, VIR_DOMAIN_AFFECT_LIVE)"
    assert not outcome.applied and outcome.error is None
    assert outcome.line() == (f"{NAME}: shrink 384 MiB -> 365 MiB "
                              "(setMemoryFlags(373760, VIR_DOMAIN_AFFECT_LIVE)) "
                              "dry run, not applied: shrink toward recommended 128 MiB by 19 MiB")
    assert harness.calls() == [] and harness.kept() == {}


def test_a_step_is_kept_before_it_is_asked_then_counted(harness):
    ballooner = harness.ballooner()
    seen: List[Dict[str, Memory]] = []
    real = harness.domain.setMemoryFlags

    def asked(memory: int, flags: int = 0) -> int:  # at the libvirt boundary: what the history held then
        seen.append(harness.kept())
        return real(memory, flags)

    harness.domain.setMemoryFlags = asked
    outcome = one(harness, ballooner)
    assert outcome.applied and outcome.line().endswith("done: shrink toward recommended 128 MiB by 19 MiB")
    assert harness.calls() == [(373760, libvirt.VIR_DOMAIN_AFFECT_LIVE)]
    [before_call] = seen
    memory = before_call[harness.uuid]
    assert memory.last is not None and memory.last.target == SIZE - 19 * MiB and not memory.settled
    assert memory.ceiling == SIZE
    assert harness.kept() == before_call
    assert ballooner.steps == {("down", "advice"): 1} and ballooner.taken == 19 * MiB


def test_the_next_pass_waits_for_the_step_to_settle_then_steps_from_there(harness):
    ballooner = harness.ballooner()
    first = one(harness, ballooner)
    harness.now += 5
    waiting = one(harness, ballooner)
    assert waiting.target is None and waiting.reason.startswith("settling: 384 MiB on the way to 365 MiB")
    harness.follow(first.target)
    harness.now += 5
    second = one(harness, ballooner)
    assert second.action is Action.SHRINK and second.target == first.target - 18 * MiB  # 5 % of 365 MiB
    assert len(harness.calls()) == 2
    kept = harness.kept()[harness.uuid]
    assert kept.ceiling == SIZE, "the ceiling stays the size stepping began at"


def test_a_step_that_never_settles_holds_the_guest(harness):
    ballooner = harness.ballooner()
    one(harness, ballooner)
    harness.now += StepPolicy().settle_seconds + 1
    held = one(harness, ballooner)
    assert held.target is None and "did not reach 365 MiB within 120 s" in held.reason
    assert harness.kept()[harness.uuid].hold_until == harness.now + StepPolicy().cooldown_seconds


def test_a_refused_call_puts_the_memory_back_and_is_reported(harness):
    harness.domain.fail("setMemoryFlags", recorded_error("read-only-set-memory"))
    ballooner = harness.ballooner()
    outcome = one(harness, ballooner)
    assert not outcome.applied and outcome.error is not None
    assert "read only access prevents virDomainSetMemoryFlags" in outcome.error
    assert " failed: " in outcome.line()
    assert harness.kept() == {harness.uuid: Memory()}
    assert ballooner.failures == {"down": 1} and not ballooner.steps and ballooner.taken == 0


def test_a_restart_resumes_from_the_history(harness):
    one(harness, harness.ballooner())
    harness.history.close()
    harness.history = None
    harness.follow(SIZE - 19 * MiB)
    harness.now += 5
    again = one(harness, harness.ballooner())
    assert again.target == SIZE - 19 * MiB - 18 * MiB, "the step made before the restart is not repeated"


# -- domains left alone ----------------------------------------------------------------------------------


def test_stale_and_paused_domains_are_left_alone_without_a_call_to_them(tmp_path):
    with contextlib.closing(Harness(str(tmp_path / "history.sqlite"), "stale", "paused")) as h:
        cycle = h.collector.collect()
        read = {d.name(): len(d.calls) for d in h.world.domains}
        outcomes = {o.domain: o for o in h.ballooner().on_cycle(cycle)}
        for name, status in (("vbs-tb-rec-stale", "stale"), ("vbs-tb-rec-paused", "paused")):
            assert outcomes[name].target is None and outcomes[name].reason.startswith(f"left alone: {status}")
            domain = next(d for d in h.world.domains if d.name() == name)
            assert len(domain.calls) == read[name], "no call beyond the cycle's own"
        assert outcomes[NAME].applied


def test_a_job_on_the_domain_stops_the_step(harness):
    harness.fixture["job_info"] = [libvirt.VIR_DOMAIN_JOB_UNBOUNDED] + [0] * 11
    outcome = one(harness, harness.ballooner())
    assert outcome.target is None and outcome.reason.startswith("a job runs on it")
    assert harness.calls() == []


def test_a_damaged_step_record_leaves_that_guest_alone(harness):
    with History.open(harness.path, writer=False, stepper=True) as stepper:
        stepper.save_step(harness.uuid, '{"last": "x"}')
    outcome = one(harness, harness.ballooner())
    assert outcome.target is None and outcome.error is not None
    assert outcome.line().startswith(f"{NAME}: left alone: its step record in the history is damaged")
    assert harness.calls() == []


# -- budgets ---------------------------------------------------------------------------------------------


def test_the_host_target_reads_libvirts_host_memory(harness):
    node = harness.fixture["node_memory_stats"]
    available = (node["free"] + node["cached"] + node["buffers"]) * 1024
    spare = one(harness, harness.ballooner(apply=False, target_host_available=available - MiB))
    assert spare.target is None and spare.reason == "the host has memory to spare: no shrink"
    short = one(harness, harness.ballooner(apply=False, target_host_available=available + MiB))
    assert short.action is Action.SHRINK
    assert [c for c, _ in harness.world.conn.calls].count("getMemoryStats") == 2


def test_a_host_whose_memory_is_unknown_gets_no_step_under_a_target(harness):
    harness.world.conn.node_memory_stats = {}
    outcome = one(harness, harness.ballooner(target_host_available=1))
    assert outcome.target is None and outcome.error is not None
    assert outcome.error.startswith(
        "the host's available memory is unknown: getMemoryStats() gave no free memory"
    )
    assert harness.calls() == []


def test_max_total_bounds_the_whole_run(harness):
    ballooner = harness.ballooner(max_total=25 * MiB)
    assert one(harness, ballooner).target == SIZE - 19 * MiB
    harness.follow(SIZE - 19 * MiB)
    harness.now += 5
    cut = one(harness, ballooner)
    assert cut.target == SIZE - 25 * MiB and cut.reason.endswith("cut to 6 MiB by --max-total")
    harness.follow(SIZE - 25 * MiB)
    harness.now += 5
    assert one(harness, ballooner).reason == "--max-total reached: no shrink"


def test_bad_bounds_are_refused(harness):
    with pytest.raises(InvalidArgument):
        harness.ballooner(max_total=-1)


# -- what is told ----------------------------------------------------------------------------------------


def test_the_counters_go_to_a_textfile(harness, tmp_path):
    ballooner = harness.ballooner()
    one(harness, ballooner)
    path = tmp_path / "balloon.prom"
    ballooner.write_textfile(str(path))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(path.read_text()) for s in family.samples}
    assert samples[("virt_balloon_balloon_steps_total", (("direction", "down"), ("reason", "advice")))] == 1
    assert samples[("virt_balloon_balloon_steps_total", (("direction", "up"), ("reason", "pressure")))] == 0
    assert samples[("virt_balloon_balloon_taken_bytes_total", ())] == 19 * MiB


def test_news_tells_every_step_and_other_outcomes_once_until_they_change():
    def outcome(reason: str, target: Optional[int] = None) -> Outcome:
        return Outcome(0.0, URI, "web1", "u1", Action.NONE if target is None else Action.SHRINK, SIZE, target,
                       reason)

    news = News()
    assert len(news([outcome("held for 1790 s more")])) == 1
    assert news([outcome("held for 1780 s more")]) == [], "the same state, other figures"
    assert len(news([outcome("shrink", SIZE - MiB)])) == 1
    assert len(news([outcome("shrink", SIZE - 2 * MiB)])) == 1, "every step is told"
    assert len(news([outcome("at its goal, 128 MiB")])) == 1


def test_an_outcome_is_one_json_document():
    o = Outcome(1.5, URI, "web1", "u1", Action.GROW, 100 * MiB, 105 * MiB, "grow", applied=True)
    assert json.loads(json.dumps(o.to_dict())) == {
        "at": 1.5, "uri": URI, "domain": "web1", "uuid": "u1", "action": "grow", "actual": 100 * MiB,
        "target": 105 * MiB, "reason": "grow", "applied": True, "error": None,
        "call": "setMemoryFlags(107520, VIR_DOMAIN_AFFECT_LIVE)",
    }


# -- the commands ----------------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Any) -> Iterator[Harness]:
    with contextlib.closing(Harness(str(tmp_path / "history.sqlite"), live=True)) as h:
        yield h


def run_cli(harness: Harness, monkeypatch: Any, *argv: str) -> Any:
    monkeypatch.setattr(libvirt, "open", lambda uri: harness.world.conn)
    out, err = io.StringIO(), io.StringIO()
    try:
        code = main(["-c", URI, *argv, "--source", "libvirt"], out=out, err=err)
    except SystemExit as exit:  # argparse refused an option value
        code = exit.code
    return code, out.getvalue(), err.getvalue()


def test_advise_apply_without_yes_is_a_dry_run(live, monkeypatch):
    code, out, err = run_cli(live, monkeypatch, "advise", "--apply", "--history", live.path, NAME)
    assert code == 0, err
    assert out == (f"{NAME}: shrink 384 MiB -> 365 MiB "
                   "(setMemoryFlags(373760, VIR_DOMAIN_AFFECT_LIVE)) dry run, "
                   "not applied: shrink toward recommended 128 MiB by 19 MiB\n")
    assert err == "dry run: nothing was changed; add --yes to make these calls\n"
    assert live.calls() == [] and live.kept() == {}


def test_advise_apply_yes_takes_one_step_as_json(live, monkeypatch):
    code, out, err = run_cli(live, monkeypatch, "advise", "--apply", "--yes", "--format", "json",
                             "--step", "10%", "--history", live.path, NAME)
    assert (code, err) == (0, "")
    [doc] = [json.loads(line) for line in out.splitlines()]
    assert doc["applied"] and doc["target"] == SIZE - 38 * MiB and doc["action"] == "shrink"
    assert live.calls() == [((SIZE - 38 * MiB) // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["advise", "--apply", "--prometheus", "http://127.0.0.1:9"], "give --history, not --prometheus"),
        (["advise", "--apply", "--max-total=-5M"], "not a size"),
        (["advise", "--apply", "--format", "prometheus"], "its counters go to --textfile"),
        (["advise", "--apply", "--step", "0"], "a percentage over 0"),
        (["advise", "--apply", "--step-max", "12Q"], "not a size"),
        (["advise", "--apply", "--min-confidence", "2"], "a number from 0 to 1"),
        (["balloon", "--yes", "-r"], "a read-only connection refuses"),
        (["balloon", "--step-max", "1000"], "--step-max must be at least 1M"),
    ],
)
def test_bad_options_are_refused_before_anything_is_done(live, monkeypatch, argv, says, capsys):
    history = [] if "--prometheus" in argv else ["--history", live.path]
    code, out, err = run_cli(live, monkeypatch, *argv, *history, "--all" if argv[0] == "balloon" else NAME)
    err += capsys.readouterr().err
    assert code == 2 and out == "" and says in err
    assert live.calls() == []


def test_balloon_runs_passes_and_writes_its_textfile(live, monkeypatch, tmp_path):
    textfile = tmp_path / "steps.prom"
    code, out, err = run_cli(live, monkeypatch, "balloon", "--yes", "--count", "1", "--interval", "1",
                             "--textfile", str(textfile), "--history", live.path, "--all")
    assert code == 0, err
    assert out.startswith(f"{NAME}: shrink 384 MiB -> 365 MiB") and " done: " in out
    assert 'virt_balloon_balloon_steps_total{direction="down",reason="advice"} 1.0' in textfile.read_text()


def test_a_textfile_that_cannot_be_written_is_one_line_and_the_loop_goes_on(live, monkeypatch, tmp_path):
    textfile = tmp_path / "missing" / "steps.prom"
    code, out, err = run_cli(live, monkeypatch, "balloon", "--count", "2", "--interval", "0.1",
                             "--textfile", str(textfile), "--history", live.path, "--all")
    assert code == 0 and out.count(" dry run, not applied: ") == 2, (out, err)
    assert err == f"textfile: cannot write {textfile}: No such file or directory\n"


@pytest.mark.parametrize("text, size", [("512M", 512 * MiB), ("2GiB", 2 * 1024 * MiB), ("1.5g", 1536 * MiB),
                                        ("4096k", 4 * MiB), ("1000", 1000), (" 3 T ", 3 * 2**40)])
def test_sizes_read_as_virsh_reads_them(text, size):
    from virt_balloon_stats.cli.common import size as parse

    assert parse(text) == size


@pytest.mark.parametrize("text", ["-5M", "1e3", "12Q", "", "M", "9" * 400, "99999999999T"])
def test_what_is_no_size_is_refused(text):
    import argparse

    from virt_balloon_stats.cli.common import size as parse

    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_the_advice_is_made_again_only_every_advise_every_or_after_a_restart(harness):
    """Judging a domain reads its window and its XML: once per advise_every, not every pass."""
    ballooner = harness.ballooner(apply=False, advise_every=600.0)

    def xml_calls() -> int:
        return sum(1 for call, _ in harness.domain.calls if call == "XMLDesc")

    one(harness, ballooner)
    made = xml_calls()
    harness.now += 599
    one(harness, ballooner)
    assert xml_calls() == made, "within advise_every the advice is reused"
    harness.now += 2
    one(harness, ballooner)
    assert xml_calls() == made + 1
    with pytest.raises(InvalidArgument):
        harness.ballooner(advise_every=0)


def test_the_balloon_commands_default_advise_every_is_the_ballooners():
    from virt_balloon_stats.ballooning import DEFAULT_ADVISE_EVERY_SECONDS
    from virt_balloon_stats.cli.long_running import _BALLOON_ADVISE_EVERY

    assert _BALLOON_ADVISE_EVERY == DEFAULT_ADVISE_EVERY_SECONDS

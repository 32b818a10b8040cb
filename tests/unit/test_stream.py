"""virt_balloon_stats.stream: JSON Lines over a real collector's cycles.

Cycles come from a real :class:`~virt_balloon_stats.collector.Collector` over
fake libvirt domains and recorded QMP replies. The reader end is a small
text stream of the test's own that records each write and flush, and can
ask the collector to stop or raise ``BrokenPipeError`` as a closed pipe does.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, List, Optional, Tuple

import pytest

from tests.unit.conftest import World, load, now_for
from virt_balloon_stats import cli
from virt_balloon_stats.collector import Collector, Cycle
from virt_balloon_stats.stream import JsonLines

TIMEOUT = 5.0

NAMES = ["virtio", "nostats", "none"]


class Pipe(io.StringIO):
    """A reader's end: records every write and what had been written at each flush.

    :param on_line: Called after each flush with the number of lines flushed so far.
    :param broken_at: Raise BrokenPipeError on this write or flush (``("write", n)``,
        1-based), as writing to a pipe whose reader has gone does.
    """

    def __init__(
        self, on_line: Optional[Callable[[int], None]] = None, broken_at: Optional[Tuple[str, int]] = None
    ) -> None:
        super().__init__()
        self.writes: List[str] = []
        self.flushed: List[str] = []
        self._on_line = on_line
        self._broken_at = broken_at

    def _maybe_break(self, what: str, count: int) -> None:
        if self._broken_at == (what, count):
            raise BrokenPipeError(32, "Broken pipe")

    def write(self, text: str) -> int:
        self._maybe_break("write", len(self.writes) + 1)
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self._maybe_break("flush", len(self.flushed) + 1)
        super().flush()
        self.flushed.append(self.getvalue())
        if self._on_line is not None:
            self._on_line(len(self.flushed))


def _collector(names: List[str] = NAMES) -> Collector:
    fixtures = [load(n) for n in names]
    w = World(fixtures, now=now_for(fixtures[0]))
    return Collector(clients=[w.client], timeout=TIMEOUT)


def _docs(text: str) -> List[Any]:
    return [json.loads(line) for line in text.splitlines()]


def test_one_line_per_sample_each_the_json_document_and_flushed():
    """Each domain is one line, the document of stats --format json, written whole and flushed at once."""
    collector = _collector()
    pipe = Pipe()
    lines = JsonLines(collector, pipe)
    try:
        cycle = collector.collect()
        lines(cycle)
    finally:
        collector.stop()
    assert len(cycle.samples) == len(NAMES)
    assert _docs(pipe.getvalue()) == [json.loads(json.dumps(s.to_dict())) for s in cycle.samples]
    assert [d["domain"] for d in _docs(pipe.getvalue())] == [s.domain for s in cycle.samples]
    assert [d["status"] for d in _docs(pipe.getvalue())] == [s.status.value for s in cycle.samples]
    # One write per line, a flush right after it: a reader never sees half a line.
    assert len(pipe.writes) == len(cycle.samples)
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in pipe.writes)
    assert pipe.flushed == ["".join(pipe.writes[: i + 1]) for i in range(len(pipe.writes))]
    assert lines.lines == len(cycle.samples) and not lines.closed


def test_stream_over_collector_run_writes_every_cycle():
    """As the collector's on_cycle: one line per domain per cycle, in cycle order."""
    collector = _collector()
    pipe = Pipe()
    lines = JsonLines(collector, pipe)
    cycles: List[Cycle] = []

    def on_cycle(cycle: Cycle) -> None:
        cycles.append(cycle)
        lines(cycle)

    try:
        collector.run(0.01, on_cycle, count=3)
    finally:
        collector.stop()
    assert len(cycles) == 3
    assert [(d["domain"], d["sampled_at"]) for d in _docs(pipe.getvalue())] == [
        (s.domain, round(s.sampled_at, 3)) for c in cycles for s in c.samples
    ]
    assert lines.lines == 3 * len(NAMES)


def test_request_stop_ends_the_stream_between_lines():
    """Asked to stop after the first line (SIGTERM): that line is whole, no other follows, the loop ends."""
    collector = _collector()
    pipe = Pipe(on_line=lambda n: collector.request_stop() if n == 1 else None)
    lines = JsonLines(collector, pipe)
    try:
        collector.run(0.01, lines, count=5)
    finally:
        collector.stop()
    assert collector.totals.cycles == 1
    assert len(_docs(pipe.getvalue())) == 1
    assert pipe.getvalue().endswith("\n")
    assert lines.lines == 1 and not lines.closed


def test_nothing_is_written_once_stop_was_requested():
    """A cycle handed over after the stop request writes nothing."""
    collector = _collector()
    pipe = Pipe()
    lines = JsonLines(collector, pipe)
    try:
        cycle = collector.collect()
        collector.request_stop()
        lines(cycle)
    finally:
        collector.stop()
    assert pipe.getvalue() == "" and lines.lines == 0


@pytest.mark.parametrize("broken_at", [("write", 1), ("flush", 1), ("write", 2), ("flush", 3)])
def test_broken_pipe_closes_the_stream_and_stops_the_collector(broken_at):
    """The reader went away (| head -1): closed is set, the collector asked to stop, nothing raised."""
    collector = _collector()
    pipe = Pipe(broken_at=broken_at)
    lines = JsonLines(collector, pipe)
    try:
        collector.run(0.01, lines, count=5)  # would run 5 cycles if the broken pipe did not stop it
    finally:
        collector.stop()
    assert lines.closed and collector.stopping
    assert collector.totals.cycles == 1
    whole = broken_at[1] - 1  # lines written and flushed before the pipe broke
    assert lines.lines == whole
    assert len(pipe.flushed) == whole


def test_closed_stream_writes_nothing_more():
    """After a broken pipe a later cycle is not written (a write would raise again)."""
    collector = _collector()
    pipe = Pipe(broken_at=("write", 1))
    lines = JsonLines(collector, pipe)
    try:
        cycle = collector.collect()
        lines(cycle)
        assert lines.closed
        lines(cycle)
    finally:
        collector.stop()
    assert pipe.writes == [] and lines.lines == 0


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "prometheus"])
def test_cli_stream_refuses_format(fmt):
    """stream has its own output (JSON Lines): --format is a usage error, exit 2, before any connection."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["stream", "--all", "--format", fmt], out=out, err=err)
    assert code == 2 and out.getvalue() == ""
    assert "--format" in err.getvalue()

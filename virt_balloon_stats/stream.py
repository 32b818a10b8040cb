"""``stream``: JSON Lines, one document per domain per cycle, for agents reading a pipe.

Each line is the JSON document of ``stats --format json`` for one domain
(:meth:`Sample.to_dict`), written whole and flushed at once, so a reader never
sees a split or interleaved line. SIGTERM ends the stream after the line being
written; a reader that goes away (``| head -1``) ends it quietly.
"""

from __future__ import annotations

import json
from typing import TextIO

from virt_balloon_stats.collector import Collector, Cycle

__all__ = ["JsonLines"]


class JsonLines:
    """Writes each cycle of a collector as JSON lines.

    :param collector: Asked to stop when the reader has gone.
    :param out: Where the lines go (a pipe, usually).
    """

    def __init__(self, collector: Collector, out: TextIO) -> None:
        self.collector = collector
        self.out = out
        self.closed = False
        self.lines = 0

    def __call__(self, cycle: Cycle) -> None:
        """The ``on_cycle`` callback: one line per domain, stopping between lines when asked."""
        for sample in cycle.samples:
            if self.collector.stopping or self.closed:
                return
            line = json.dumps(sample.to_dict(), separators=(",", ":")) + "\n"
            try:
                self.out.write(line)
                self.out.flush()
            except BrokenPipeError:
                self.closed = True
                self.collector.request_stop()
                return
            self.lines += 1

#!/usr/bin/env python3
"""balloon-agent: stream the balloon figures of every running domain as JSON lines.

An example of a long-running agent (the shape of an OpenStack compute agent)
built on the public API of virt_balloon_stats only: a
:class:`~virt_balloon_stats.collector.Collector` does the work, the agent
only prints. Every interval it writes one JSON object per domain to stdout:
``Sample.to_dict()``, whose ``sampled_at`` says when that domain was read.
Diagnostics go to stderr, so stdout stays a clean stream for a pipe.

What the collector gets right for it:

* One domain failing must not cost the others: a failure is an
  ``unreachable`` sample, and a QEMU that does not answer within the
  interval is ``unresponsive`` and is not asked again until it does.
* A lost libvirt connection (libvirtd restarted) is noticed through
  libvirt's close callback and keepalive; its domains are ``unreachable``
  while the collector reconnects with backoff, and fresh again after.
* Domains started and destroyed while it runs come and go without errors.

SIGTERM (systemd, a supervisor) and SIGINT (Ctrl-C) end the current cycle,
not the middle of a line, and exit 0.

Exit status: 0 on a clean stop; 1 when ``--count`` cycles ran and none of
them could reach libvirt (a test run that measured nothing); 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import Optional, Sequence, TextIO

from virt_balloon_stats import SOURCES, silence_libvirt_stderr
from virt_balloon_stats.collector import Collector, Cycle

LOG = logging.getLogger("balloon-agent")


class Agent:
    """Prints each cycle of a collector as JSON lines.

    :param collector: The collector to run.
    :param out: Where the JSON lines go.
    """

    def __init__(self, collector: Collector, out: TextIO) -> None:
        self.collector = collector
        self.out = out
        self.reached = False

    def stop(self, signum: int, _frame: Optional[FrameType]) -> None:
        """Signal handler: finish the cycle in progress, then leave the loop."""
        LOG.info("%s received; stopping after this cycle", signal.Signals(signum).name)
        self.collector.request_stop()

    def emit(self, cycle: Cycle) -> None:
        """One line per domain, written and flushed at once so no line is ever split."""
        self.reached = self.reached or any(h.up for h in cycle.hosts.values())
        for problem in cycle.problems:
            LOG.error("%s: %s", problem.what, problem.error)
        lines = "".join(json.dumps(s.to_dict(), separators=(",", ":")) + "\n" for s in cycle.samples)
        self.out.write(lines)
        self.out.flush()


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _cycles(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloon-agent",
        description="Print the virtio-balloon figures of every running domain as JSON lines, "
                    "one per domain, every --interval seconds, until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("-c", "--connect", metavar="URI",
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
    parser.add_argument("--interval", type=_positive_seconds, default=10.0, metavar="S",
                        help="seconds between cycles (default: 10)")
    parser.add_argument("--source", choices=SOURCES, default="both",
                        help="where the figures come from, as for 'virt-balloon-stats stats' (default: both)")
    parser.add_argument("--count", type=_cycles, default=0, metavar="N",
                        help="stop after N cycles, failed ones included (default: 0, run until stopped)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    silence_libvirt_stderr()  # we log libvirt's errors ourselves, once
    collector = Collector([args.connect] if args.connect else None, source=args.source,
                          events=True, log_changes=True)
    agent = Agent(collector, sys.stdout)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    try:
        collector.run(args.interval, agent.emit, count=args.count)
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): nothing left to write to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        collector.stop()
    if args.count and not agent.reached:
        LOG.error("%d cycles ran and none reached libvirt", args.count)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""balloon-agent: stream the balloon figures of every running domain as JSON lines.

An example of a long-running collector (the shape of an OpenStack compute
agent) built on the public API of virt_balloon_stats only. Every interval it
samples every running domain and writes one JSON object per domain to stdout:
``Sample.to_dict()``, whose ``sampled_at`` says when that domain was read.
Diagnostics go to stderr, so stdout stays a clean stream for a pipe.

What it has to get right, and why:

* One domain failing must not cost the others: ``sample_many()`` turns a
  per-domain failure into an ``unreachable`` sample, which is printed like
  any other so the consumer sees the gap.
* A libvirt connection never recovers once lost (libvirtd restarted, socket
  gone), so on ``ConnectionFailed`` the agent drops it and opens a new one,
  backing off so a daemon that stays down is not hammered.
* SIGTERM (systemd, a supervisor) and SIGINT (Ctrl-C) end the current cycle,
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
import threading
import time
from types import FrameType
from typing import List, Optional, Sequence, TextIO

from virt_balloon_stats import (
    SOURCES,
    BalloonStats,
    BalloonStatsError,
    ConnectionFailed,
    Sample,
    default_uri,
    silence_libvirt_stderr,
)

LOG = logging.getLogger("balloon-agent")

#: First wait before reconnecting: libvirtd restarts in about a second.
FIRST_RETRY_SECONDS = 1.0
#: Longest wait between reconnection attempts, however long libvirtd stays down.
MAX_RETRY_SECONDS = 60.0


class Backoff:
    """Doubling delays between reconnection attempts, reset by a success."""

    def __init__(self, first: float = FIRST_RETRY_SECONDS, ceiling: float = MAX_RETRY_SECONDS) -> None:
        self.first = first
        self.ceiling = ceiling
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        self.failures += 1
        return min(self.first * 2.0 ** (self.failures - 1), self.ceiling)

    def reset(self) -> None:
        self.failures = 0


class Agent:
    """The sampling loop: one connection, reopened whenever it is lost.

    :param uri: libvirt URI; ``None`` means as virsh would choose it.
    :param interval: Seconds from the start of one cycle to the start of the next.
    :param source: One of ``SOURCES``, passed to ``sample_many()``.
    :param out: Where the JSON lines go.
    """

    def __init__(self, uri: Optional[str], interval: float, source: str, out: TextIO) -> None:
        self.uri = uri
        self.interval = interval
        self.source = source
        self.out = out
        self.stopping = threading.Event()
        self.backoff = Backoff()
        self.client: Optional[BalloonStats] = None

    def stop(self, signum: int, _frame: Optional[FrameType]) -> None:
        """Signal handler: finish the cycle in progress, then leave the loop."""
        LOG.info("%s received; stopping after this cycle", signal.Signals(signum).name)
        self.stopping.set()

    def run(self, count: int = 0) -> bool:
        """Cycle until stopped, or ``count`` cycles if ``count`` is not 0.

        :return: Whether at least one cycle reached libvirt.
        """
        cycles = 0
        reached = False
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                cycles += 1
                last = bool(count) and cycles >= count
                wait = self.interval
                try:
                    self.cycle()
                    reached = True
                    self.backoff.reset()
                except ConnectionFailed as err:
                    self.disconnect()
                    wait = self.backoff.next_delay()
                    LOG.error("%s: %s%s", self.uri or default_uri(), err,
                              "" if last else f"; reconnecting in {wait:g} s")
                except BalloonStatsError as err:
                    LOG.error("%s: cannot list the running domains: %s%s", self.uri or default_uri(), err,
                              "" if last else f"; retrying in {wait:g} s")
                if last:
                    break
                self.stopping.wait(max(0.0, wait - (time.monotonic() - started)))
        finally:
            self.disconnect()
        return reached

    def cycle(self) -> None:
        """Sample every running domain once and print one line per domain.

        :raise ConnectionFailed: When libvirt cannot be reached, or the
            connection was lost during the cycle.
        :raise BalloonStatsError: When the running domains cannot be listed.
        """
        if self.client is None:
            self.client = BalloonStats.open(self.uri)
            LOG.info("connected to %s", self.client.host.uri)
        samples = self.client.sample_many(source=self.source)
        self.emit(samples)
        lost = next((s.error for s in samples if isinstance(s.error, ConnectionFailed)), None)
        if lost is not None:
            # The samples already say unreachable; what is left is to reconnect.
            raise lost

    def emit(self, samples: Sequence[Sample]) -> None:
        lines: List[str] = []
        for sample in samples:
            lines.append(json.dumps(sample.to_dict(), separators=(",", ":")) + "\n")
        self.out.write("".join(lines))
        self.out.flush()

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


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
    agent = Agent(args.connect, args.interval, args.source, sys.stdout)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    try:
        reached = agent.run(args.count)
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): nothing left to write to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if args.count and not reached:
        LOG.error("%d cycles ran and none reached libvirt", args.count)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

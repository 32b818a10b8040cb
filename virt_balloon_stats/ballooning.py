"""Acting on reclaim advice for libvirt's domains: a cycle's figures in, balloon steps out, each logged.

:mod:`~virt_balloon_stats.stepping` decides from figures alone; this module
gives it each guest's figures and carries its decisions out. A
:class:`Ballooner` is given every cycle of a collector (``balloon`` runs it
every interval, ``advise --apply`` once). For each domain of the cycle it
builds the stepper's view:

- freshness and pause from the cycle's sample (status ``ok``): a stopped,
  unresponsive or stale QEMU is left alone without another call to it;
- for a fresh one only, the advice (:func:`~virt_balloon_stats.advising.advise_guest`:
  the history, and one ``XMLDesc`` for the balloon size; made again every
  ``advise_every``, 10 minutes) and ``jobInfo`` (a migration, a save or a
  dump: never step under a job);
- the ceiling: ``--max``, else the balloon size when stepping began,
  remembered in the history file, else the size now;
- the counters and available memory the pressure feedback reads.

Then :func:`~virt_balloon_stats.stepping.plan`, one host at a time, with
its available memory when a host target is set.

**Dry run unless told.** Without ``apply`` nothing is called and nothing
is kept: each decision comes out with the exact ``setMemoryFlags`` call it
would make. With it, the guest's memory (its step included, unsettled) is
written to the history file *before* ``setMemoryFlags`` is asked, and put
back if the call fails: a stepper killed between the two finds an
unsettled step it never made, waits for it to settle, times out and holds
the guest; it never repeats or undoes a step by mistake. SIGTERM is safer
still: the collector finishes the cycle in progress, this pass included.

Each step is counted (``virt_balloon_balloon_steps_total{direction,reason}``)
and comes out as one :class:`Outcome`, for a line of text or JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from virt_balloon_stats.advice import COUNTERS, Advice, MiB, Policy
from virt_balloon_stats.advising import advise_guest
from virt_balloon_stats.errors import (
    NEEDS_PROMETHEUS_CLIENT,
    BalloonStatsError,
    HistoryError,
    InvalidArgument,
    LibvirtFailure,
)
from virt_balloon_stats.stats import Status
from virt_balloon_stats.stepping import (
    Action,
    Decision,
    Guest as View,
    Memory,
    StepPolicy,
    memory_from_dict,
    memory_to_dict,
    plan,
)

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from virt_balloon_stats.collector import Collector, Cycle
    from virt_balloon_stats.history import History
    from virt_balloon_stats.host import Guest
    from virt_balloon_stats.sample import Sample

__all__ = ["Outcome", "Ballooner", "News", "call_of"]

LOG = logging.getLogger(__name__)

#: How long a domain's advice is used before it is made again (``--advise-every``; see ``_advice_of``).
DEFAULT_ADVISE_EVERY_SECONDS = 600.0

#: The QEMU names of the counters the pressure feedback reads.
_COUNTER_NAMES = tuple(spec.qemu for spec in COUNTERS.values())


def call_of(target: int) -> str:
    """The libvirt call a step makes, as an operator would type it in Python: whole KiB, live only."""
    return f"setMemoryFlags({target // 1024}, VIR_DOMAIN_AFFECT_LIVE)"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One domain's decision in one pass, and what became of it.

    :ivar at: Epoch seconds of the pass.
    :ivar uri: The connection.
    :ivar domain: The domain's name.
    :ivar uuid: Its UUID.
    :ivar action: What was decided.
    :ivar actual: Bytes: the balloon size it was decided on (``None``: not read).
    :ivar target: Bytes asked for (``None`` with no action).
    :ivar reason: Why, one line.
    :ivar applied: Whether ``setMemoryFlags`` was called and returned.
    :ivar error: Why the call failed, or why the domain could not be judged.
    """

    at: float
    uri: str
    domain: str
    uuid: str
    action: Action
    actual: Optional[int]
    target: Optional[int]
    reason: str
    applied: bool = False
    error: Optional[str] = None

    @property
    def call(self) -> Optional[str]:
        """The ``setMemoryFlags`` call of this step, or ``None``."""
        return None if self.target is None else call_of(self.target)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON line: the fields, the action by name, and the call."""
        return {**dataclasses.asdict(self), "action": self.action.value, "call": self.call}

    def line(self, *, show_uri: bool = False) -> str:
        """One line for people and logs: what was done (or would be), the call, and why."""
        who = self.domain + (f"@{self.uri}" if show_uri else "")
        if self.error is not None and self.target is None:
            return f"{who}: left alone: {self.error}"
        if self.target is None:
            size = "" if self.actual is None else f" at {_mib(self.actual)}"
            return f"{who}: no step{size}: {self.reason}"
        move = f"{self.action.value} {_mib(self.actual or 0)} -> {_mib(self.target)} ({self.call})"
        if self.error is not None:
            return f"{who}: {move} failed: {self.error}; it was to {self.reason}"
        done = "done" if self.applied else "dry run, not applied"
        return f"{who}: {move} {done}: {self.reason}"


def _mib(value: int) -> str:
    return f"{value / MiB:.0f} MiB"


@dataclasses.dataclass
class _Pending:
    """A decision and what carrying it out needs: the domain, and its memory as it stood."""

    uri: str
    guest: Optional["Guest"]
    decision: Decision
    actual: Optional[int]
    before: Optional[Memory]
    note: Optional[str] = None  # why it could not be judged


class Ballooner:
    """Step a collector's domains toward their advice, one pass per cycle (see the module's docstring).

    :param collector: The collector whose cycles are given to :meth:`on_cycle`.
    :param history: The history the advice is read from; opened as its
        stepper when ``apply``, else read-only.
    :param advice: The advice's knobs.
    :param policy: The stepping knobs.
    :param apply: Call ``setMemoryFlags`` and keep each guest's memory;
        otherwise a dry run, which changes nothing anywhere.
    :param maximum: ``--max``: bytes no guest is grown over (default: its size when stepping began).
    :param target_host_available: ``--target-host-available``, bytes
        (see :func:`~virt_balloon_stats.stepping.plan`).
    :param max_total: ``--max-total``: bytes this Ballooner may take back in all.
    :param advise_every: Seconds a domain's advice is used before it is made again.
    :param clock: Epoch seconds.
    """

    def __init__(
        self,
        collector: "Collector",
        history: "History",
        advice: Policy,
        policy: StepPolicy,
        *,
        apply: bool,
        maximum: Optional[int] = None,
        target_host_available: Optional[int] = None,
        max_total: Optional[int] = None,
        advise_every: float = DEFAULT_ADVISE_EVERY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("--max", maximum), ("--target-host-available", target_host_available),
                            ("--max-total", max_total)):
            if value is not None and value < 0:
                raise InvalidArgument(f"{name} must be 0 or more, not {value!r}")
        self._collector = collector
        self._history = history
        self._advice = advice
        self._policy = policy
        self.apply = apply
        self._maximum = maximum
        self._target = target_host_available
        self._max_total = max_total
        self._clock = clock
        if not advise_every > 0:
            raise InvalidArgument(f"advice must be remade every more than 0 seconds, not {advise_every!r}")
        self._advise_every = advise_every
        #: Per domain UUID: when its advice was made, for which run of it (its id), and the advice.
        self._advised: Dict[str, Tuple[float, Optional[int], Advice]] = {}
        #: Bytes taken back so far (what ``--max-total`` bounds).
        self.taken = 0
        #: Steps made, by (direction, reason): ``up`` or ``down``, ``advice`` or ``pressure``.
        self.steps: "collections.Counter[Tuple[str, str]]" = collections.Counter()
        #: Steps whose call failed, by direction.
        self.failures: "collections.Counter[str]" = collections.Counter()

    # -- one pass -------------------------------------------------------------------------------

    def on_cycle(self, cycle: "Cycle") -> List[Outcome]:
        """Decide every domain of ``cycle`` and carry the decisions out (or not, in a dry run).

        :raise HistoryError: When the history cannot be read: nobody is
            stepped without it. A failing ``setMemoryFlags`` is one domain's
            outcome, not an error.
        """
        now = self._clock()
        return [self._carry_out(p, now) for p in self._decide(cycle, now)]

    def _memories(self) -> Tuple[Dict[str, Memory], Dict[str, str]]:
        """Every guest's memory kept in the history; and the damaged ones, which are not stepped."""
        memories: Dict[str, Memory] = {}
        damaged: Dict[str, str] = {}
        for uuid, text in self._history.steps().items():
            try:
                memories[uuid] = memory_from_dict(json.loads(text))
            except (ValueError, InvalidArgument) as err:
                damaged[uuid] = f"its step record in the history is damaged, so it is not stepped: {err}"
        return memories, damaged

    def _decide(self, cycle: "Cycle", now: float) -> List[_Pending]:
        memories, damaged = self._memories()
        pending: List[_Pending] = []
        views: Dict[str, List[View]] = collections.defaultdict(list)
        judged: Dict[Tuple[str, str], _Pending] = {}
        for sample in cycle.samples:
            guest = self._collector.guest(sample.uri, sample.uuid)
            memory = memories.get(sample.uuid)
            reason = f"left alone: {sample.status.value}: {sample.message}".rstrip(": ")
            entry = _Pending(sample.uri, guest, _none(sample, reason, memory), sample.actual_bytes, memory)
            pending.append(entry)
            if sample.uuid in damaged:
                entry.note = damaged[sample.uuid]
            elif guest is None:
                entry.note = "the collector no longer holds it"
            elif sample.status is not Status.OK or sample.stats is None:
                continue  # stopped, unresponsive, stale, paused: no call to it, and no place in the plan
            else:
                try:
                    view = self._view(sample, guest, memory, now)
                except HistoryError:
                    raise
                except BalloonStatsError as err:
                    entry.note = str(err)
                    continue
                entry.actual = view.actual
                views[sample.uri].append(view)
                judged[(sample.uri, sample.uuid)] = entry
        for uri, host_views in views.items():
            available = None
            if self._target is not None:
                host = self._collector.host(uri)
                try:
                    if host is None:
                        raise LibvirtFailure("its host's connection is closed")
                    available = host.node_available()
                except BalloonStatsError as err:  # no budget, no step on that host this pass
                    for view in host_views:
                        judged[(uri, view.uuid)].note = f"the host's available memory is unknown: {err}"
                    continue
            # What the hosts planned before this one would take, in this pass.
            planned = sum(-p.decision.size for p in pending if p.decision.action is Action.SHRINK)
            decisions = plan(host_views, {v.uuid: memories.get(v.uuid, Memory()) for v in host_views},
                             self._policy, now, host_available=available, target_host_available=self._target,
                             max_total=self._max_total, taken=self.taken + planned, advice=self._advice)
            for decision in decisions:
                judged[(uri, decision.uuid)].decision = decision
        return pending

    def _view(self, sample: "Sample", guest: "Guest", memory: Optional[Memory], now: float) -> View:
        """The stepper's view of a domain whose figures are fresh: its advice and its job asked of libvirt.

        :raise BalloonStatsError: When libvirt cannot describe it, or its advice cannot be made.
        """
        advised = self._advice_of(sample, guest, now)
        actual = sample.actual_bytes if sample.actual_bytes is not None else advised.actual
        ceiling = self._maximum
        if ceiling is None:
            ceiling = memory.ceiling if memory is not None and memory.ceiling is not None else advised.actual
        return View(
            uuid=sample.uuid, name=sample.domain, fresh=True, paused=False,
            migrating=guest.job_active(), actual=actual, ceiling=ceiling, recommended=advised.recommended,
            confidence=advised.confidence, total=sample.get("stat-total-memory"),
            available=sample.get("stat-available-memory"),
            counters={name: sample.get(name) for name in _COUNTER_NAMES},
        )

    def _advice_of(self, sample: "Sample", guest: "Guest", now: float) -> Advice:
        """The domain's advice, made again only every ``advise_every`` (or when the domain restarted).

        Judging a domain reads its whole window from the history and its XML
        from libvirt (B14: some 13 ms of CPU a domain with 8 days), where a
        pass is due every minute; the advice moves with daily peaks, and
        pressure is read from each pass's own figures, not from it.
        """
        cached = self._advised.get(sample.uuid)
        if cached is None or cached[1] != sample.id or not 0 <= now - cached[0] < self._advise_every:
            advised = advise_guest(guest, sample.uri, self._history.points, self._advice, now).advice
            cached = self._advised[sample.uuid] = (now, sample.id, advised)
        return cached[2]

    def _carry_out(self, entry: _Pending, now: float) -> Outcome:
        decision = entry.decision
        outcome = Outcome(now, entry.uri, decision.name, decision.uuid, decision.action, entry.actual,
                          decision.target, decision.reason, error=entry.note)
        if entry.note is not None or not self.apply:
            return outcome
        if decision.target is None or entry.guest is None:
            if decision.memory != (entry.before or Memory()):
                self._keep(decision.uuid, decision.memory)  # settled, or held after a timeout
            return outcome
        direction = "down" if decision.action is Action.SHRINK else "up"
        self._keep(decision.uuid, decision.memory)  # before the call: see the module's docstring
        try:
            entry.guest.set_memory(decision.target)
        except BalloonStatsError as err:
            self._keep(decision.uuid, entry.before or Memory())
            self.failures[direction] += 1
            LOG.error("%s: %s failed: %s", decision.name, call_of(decision.target), err)
            return dataclasses.replace(outcome, error=str(err))
        if decision.action is Action.SHRINK and entry.actual is not None:
            self.taken += entry.actual - decision.target
        self.steps[(direction, "pressure" if decision.pressed else "advice")] += 1
        return dataclasses.replace(outcome, applied=True)

    def _keep(self, uuid: str, memory: Memory) -> None:
        if not self._history.save_step(uuid, json.dumps(memory_to_dict(memory))):
            LOG.warning("%s: not in the history, so its step is not remembered", uuid)

    # -- metrics --------------------------------------------------------------------------------

    def collect(self) -> Iterator["Metric"]:
        """The step counters (``prometheus_client``'s collector protocol), for ``--textfile``."""
        from prometheus_client.core import CounterMetricFamily

        steps = CounterMetricFamily(
            "virt_balloon_balloon_steps", "balloon steps made: down toward the advice, up toward it or after "
            "pressure", labels=["direction", "reason"],
        )
        for direction in ("down", "up"):
            for reason in ("advice", "pressure"):
                steps.add_metric([direction, reason], self.steps[(direction, reason)])
        failures = CounterMetricFamily(
            "virt_balloon_balloon_step_failures", "balloon steps libvirt refused", labels=["direction"]
        )
        for direction in ("down", "up"):
            failures.add_metric([direction], self.failures[direction])
        taken = CounterMetricFamily("virt_balloon_balloon_taken_bytes", "bytes taken back by shrinks")
        taken.add_metric([], self.taken)
        yield from (steps, failures, taken)

    def describe(self) -> List["Metric"]:
        """Nothing up front (``prometheus_client``'s collector protocol)."""
        return []

    def write_textfile(self, path: str) -> None:
        """The counters in Prometheus' text format at ``path``, replaced whole (node_exporter's textfile).

        :raise InvalidArgument: When prometheus_client is not installed, or the file cannot be written.
        """
        try:
            from prometheus_client import CollectorRegistry, write_to_textfile
        except ImportError as err:  # pragma: no cover - exercised only without the extra
            raise InvalidArgument(NEEDS_PROMETHEUS_CLIENT) from err
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            write_to_textfile(path, registry)
        except OSError as err:
            raise InvalidArgument(f"cannot write {path}: {err.strerror or err}") from err


def _none(sample: "Sample", reason: str, memory: Optional[Memory]) -> Decision:
    return Decision(sample.uuid, sample.domain, Action.NONE, None, reason, memory or Memory())


class News:
    """What a long run prints of each pass: every step, and a domain's other outcomes when they change.

    A stopped QEMU is reported when it stops being stepped, not every
    interval; a step, a failed call or a dry run's would-be call, every time.
    """

    def __init__(self) -> None:
        self._said: Dict[str, str] = {}

    def __call__(self, outcomes: Sequence[Outcome]) -> List[Outcome]:
        news = []
        for outcome in outcomes:
            said = outcome.error or outcome.reason
            if outcome.target is not None or self._said.get(outcome.uuid) != _gist(said):
                news.append(outcome)
            self._said[outcome.uuid] = _gist(said)
        present = {o.uuid for o in outcomes}
        for uuid in set(self._said) - present:
            del self._said[uuid]
        return news


def _gist(reason: str) -> str:
    """A reason without its figures: "held for 1790 s more" and "held for 1780 s more" say the same."""
    return re.sub(r"[0-9.]+", "N", reason)

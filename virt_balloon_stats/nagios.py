"""The ``check`` verdict in the Nagios / Icinga plugin convention. Pure.

Exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. The first output line
is ``BALLOON <STATE> - <summary> | <perfdata>``; one line per domain follows
(Nagios and Icinga show it as the long output).

Mapping, per domain (the worst domain sets the overall state; CRITICAL ranks
above WARNING above UNKNOWN above OK, as the monitoring-plugins do):

============================  =========  ====================================
status                        state      why
============================  =========  ====================================
ok                            OK         fresh figures
paused                        OK         frozen on purpose; nothing to fix
polling_disabled              WARNING    figures are as old as the driver load
never_updated                 WARNING    no balloon driver answers in the guest
cross-check ``mismatch``      WARNING    QEMU and libvirt disagree
stale                         CRITICAL   the guest stopped answering
older than ``--max-age``      CRITICAL   the operator's own freshness limit
unresponsive                  CRITICAL   QEMU did not answer within --timeout
no_balloon                    UNKNOWN    nothing to measure
unreachable                   UNKNOWN    the figures could not be read
============================  =========  ====================================
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import List, Optional, Sequence, Tuple

from virt_balloon_stats.crosscheck import Result
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import Status

__all__ = ["State", "DomainVerdict", "judge", "render_check"]


class State(enum.IntEnum):
    """Nagios plugin states; the value is the exit code."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


_RANK = {State.OK: 0, State.UNKNOWN: 1, State.WARNING: 2, State.CRITICAL: 3}

_BY_STATUS = {
    Status.OK: State.OK,
    Status.PAUSED: State.OK,
    Status.POLLING_DISABLED: State.WARNING,
    Status.NEVER_UPDATED: State.WARNING,
    Status.STALE: State.CRITICAL,
    Status.NO_BALLOON: State.UNKNOWN,
    Status.UNREACHABLE: State.UNKNOWN,
    Status.UNRESPONSIVE: State.CRITICAL,
}


@dataclasses.dataclass(frozen=True)
class DomainVerdict:
    """One domain's state and the reason for it."""

    sample: Sample
    state: State
    reason: str


def judge(sample: Sample, max_age: Optional[float] = None) -> DomainVerdict:
    """Map one sample to a plugin state (see the module's table)."""
    state = _BY_STATUS[sample.status]
    reason = f"{sample.status.value}: {sample.message}"
    age = sample.age_seconds
    if state is State.OK and sample.crosscheck.result is Result.MISMATCH:
        stats = ", ".join(c.stat for c in sample.crosscheck.mismatches)
        state, reason = State.WARNING, f"cross-check mismatch on {stats}"
    if (
        max_age is not None
        and age is not None
        and age > max_age
        and sample.status not in (Status.PAUSED, Status.POLLING_DISABLED)
    ):
        state, reason = State.CRITICAL, f"figures are {age:.0f} s old, over --max-age {max_age:g} s"
    return DomainVerdict(sample, state, reason)


def _perf_label(domain: str, what: str) -> str:
    return "'" + re.sub(r"['=]", "_", f"{domain}_{what}") + "'"


def _perfdata(v: DomainVerdict, max_age: Optional[float]) -> List[str]:
    s = v.sample
    out = []
    if s.age_seconds is not None:
        crit = f"{max_age:g}" if max_age is not None else ""
        out.append(f"{_perf_label(s.domain, 'age')}={s.age_seconds:.0f}s;;{crit};0")
    for name, label in (("stat-free-memory", "free"), ("stat-available-memory", "available")):
        value = s.get(name)
        total = s.get("stat-total-memory")
        if value is not None:
            out.append(f"{_perf_label(s.domain, label)}={value}B;;;0;{total if total is not None else ''}")
    return out


def render_check(samples: Sequence[Sample], max_age: Optional[float] = None) -> Tuple[State, str]:
    """The overall state and the full plugin output for these samples."""
    if not samples:
        return State.UNKNOWN, "BALLOON UNKNOWN - no domain to check"
    verdicts = [judge(s, max_age) for s in samples]
    overall = max((v.state for v in verdicts), key=lambda st: _RANK[st])
    counts = {st: sum(1 for v in verdicts if v.state is st) for st in State}
    summary = ", ".join(f"{counts[st]} {st.name.lower()}" for st in State if counts[st])
    worst = [v for v in verdicts if v.state is overall and overall is not State.OK]
    if worst:
        summary += ": " + "; ".join(f"{v.sample.domain} {v.reason.split(':')[0]}" for v in worst)
    perf = [p for v in verdicts for p in _perfdata(v, max_age)]
    first = f"BALLOON {overall.name} - {summary}" + (" | " + " ".join(perf) if perf else "")
    details = [f"{v.state.name}: {v.sample.domain}: {v.reason}" for v in verdicts]
    return overall, "\n".join([first] + details)

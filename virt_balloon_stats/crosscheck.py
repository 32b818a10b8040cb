"""Compare QEMU's figures with libvirt's, exactly, under libvirt's mapping.

libvirt's ``memoryStats()`` is computed from the same ``guest-stats``
property, so the two must agree to the unit: ``bytes // 1024 == KiB`` for
memory, equal counts, equal ``last-update``, and a figure QEMU calls
unsupported must be absent from libvirt. A mismatch therefore means a bug
in one of the two readers (or a libvirt that maps a name differently), not
noise. The guest may answer between our two reads; then the two
``last-update`` values differ and the verdict is *inconclusive*, never a
false mismatch. The same holds for a machine reset between the two reads
(QEMU 10.0 and later set ``last-update`` back to 0 and every figure to
unsupported), and after one both sides agree that there is nothing. A
figure libvirt has no name for (QEMU 9.2's OOM kills, allocation stalls,
scans and reclaims, or a newer one) is *qmp only*: never compared, so
never a mismatch. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, List, Mapping, Optional, Tuple

from virt_balloon_stats.stats import ACTUAL, LAST_UPDATE, STATS, STATS_BY_QEMU_NAME, GuestStats

__all__ = ["Verdict", "Result", "StatCheck", "CrossCheck", "crosscheck", "skipped"]


#: Where each known stat sits in the table; names unknown to it come after.
_ORDER = {spec.qemu: i for i, spec in enumerate(STATS)}


class Verdict(str, enum.Enum):
    """The outcome for one figure."""

    AGREE = "agree"
    MISMATCH = "mismatch"
    ABSENT = "absent"  # unsupported in QEMU and absent in libvirt: agreement on "nothing"
    QMP_ONLY = "qmp_only"  # a figure libvirt has no name for (QEMU 9.2's, or newer)


class Result(str, enum.Enum):
    """The outcome for one domain."""

    AGREE = "agree"
    MISMATCH = "mismatch"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class StatCheck:
    """One figure on both sides.

    :ivar qmp: QEMU's value in ``unit``; ``None`` when unsupported.
    :ivar libvirt: libvirt's value in ``libvirt_unit``; ``None`` when absent.
    """

    stat: str
    verdict: Verdict
    qmp: Optional[int]
    libvirt: Optional[int]
    unit: str
    libvirt_unit: str

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form used in ``crosscheck.mismatches``."""
        return {
            "stat": self.stat,
            "qmp": self.qmp,
            "libvirt": self.libvirt,
            "unit": self.unit,
            "libvirt_unit": self.libvirt_unit,
        }


@dataclasses.dataclass(frozen=True)
class CrossCheck:
    """The cross-check of one domain.

    :ivar checks: One entry per compared figure (empty unless conclusive).
    :ivar reason: Why the result is inconclusive or skipped, else ``""``.
    :ivar at: Epoch seconds when the figures were compared (``None`` when they were not).
    :ivar previous: For a domain skipped in its turn (a collector compares
        each domain only every few cycles), its last conclusive cross-check:
        what was found then, about the figures of then. Never a verdict on
        this reading's figures, which were not compared.
    """

    result: Result
    checks: Tuple[StatCheck, ...] = ()
    reason: str = ""
    at: Optional[float] = None
    previous: Optional["CrossCheck"] = None

    @property
    def conclusive(self) -> bool:
        """Whether the figures were compared to a verdict (agree or mismatch)."""
        return self.result in (Result.AGREE, Result.MISMATCH)

    @property
    def last_conclusive(self) -> Optional["CrossCheck"]:
        """This cross-check if conclusive, else the earlier one it carries (if any)."""
        return self if self.conclusive else self.previous

    @property
    def mismatches(self) -> Tuple[StatCheck, ...]:
        """The figures that disagree."""
        return tuple(c for c in self.checks if c.verdict is Verdict.MISMATCH)

    @property
    def checked(self) -> int:
        """How many figures were compared on both sides."""
        return sum(1 for c in self.checks if c.verdict is not Verdict.QMP_ONLY)

    def verdict_of(self, stat: str) -> Optional[Verdict]:
        """The verdict for one figure, by QEMU name, if it was compared."""
        for check in self.checks:
            if check.stat == stat:
                return check.verdict
        return None

    def to_dict(self) -> Dict[str, Any]:
        """The ``crosscheck`` member of the JSON document."""
        document: Dict[str, Any] = {
            "result": self.result.value,
            "checked": self.checked,
            "mismatches": [c.to_dict() for c in self.mismatches],
            "qmp_only": [c.stat for c in self.checks if c.verdict is Verdict.QMP_ONLY],
            "reason": self.reason,
            "at": None if self.at is None else round(self.at, 3),
        }
        if self.previous is not None:
            document["previous"] = self.previous.to_dict()
        return document


def skipped(reason: str, previous: Optional[CrossCheck] = None) -> CrossCheck:
    """A cross-check that was not attempted, and why (with the last conclusive one, if any)."""
    return CrossCheck(result=Result.SKIPPED, reason=reason, previous=previous)


def _check(
    stat: str,
    unit: str,
    libvirt_unit: str,
    qmp: Optional[int],
    expected: Optional[int],
    libvirt: Optional[int],
) -> StatCheck:
    if qmp is None and libvirt is None:
        verdict = Verdict.ABSENT
    elif expected is not None and expected == libvirt:
        verdict = Verdict.AGREE
    else:
        verdict = Verdict.MISMATCH
    return StatCheck(stat, verdict, qmp, libvirt, unit, libvirt_unit)


def crosscheck(guest: GuestStats, actual_bytes: Optional[int], memory_stats: Mapping[str, int]) -> CrossCheck:
    """Compare QMP's ``guest-stats`` and ``actual`` with libvirt's ``memoryStats()``.

    :param guest: The parsed ``guest-stats``.
    :param actual_bytes: ``query-balloon``'s ``actual``, or ``None`` if not read.
    :param memory_stats: ``memoryStats()`` as libvirt returned it.
    """
    libvirt_last = memory_stats.get(LAST_UPDATE.libvirt or "")
    if (guest.last_update or None) != (libvirt_last or None):
        return CrossCheck(
            result=Result.INCONCLUSIVE,
            reason=(
                f"the guest answered between the two reads (last-update {guest.last_update} "
                f"vs {libvirt_last})"
            ),
        )
    checks: List[StatCheck] = []
    # In the table's order, whatever order QEMU's reply had: the JSON lists stay stable.
    for name, value in sorted(guest.values.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER))):
        spec = STATS_BY_QEMU_NAME.get(name)
        if spec is None or spec.libvirt is None:
            checks.append(StatCheck(name, Verdict.QMP_ONLY, value, None, spec.unit if spec else "", ""))
            continue
        expected = None if value is None else spec.to_libvirt(value)
        checks.append(
            _check(name, spec.unit, spec.libvirt_unit, value, expected, memory_stats.get(spec.libvirt))
        )
    if actual_bytes is not None:
        checks.append(
            _check(
                ACTUAL.qemu,
                ACTUAL.unit,
                ACTUAL.libvirt_unit,
                actual_bytes,
                ACTUAL.to_libvirt(actual_bytes),
                memory_stats.get(ACTUAL.libvirt or ""),
            )
        )
    mismatch = any(c.verdict is Verdict.MISMATCH for c in checks)
    return CrossCheck(result=Result.MISMATCH if mismatch else Result.AGREE, checks=tuple(checks))

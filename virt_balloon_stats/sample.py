"""One domain's balloon figures at one moment: the value every front end prints.

A :class:`Sample` is immutable and self-describing: where the figures came
from (``source``), how far to trust them (``status`` and ``message``), and
what libvirt said about the same figures (``libvirt`` and ``crosscheck``).
:meth:`Sample.to_dict` is the JSON document of the README.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

from virt_balloon_stats.crosscheck import CrossCheck, skipped
from virt_balloon_stats.errors import BalloonStatsError, ConnectionFailed, QEMUUnresponsive
from virt_balloon_stats.polling import PollingState
from virt_balloon_stats.qompath import QOMPath
from virt_balloon_stats.stats import GuestStats, Status

__all__ = ["SOURCES", "Sample", "not_read", "unanswered"]

#: ``qmp``: QEMU through the passthrough (taints the domain as custom-monitor);
#: ``libvirt``: memoryStats() and the live XML only (no taint, works read-only);
#: ``both``: the two, cross-checked (the default).
SOURCES = ("both", "qmp", "libvirt")


@dataclasses.dataclass(frozen=True)
class Sample:
    """The balloon figures of one domain, read at ``sampled_at``.

    :ivar stats: QEMU-named figures in QEMU's units, ``None`` = unsupported;
        with the ``libvirt`` source, rebuilt from memoryStats (KiB x 1024).
    :ivar actual_bytes: the balloon's current size (query-balloon ``actual``).
    :ivar libvirt: ``memoryStats()`` as libvirt gives it (KiB and counts),
        ``None`` when libvirt was not asked.
    :ivar error: the failure behind an ``unreachable`` status.
    """

    uri: str
    domain: str
    uuid: str
    id: Optional[int]
    state: str
    source: str
    sampled_at: float
    status: Status
    message: str
    polling: PollingState
    crosscheck: CrossCheck
    qom_path: Optional[QOMPath] = None
    stats: Optional[GuestStats] = None
    actual_bytes: Optional[int] = None
    libvirt: Optional[Mapping[str, int]] = None
    error: Optional[BalloonStatsError] = None

    @property
    def last_update(self) -> Optional[int]:
        """Epoch seconds of the guest's last answer; ``None`` for never."""
        return self.stats.last_update if self.stats else None

    @property
    def age_seconds(self) -> Optional[float]:
        """How old the figures were when sampled; ``None`` for never."""
        last = self.last_update
        return None if last is None else max(0.0, self.sampled_at - last)

    def get(self, name: str) -> Optional[int]:
        """One figure by QEMU name (``stat-free-memory``...); ``None`` if unknown."""
        return self.stats.get(name) if self.stats else None

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document for this domain (see README, "The JSON document")."""
        age = self.age_seconds
        return {
            "uri": self.uri,
            "domain": self.domain,
            "uuid": self.uuid,
            "id": self.id,
            "state": self.state,
            "source": self.source,
            "sampled_at": round(self.sampled_at, 3),
            "qom_path": self.qom_path.path if self.qom_path else None,
            "qom_type": self.qom_path.qom_type if self.qom_path else None,
            "polling_interval": self.polling.qemu_interval,
            "libvirt_period": self.polling.libvirt_period,
            "last_update": self.last_update,
            "age": None if age is None else round(age, 1),
            "status": self.status.value,
            "message": self.message,
            "actual": self.actual_bytes,
            "stats": dict(self.stats.values) if self.stats else {},
            "used": self.stats.used_bytes if self.stats else None,
            "libvirt": dict(self.libvirt) if self.libvirt is not None else None,
            "crosscheck": self.crosscheck.to_dict(),
        }


def unanswered(waited: float) -> str:
    """The message of a domain whose QEMU did not answer in time."""
    return f"QEMU did not answer within {waited:.0f} s; it may be hung or stopped"


def not_read(
    uri: str,
    domain: str,
    uuid: str,
    id: Optional[int],
    *,
    source: str,
    sampled_at: float,
    status: Status,
    message: str,
    last: Optional[Sample] = None,
) -> Sample:
    """A sample without figures, for a domain that could not be read this time.

    ``status`` is ``unresponsive`` (QEMU did not answer in time) or
    ``unreachable`` (the connection is gone); the error says which. What is
    still known from the ``last`` reading (state, polling) is kept.
    """
    error: BalloonStatsError
    if status is Status.UNREACHABLE:
        error = ConnectionFailed(message, domain=domain)
    else:
        error = QEMUUnresponsive(message, domain=domain)
    return Sample(
        uri=uri,
        domain=domain,
        uuid=uuid,
        id=id,
        source=source,
        state=last.state if last is not None else "unknown",
        sampled_at=sampled_at,
        status=status,
        message=message,
        polling=last.polling if last is not None else PollingState(None, None),
        crosscheck=skipped("the figures could not be read"),
        error=error,
    )

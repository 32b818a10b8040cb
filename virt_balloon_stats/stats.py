"""The stats model: the one table of stat names and units, and what figures mean.

:data:`STATS` is the only place in the package that spells a QEMU stat name
or its libvirt counterpart. Everything is pure: values in, values out.

Units: QEMU reports memory (including memory swapped, scanned or reclaimed)
in bytes and events (faults, hugetlb allocations, OOM kills, allocation
stalls) as counts; libvirt's ``memoryStats()`` reports memory in KiB
(``bytes // 1024``) and the counts unchanged. Inside this package memory is
always bytes; KiB appears only at the libvirt edge. ``None`` always means
"not reported", never 0.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, Mapping, Optional, Tuple

from virt_balloon_stats.errors import InvalidArgument, LibvirtFailure, QMPBadReply, short_repr

__all__ = [
    "StatSpec",
    "STATS",
    "STATS_BY_QEMU_NAME",
    "has_libvirt_name",
    "ACTUAL",
    "LAST_UPDATE",
    "RSS",
    "UNSUPPORTED_VALUES",
    "memory_stats_from_domstats",
    "GuestStats",
    "parse_guest_stats",
    "stats_from_libvirt",
    "Status",
    "STATUS_MEANINGS",
    "DEFAULT_GRACE_SECONDS",
    "classify",
]


@dataclasses.dataclass(frozen=True)
class StatSpec:
    """One balloon figure under its QEMU and libvirt names.

    :ivar qemu: QEMU's name (``guest-stats`` member or QMP field).
    :ivar libvirt: ``virDomainMemoryStats`` key, or ``None`` if libvirt has none.
    :ivar domstats: ``virsh domstats --balloon`` field name, or ``None``.
    :ivar unit: ``bytes`` or ``count`` on the QEMU side; libvirt gives KiB
        for ``bytes`` and the same number for ``count``.
    :ivar help: What the figure is, from the guest's point of view.
    :ivar cumulative: Whether the figure only grows while the guest runs
        (faults, swap traffic, OOM kills): a Prometheus counter, and a rate
        per second in ``watch``. It starts again from 0 when the guest boots.
    """

    qemu: str
    libvirt: Optional[str]
    domstats: Optional[str]
    unit: str
    help: str
    cumulative: bool = False

    @property
    def libvirt_unit(self) -> str:
        """The unit libvirt reports this figure in."""
        return "KiB" if self.unit == "bytes" else self.unit

    def to_libvirt(self, value: int) -> int:
        """Convert a QEMU value to what libvirt reports for it."""
        return value // 1024 if self.unit == "bytes" else value

    def from_libvirt(self, value: int) -> int:
        """Convert a libvirt value back to QEMU's unit (KiB to bytes loses nothing)."""
        return value * 1024 if self.unit == "bytes" else value


#: The guest-stats figures QEMU knows, in QEMU's order (``balloon_stat_names``
#: in hw/virtio/virtio-balloon.c), with libvirt's mapping. The last six came
#: with QEMU 9.2 and no libvirt maps them: a QEMU before 9.2 leaves them out,
#: and a guest driver that does not send them leaves them unsupported. The
#: Linux driver sends scans and reclaims as pages converted to bytes.
STATS: Tuple[StatSpec, ...] = (
    StatSpec("stat-swap-in", "swap_in", "balloon.swap_in", "bytes", "memory swapped in", cumulative=True),
    StatSpec("stat-swap-out", "swap_out", "balloon.swap_out", "bytes", "memory swapped out", cumulative=True),
    StatSpec(
        "stat-major-faults",
        "major_fault",
        "balloon.major_fault",
        "count",
        "page faults that needed disk I/O",
        cumulative=True,
    ),
    StatSpec(
        "stat-minor-faults",
        "minor_fault",
        "balloon.minor_fault",
        "count",
        "page faults served from memory",
        cumulative=True,
    ),
    StatSpec(
        "stat-free-memory", "unused", "balloon.unused", "bytes", "memory left completely unused (MemFree)"
    ),
    StatSpec(
        "stat-total-memory", "available", "balloon.available", "bytes", "memory the guest sees (MemTotal)"
    ),
    StatSpec(
        "stat-available-memory",
        "usable",
        "balloon.usable",
        "bytes",
        "memory available without swapping (MemAvailable)",
    ),
    StatSpec(
        "stat-disk-caches",
        "disk_caches",
        "balloon.disk_caches",
        "bytes",
        "page cache that can be reclaimed quickly",
    ),
    StatSpec(
        "stat-htlb-pgalloc",
        "hugetlb_pgalloc",
        "balloon.hugetlb_pgalloc",
        "count",
        "successful hugetlb page allocations",
        cumulative=True,
    ),
    StatSpec(
        "stat-htlb-pgfail",
        "hugetlb_pgfail",
        "balloon.hugetlb_pgfail",
        "count",
        "failed hugetlb page allocations",
        cumulative=True,
    ),
    StatSpec(
        "stat-oom-kills",
        None,
        None,
        "count",
        "processes killed by the guest's OOM killer (oom_kill)",
        cumulative=True,
    ),
    StatSpec(
        "stat-alloc-stalls",
        None,
        None,
        "count",
        "memory allocations that stalled to reclaim memory themselves (allocstall_*)",
        cumulative=True,
    ),
    StatSpec(
        "stat-async-scans",
        None,
        None,
        "bytes",
        "memory scanned for reclaim in the background by kswapd (pgscan_kswapd)",
        cumulative=True,
    ),
    StatSpec(
        "stat-direct-scans",
        None,
        None,
        "bytes",
        "memory scanned for reclaim by allocating tasks themselves (pgscan_direct)",
        cumulative=True,
    ),
    StatSpec(
        "stat-async-reclaims",
        None,
        None,
        "bytes",
        "memory reclaimed in the background by kswapd (pgsteal_kswapd)",
        cumulative=True,
    ),
    StatSpec(
        "stat-direct-reclaims",
        None,
        None,
        "bytes",
        "memory reclaimed by allocating tasks themselves (pgsteal_direct)",
        cumulative=True,
    ),
)

STATS_BY_QEMU_NAME: Mapping[str, StatSpec] = {s.qemu: s for s in STATS}


def has_libvirt_name(qemu_name: str) -> bool:
    """Whether libvirt reports this QEMU figure (a name unknown here, from a newer QEMU, it does not)."""
    spec = STATS_BY_QEMU_NAME.get(qemu_name)
    return spec is not None and spec.libvirt is not None


#: ``query-balloon``'s ``actual``: the guest's current memory size after ballooning.
ACTUAL = StatSpec("actual", "actual", "balloon.current", "bytes", "current balloon size (guest memory)")

#: ``guest-stats``' ``last-update``: host epoch seconds of the guest's last answer.
LAST_UPDATE = StatSpec(
    "last-update", "last_update", "balloon.last-update", "count", "epoch seconds of the last update"
)

#: Host-side only: the QEMU process's resident set size, which libvirt reads
#: from /proc and QEMU does not report.
RSS = StatSpec("rss", "rss", "balloon.rss", "bytes", "resident memory of the QEMU process on the host")

#: QEMU reports an unsupported figure as -1 (older QEMU) or 2^64-1 (QEMU 7.2
#: prints the uint64 -1 unsigned).
UNSUPPORTED_VALUES = frozenset({-1, 2**64 - 1})


@dataclasses.dataclass(frozen=True)
class GuestStats:
    """QEMU's ``guest-stats`` property, interpreted.

    :ivar values: Every stat QEMU reported, by QEMU name, in its unit;
        ``None`` where QEMU says "unsupported". Names this package does not
        know (from a newer QEMU) are kept.
    :ivar last_update: Host epoch seconds of the guest's last answer, or
        ``None`` when QEMU says 0: the guest never answered.
    """

    values: Mapping[str, Optional[int]]
    last_update: Optional[int]

    def get(self, name: str) -> Optional[int]:
        """Return one figure by QEMU name; ``None`` when absent or unsupported."""
        return self.values.get(name)

    @property
    def used_bytes(self) -> Optional[int]:
        """Memory in use: total minus available, when both are known."""
        total = self.get("stat-total-memory")
        available = self.get("stat-available-memory")
        if total is None or available is None:
            return None
        return total - available


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_epoch(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_EPOCH


#: QEMU's figures are uint64; ``last-update`` is epoch seconds, which fit far lower.
_MAX_U64 = 2**64 - 1
_MAX_EPOCH = 2**63 - 1


def _libvirt_int(key: str, value: Any) -> int:
    """One figure from libvirt, checked: libvirt gives unsigned long longs, nothing else."""
    if not _is_int(value) or not 0 <= value <= _MAX_U64:
        raise LibvirtFailure(f"libvirt's {short_repr(key)} is not a 64-bit figure: {short_repr(value)}")
    return int(value)


def parse_guest_stats(value: Any) -> GuestStats:
    """Interpret the value of ``qom-get <balloon> guest-stats``.

    :raise QMPBadReply: When the value is not ``{"stats": {...}, "last-update": N}``
        with integer figures.
    """
    if not isinstance(value, dict) or not isinstance(value.get("stats"), dict):
        raise QMPBadReply(f"guest-stats is not an object with a 'stats' member: {short_repr(value, 200)}")
    last_update = value.get(LAST_UPDATE.qemu)
    if not _is_epoch(last_update):
        raise QMPBadReply(f"guest-stats has no valid 'last-update': {short_repr(last_update)}")
    values: Dict[str, Optional[int]] = {}
    for name, raw in value["stats"].items():
        # QEMU's figures are uint64 (-1 from older QEMU): anything else is not QEMU's.
        if not _is_int(raw) or not -1 <= raw <= _MAX_U64:
            raise QMPBadReply(
                f"guest-stats member {short_repr(name)} is not a 64-bit figure: {short_repr(raw)}"
            )
        values[name] = None if raw in UNSUPPORTED_VALUES else raw
    return GuestStats(values=values, last_update=last_update or None)


def stats_from_libvirt(memory_stats: Mapping[str, int]) -> Tuple[GuestStats, Optional[int]]:
    """Rebuild QEMU-named figures (in bytes) from libvirt's ``memoryStats()``.

    This is the ``libvirt`` source: no passthrough, no taint. Figures libvirt
    leaves out (QEMU said unsupported) are ``None``. Figures libvirt has no
    name for are not there at all, as from a QEMU that does not know them:
    libvirt cannot say whether QEMU reported them. Returns the stats and
    ``actual`` in bytes.
    """
    values: Dict[str, Optional[int]] = {}
    for spec in STATS:
        if spec.libvirt is None:
            continue
        raw = memory_stats.get(spec.libvirt)
        values[spec.qemu] = None if raw is None else spec.from_libvirt(_libvirt_int(spec.libvirt, raw))
    last_update = memory_stats.get(LAST_UPDATE.libvirt or "")
    if last_update is not None:
        last_update = _libvirt_int(LAST_UPDATE.libvirt or "", last_update)
    actual = memory_stats.get(ACTUAL.libvirt or "")
    if actual is not None:
        actual = _libvirt_int(ACTUAL.libvirt or "", actual)
    return (
        GuestStats(values=values, last_update=last_update or None),
        None if actual is None else ACTUAL.from_libvirt(actual),
    )


def memory_stats_from_domstats(record: Mapping[str, Any]) -> Dict[str, int]:
    """Turn one ``getAllDomainStats`` balloon record into ``memoryStats()`` keys.

    Both APIs read the same QEMU figures; domstats only names them
    differently (``balloon.current`` for ``actual``, ``balloon.last-update``
    for ``last_update``...). Fields libvirt left out stay out, and so does
    ``actual`` when the guest figures are missing: domstats takes
    ``balloon.current`` from libvirt's definition even for a domain without a
    balloon, where memoryStats() has no ``actual``.
    """
    out: Dict[str, int] = {}
    specs = STATS + (ACTUAL, LAST_UPDATE, RSS) if LAST_UPDATE.domstats in record else STATS + (RSS,)
    for spec in specs:
        if spec.domstats is not None and spec.libvirt is not None and spec.domstats in record:
            out[spec.libvirt] = _libvirt_int(spec.domstats, record[spec.domstats])
    return out


class Status(str, enum.Enum):
    """How much the figures of one domain can be trusted right now."""

    OK = "ok"
    STALE = "stale"
    NEVER_UPDATED = "never_updated"
    POLLING_DISABLED = "polling_disabled"
    PAUSED = "paused"
    NO_BALLOON = "no_balloon"
    UNREACHABLE = "unreachable"
    UNRESPONSIVE = "unresponsive"


#: One line per status, for people; :func:`classify` fills in the numbers.
STATUS_MEANINGS: Mapping[Status, str] = {
    Status.OK: "figures are fresh",
    Status.STALE: "the guest stopped answering: QEMU re-arms its stats timer only when the guest answers",
    Status.NEVER_UPDATED: (
        "polling is on but the guest never answered (no balloon driver, or it has not loaded yet)"
    ),
    Status.POLLING_DISABLED: "polling interval is 0: figures, if any, date from when the guest driver loaded",
    Status.PAUSED: "the domain is paused: QEMU's stats timer runs on the virtual clock and is stopped",
    Status.NO_BALLOON: "the domain has no balloon device (<memballoon model='none'/>)",
    Status.UNREACHABLE: "the figures could not be read",
    Status.UNRESPONSIVE: "QEMU did not answer in time; it may be hung or stopped",
}

#: Slack added to ``2 x interval`` before figures count as stale: the guest
#: answers asynchronously and TCG guests can be slow.
DEFAULT_GRACE_SECONDS = 5


def classify(
    *,
    state: str,
    has_balloon: bool,
    interval: Optional[int],
    last_update: Optional[int],
    now: float,
    grace: float = DEFAULT_GRACE_SECONDS,
) -> Tuple[Status, str]:
    """Decide a domain's :class:`Status` and a one-line explanation.

    :param state: libvirt's state word (``running``, ``paused``...).
    :param has_balloon: Whether the domain has a balloon device.
    :param interval: The polling interval in seconds (QEMU's live value, or
        libvirt's period when QMP is not used); ``None`` when unknown.
    :param last_update: Epoch seconds of the last update, ``None`` for never
        (QEMU's 0: not since the machine started, or was last reset).
    :param now: The current epoch time on the hypervisor.
    :param grace: Seconds of slack beyond ``2 x interval``.
    """
    if not has_balloon:
        return Status.NO_BALLOON, STATUS_MEANINGS[Status.NO_BALLOON]
    if state == "paused":
        return Status.PAUSED, STATUS_MEANINGS[Status.PAUSED]
    if not interval:
        return Status.POLLING_DISABLED, STATUS_MEANINGS[Status.POLLING_DISABLED]
    if last_update is None:
        return Status.NEVER_UPDATED, STATUS_MEANINGS[Status.NEVER_UPDATED]
    try:
        age = float(now) - float(last_update)
        limit = 2.0 * float(interval) + float(grace)
    except OverflowError as err:
        raise InvalidArgument(
            f"times out of range: last update {short_repr(last_update)}, interval {short_repr(interval)}"
        ) from err
    if age > limit:
        return Status.STALE, (
            f"last update {age:.0f} s ago, over 2 x {interval} s + {grace:g} s; "
            f"{STATUS_MEANINGS[Status.STALE]}"
        )
    return Status.OK, f"{STATUS_MEANINGS[Status.OK]} (updated {max(age, 0):.0f} s ago, every {interval} s)"

"""Render samples for people (tables) and scripts (JSON).

Prometheus' text format is :mod:`virt_balloon_stats.metrics`'s, on
``prometheus_client``.

Pure: samples in, text out. Memory is shown in binary units (KiB, MiB, GiB)
as ``virsh`` and ``free -h`` do, unless the caller asks for raw numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from virt_balloon_stats.crosscheck import Verdict
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import ACTUAL, RSS, STATS, STATS_BY_QEMU_NAME, StatSpec, Status

__all__ = [
    "human_bytes",
    "format_age",
    "render_table",
    "render_stats",
    "render_json",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(value: Optional[int]) -> str:
    """``162013184`` -> ``154.5 MiB``; ``None`` -> ``-``."""
    if value is None:
        return "-"
    size = float(value)
    for unit in _UNITS:
        if abs(round(size, 0 if unit == "B" else 1)) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: Optional[float]) -> str:
    """``None`` -> ``never``; else whole seconds, minutes or hours."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    body = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def _value(spec: StatSpec, value: Optional[int], raw: bool) -> str:
    if value is None:
        return "-"
    if spec.unit == "bytes" and not raw:
        return human_bytes(value)
    return str(value)


def _libvirt_value(spec: StatSpec, value: Optional[int], raw: bool) -> str:
    if value is None:
        return "-"
    if spec.unit == "bytes":
        return f"{value} KiB" if raw else human_bytes(spec.from_libvirt(value))
    return str(value)


def _stat_rows(sample: Sample, raw: bool) -> List[Tuple[str, str, str, str, str]]:
    libvirt = sample.libvirt or {}
    rows = []
    names = [s.qemu for s in STATS] + [
        n for n in (sample.stats.values if sample.stats else {}) if n not in STATS_BY_QEMU_NAME
    ]
    for name in names:
        spec = STATS_BY_QEMU_NAME.get(name) or StatSpec(name, None, None, "count", "")
        qmp_value = sample.get(name)
        if spec.libvirt is None and qmp_value is None:
            # Neither side has anything: QEMU does not know it, or the guest does not send it.
            continue
        lv = libvirt.get(spec.libvirt) if spec.libvirt else None
        verdict = sample.crosscheck.verdict_of(name)
        rows.append(
            (
                name,
                _value(spec, qmp_value, raw),
                spec.libvirt or "-",
                _libvirt_value(spec, lv, raw),
                _verdict(verdict),
            )
        )
    lv_actual = libvirt.get(ACTUAL.libvirt or "")
    rows.append(
        (
            ACTUAL.qemu,
            _value(ACTUAL, sample.actual_bytes, raw),
            ACTUAL.libvirt or "-",
            _libvirt_value(ACTUAL, lv_actual, raw),
            _verdict(sample.crosscheck.verdict_of(ACTUAL.qemu)),
        )
    )
    used = sample.stats.used_bytes if sample.stats else None
    rows.append(("used (total - available)", _value(ACTUAL, used, raw), "-", "-", ""))
    rows.append(
        ("-", "-", RSS.libvirt or "-", _libvirt_value(RSS, libvirt.get(RSS.libvirt or ""), raw), "host only")
    )
    return rows


def _verdict(verdict: Optional[Verdict]) -> str:
    return {
        None: "",
        Verdict.AGREE: "agree",
        Verdict.MISMATCH: "MISMATCH",
        Verdict.ABSENT: "unsupported",
        Verdict.QMP_ONLY: "qmp only",
    }[verdict]


def _when(epoch: Optional[int]) -> str:
    if epoch is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def render_stats(samples: Sequence[Sample], *, raw_bytes: bool = False, show_uri: bool = False) -> str:
    """The ``stats`` table: one block per domain, every figure beside libvirt's."""
    blocks = []
    for s in samples:
        where = f" on {s.uri}" if show_uri else ""
        ident = f"id {s.id}, " if s.id is not None else ""
        lines = [
            f"Domain: {s.domain} ({ident}{s.state}){where}",
            f"  Status:      {s.status.value}: {s.message}",
        ]
        if s.status is not Status.UNREACHABLE:
            if s.qom_path:
                lines.append(f"  QOM path:    {s.qom_path.path} ({s.qom_path.qom_type})")
            lines.append(f"  Polling:     {s.polling.describe()}")
            lines.append(f"  Last update: {_when(s.last_update)} (age {format_age(s.age_seconds)})")
            cc = s.crosscheck
            verdict = f"{cc.result.value}" + (f", {cc.checked} figures compared" if cc.checked else "")
            if cc.reason:
                verdict += f" ({cc.reason})"
            if cc.previous is not None and cc.previous.at is not None:
                ago = format_age(max(0.0, s.sampled_at - cc.previous.at))
                verdict += f"; last compared {ago} ago: {cc.previous.result.value}"
            lines.append(f"  Cross-check: {verdict}")
            if s.status is not Status.NO_BALLOON:
                table = render_table(("QEMU", "VALUE", "LIBVIRT", "VALUE", "CHECK"), _stat_rows(s, raw_bytes))
                lines.append("")
                lines.extend("  " + line for line in table.splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_json(documents: Sequence[Dict[str, Any]]) -> str:
    """A JSON array, one object per domain, even for one domain."""
    return json.dumps(list(documents), indent=2, sort_keys=False)

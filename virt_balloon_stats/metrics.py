"""The Prometheus metrics: one place that names them, on ``prometheus_client``.

The exporter, ``stats --format prometheus`` and ``stats --textfile`` all
serve the same families from a collector :class:`~virt_balloon_stats.collector.Cycle`,
so a textfile for node_exporter and a scrape of the exporter are
interchangeable. :class:`CycleMetrics` is a custom ``prometheus_client``
collector: it turns the last finished cycle into metric families when
scraped and makes no libvirt call itself, so a slow or hung hypervisor
never makes a scrape slow.

Names follow Prometheus' conventions: base units (``_bytes``, ``_seconds``),
``_total`` only on counters, and every series labelled with the ``uri`` it
was read through (so several ``-c`` URIs never collide). Unsupported figures
are left out, never exported as 0: after a machine reset (QEMU 10.0 and
later report every figure unsupported until the guest driver answers again)
the counters are absent for a while, then come back lower, which Prometheus
takes for the counter reset it is. QEMU 9.2's stats, which libvirt has no
key for, are counters under their own names like the others.

``prometheus_client`` is the optional extra ``exporter``; importing this
module without it raises an :class:`~virt_balloon_stats.errors.InvalidArgument`
that says how to install it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

from virt_balloon_stats.collector import Cycle, Totals
from virt_balloon_stats.errors import NEEDS_PROMETHEUS_CLIENT, InvalidArgument
from virt_balloon_stats.lanes import LaneStats
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import ACTUAL, STATS, STATS_BY_QEMU_NAME, StatSpec, Status

try:
    from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.utils import floatToGoString
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise InvalidArgument(NEEDS_PROMETHEUS_CLIENT) from _err

__all__ = ["PREFIX", "metric_name", "CycleMetrics", "registry_for", "render", "write_textfile", "exposition"]

PREFIX = "virt_balloon"

_DOMAIN_LABELS = ("uri", "domain", "uuid")

#: Error kinds exported at 0 before they first happen, so rate() sees the first one.
_ALWAYS_ERRORS = ("unresponsive", "ConnectionFailed")


def metric_name(spec: StatSpec) -> str:
    """``stat-free-memory`` -> ``virt_balloon_free_memory_bytes``; counters end in ``_total``."""
    base = re.sub(r"[^a-zA-Z0-9_]", "_", spec.qemu.removeprefix("stat-"))
    name = f"{PREFIX}_{base}"
    if spec.unit == "bytes":
        name += "_bytes"
    if spec.cumulative:
        name += "_total"
    return name


class _Families:
    """Metric families by name, created on first use, in the order first used."""

    def __init__(self) -> None:
        self._by_name: Dict[str, Metric] = {}

    def gauge(self, name: str, help_text: str, labels: Sequence[str]) -> GaugeMetricFamily:
        family = self._get(GaugeMetricFamily, name, help_text, labels)
        assert isinstance(family, GaugeMetricFamily)
        return family

    def counter(self, name: str, help_text: str, labels: Sequence[str]) -> CounterMetricFamily:
        family = self._get(CounterMetricFamily, name, help_text, labels)
        assert isinstance(family, CounterMetricFamily)
        return family

    def _get(self, kind: Any, name: str, help_text: str, labels: Sequence[str]) -> Metric:
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = kind(name, help_text, labels=list(labels))
        return family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


def _domain_metrics(families: _Families, s: Sample) -> None:
    """Every figure of one domain: status one-hot, stats, last update, actual, interval, cross-check."""
    ids = [s.uri, s.domain, s.uuid]
    status = families.gauge(
        f"{PREFIX}_status", "1 for the domain's current status, else 0", _DOMAIN_LABELS + ("status",)
    )
    for st in Status:
        status.add_metric(ids + [st.value], int(s.status is st))
    if s.stats:
        order = {spec.qemu: i for i, spec in enumerate(STATS)}
        for name, value in sorted(s.stats.values.items(), key=lambda kv: order.get(kv[0], len(order))):
            if value is None:
                continue
            spec = STATS_BY_QEMU_NAME.get(name)
            if spec is None:
                families.gauge(
                    f"{PREFIX}_guest_stat",
                    "guest stat unknown to this version, in QEMU's unit",
                    _DOMAIN_LABELS + ("stat",),
                ).add_metric(ids + [name], value)
                continue
            help_text = f"{spec.help}; QEMU's {spec.qemu}"
            if spec.cumulative:
                families.counter(metric_name(spec), help_text, _DOMAIN_LABELS).add_metric(ids, value)
            else:
                families.gauge(metric_name(spec), help_text, _DOMAIN_LABELS).add_metric(ids, value)
        used = s.stats.used_bytes
        if s.status is Status.OK and used is not None and used >= 0:
            # Derived, against the usual rule, because what it needs is the
            # freshness: only figures whose status is ok say what the guest
            # uses now, and this series is absent otherwise, so PromQL over it
            # (``advise --prometheus``, advice-rules.yml) never counts a stale
            # or a restarted guest's leftovers as use.
            families.gauge(
                f"{PREFIX}_used_memory_bytes",
                "memory the guest uses (total - available), served only while its figures are ok",
                _DOMAIN_LABELS,
            ).add_metric(ids, used)
        if s.last_update is not None:
            families.gauge(
                f"{PREFIX}_last_update_seconds", "epoch seconds of the guest's last answer", _DOMAIN_LABELS
            ).add_metric(ids, s.last_update)
    if s.actual_bytes is not None:
        families.gauge(f"{PREFIX}_actual_bytes", ACTUAL.help, _DOMAIN_LABELS).add_metric(ids, s.actual_bytes)
    interval = s.polling.qemu_interval if s.polling.qemu_interval is not None else s.polling.libvirt_period
    if interval is not None:
        families.gauge(
            f"{PREFIX}_polling_interval_seconds", "guest-stats polling interval, 0 = disabled", _DOMAIN_LABELS
        ).add_metric(ids, interval)
    # A collector compares each domain in turn: between turns the series
    # carry the last comparison, and its time says how old it is.
    check = s.crosscheck.last_conclusive
    if check is not None and check.checked:
        families.gauge(
            f"{PREFIX}_crosscheck_mismatches",
            "figures where QEMU and libvirt disagreed at the domain's last comparison",
            _DOMAIN_LABELS,
        ).add_metric(ids, len(check.mismatches))
        if check.at is not None:
            families.gauge(
                f"{PREFIX}_crosscheck_timestamp_seconds",
                "epoch seconds of the domain's last comparison of QEMU's and libvirt's figures",
                _DOMAIN_LABELS,
            ).add_metric(ids, round(check.at, 3))
    families.gauge(
        f"{PREFIX}_sample_timestamp_seconds", "epoch seconds when this domain was read", _DOMAIN_LABELS
    ).add_metric(ids, round(s.sampled_at, 3))


def _self_metrics(families: _Families, cycle: Cycle, totals: Optional[Totals]) -> None:
    """How the collector itself is doing: per URI, per cycle, and over its life."""
    for uri, host in cycle.hosts.items():
        families.gauge(
            f"{PREFIX}_up", "1 when the libvirt connection answered in the last cycle, else 0", ("uri",)
        ).add_metric([uri], int(host.up))
        by_status = families.gauge(
            f"{PREFIX}_domains", "domains by status in the last cycle", ("uri", "status")
        )
        counts = {st.value: 0 for st in Status}
        for s in cycle.samples:
            if s.uri == uri:
                counts[s.status.value] += 1
        for status, count in counts.items():
            by_status.add_metric([uri, status], count)
        if host.lanes is not None:
            _lane_metrics(families, uri, host.lanes)
    families.gauge(
        f"{PREFIX}_cycle_duration_seconds", "how long the last cycle took", ()
    ).add_metric([], round(cycle.duration, 6))
    families.gauge(
        f"{PREFIX}_cycle_timestamp_seconds", "epoch seconds when the served cycle began", ()
    ).add_metric([], round(cycle.started_at, 3))
    if totals is None:
        return
    families.counter(f"{PREFIX}_cycles_total", "cycles run", ()).add_metric([], totals.cycles)
    calls = families.counter(
        f"{PREFIX}_libvirt_calls_total", "libvirt round trips made, by call", ("uri", "call")
    )
    for uri, counts in sorted(totals.calls_by_uri.items()):
        for call, count in sorted(counts.items()):
            calls.add_metric([uri, call], count)
    errors = families.counter(
        f"{PREFIX}_errors_total", "failures by kind (exception, or unresponsive)", ("uri", "kind")
    )
    for uri in sorted(set(cycle.hosts) | set(totals.errors_by_uri)):
        counts = totals.errors_by_uri.get(uri, {})
        # The kinds an alert or a panel looks for exist from the start, at 0.
        for kind in sorted(set(counts) | set(_ALWAYS_ERRORS)):
            errors.add_metric([uri, kind], counts.get(kind, 0))
    for uri, when in sorted(totals.last_up.items()):
        families.gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "epoch seconds when the last cycle in which this URI answered began",
            ("uri",),
        ).add_metric([uri], round(when, 3))


def _lane_metrics(families: _Families, uri: str, lanes: LaneStats) -> None:
    """Calls in flight on a URI's connections: one stuck for minutes is a QEMU that does not move."""
    families.gauge(
        f"{PREFIX}_libvirt_calls_in_flight", "libvirt calls running at the end of the last cycle", ("uri",)
    ).add_metric([uri], lanes.in_flight)
    families.gauge(
        f"{PREFIX}_libvirt_calls_stuck",
        "libvirt calls running for longer than the domain deadline (each holds one lane)",
        ("uri",),
    ).add_metric([uri], lanes.stuck)
    families.gauge(
        f"{PREFIX}_libvirt_oldest_call_seconds",
        "how long the oldest libvirt call still running has run (0 when none)",
        ("uri",),
    ).add_metric([uri], round(lanes.oldest_seconds, 3))
    families.gauge(
        f"{PREFIX}_libvirt_connections",
        "libvirt connections open: the collector's own one plus its lanes",
        ("uri",),
    ).add_metric([uri], 1 + lanes.connections)


def families_of(cycle: Optional[Cycle], totals: Optional[Totals] = None) -> List[Metric]:
    """The metric families of one cycle (none before the first)."""
    families = _Families()
    if cycle is not None:
        _self_metrics(families, cycle, totals)
        for s in cycle.samples:
            _domain_metrics(families, s)
    return list(families)


class CycleMetrics:
    """A ``prometheus_client`` custom collector serving the last cycle.

    :param cycle: Returns the cycle to serve (``Collector.last``); called at
        each scrape, never blocks.
    :param totals: Returns the collector's totals, for the self-metrics.
    """

    def __init__(
        self, cycle: Callable[[], Optional[Cycle]], totals: Optional[Callable[[], Totals]] = None
    ) -> None:
        self._cycle = cycle
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        """The families, built from the cycle as it is now."""
        yield from families_of(self._cycle(), self._totals() if self._totals else None)

    def describe(self) -> List[Metric]:
        """Nothing up front: the series depend on the domains running."""
        return []


def registry_for(metrics: CycleMetrics) -> CollectorRegistry:
    """A registry of its own (never the global one) holding only ``metrics``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


def render(cycle: Cycle, totals: Optional[Totals] = None) -> str:
    """The text exposition format of one cycle."""
    return generate_latest(registry_for(CycleMetrics(lambda: cycle, lambda: totals or Totals()))).decode()


def write_textfile(path: str, cycle: Cycle, totals: Optional[Totals] = None) -> None:
    """Write one cycle for node_exporter's textfile collector, replacing ``path`` atomically.

    :raise InvalidArgument: When the file cannot be written.
    """
    registry = registry_for(CycleMetrics(lambda: cycle, lambda: totals or Totals()))
    try:
        write_to_textfile(path, registry)
    except OSError as err:
        raise InvalidArgument(f"cannot write {path}: {err.strerror or err}") from err


#: ``prometheus_client``'s value formatting (Go's, as Prometheus parses it), typed.
_go_float = cast(Callable[[float], str], floatToGoString)

#: Names the text formats take as they are (no quoting, no escaping): all of ours.
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def exposition(families: Iterable[Metric], *, openmetrics: bool) -> Optional[bytes]:
    """Our gauges and counters in Prometheus' text format (0.0.4), or OpenMetrics 1.0.0.

    The same bytes as ``prometheus_client``'s encoders write for these
    families (a unit test compares them, family by family, on every
    recorded scenario), without their per-sample work: with
    ``prometheus_client`` 0.26, each label name of each sample is checked
    against the legacy character set and escaped rune by rune. A scrape of
    30 domains took 4.1 to 4.2 ms in the text format and 6.2 to 7.0 ms in
    OpenMetrics (what Prometheus asks for), the families' making included;
    2.4 to 2.8 ms this way, in either. A family outside that shape (another
    type, a unit, a timestamp, an exemplar, a name that needs quoting) gives
    ``None``, and the caller uses the library's encoder.
    """
    out: List[str] = []
    # The same labels come back in every family of a domain: each set is sorted and escaped once.
    written: Dict[Tuple[Tuple[str, str], ...], str] = {}
    for family in families:
        kind, name = family.type, family.name
        if kind not in ("gauge", "counter") or family.unit or not _PLAIN_NAME.fullmatch(name):
            return None
        if openmetrics:
            head, help_text = name, _escape_value(family.documentation)
        else:
            head = name + "_total" if kind == "counter" else name
            help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        sample_name = name + "_total" if kind == "counter" else name
        out.append(f"# HELP {head} {help_text}\n# TYPE {head} {kind}\n")
        for sample in family.samples:
            if sample.name != sample_name or sample.timestamp is not None or sample.exemplar is not None:
                return None
            key = tuple(sample.labels.items())
            text = written.get(key)
            if text is None:
                labels = sorted(key)
                if not all(_PLAIN_NAME.fullmatch(label) for label, _ in labels):
                    return None
                text = written[key] = ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels)
            if text:
                out.append(f"{sample_name}{{{text}}} {_go_float(sample.value)}\n")
            else:
                out.append(f"{sample_name} {_go_float(sample.value)}\n")
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")

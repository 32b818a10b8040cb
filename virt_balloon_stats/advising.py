"""Reclaim advice for libvirt's domains: their limits and history in, one advice each, rendered.

:mod:`~virt_balloon_stats.advice` judges one guest from figures; this module
gives it what it needs for a domain libvirt lists, and renders the answers
for ``advise``. The domain's limits come from one ``XMLDesc`` call, parsed by
:func:`~virt_balloon_stats.domxml.parse_memory`: the balloon size is the live
XML's ``<currentMemory>``, the figure libvirt keeps from QEMU's balloon
events and also reports as ``virDomainGetInfo``'s memory. No job on QEMU is
needed for it, so a hung QEMU or a read-only connection costs nothing here,
where ``memoryStats()['actual']`` would ask QEMU (``query-balloon``), wait on
a hung one, and be absent without a balloon. The history comes from a
:data:`PointSource`: the history file's reader, or any other store that can
give a domain's points over a window.

Table and JSON are pure. Prometheus' text format is made with
``prometheus_client`` (the ``exporter`` extra), imported only for it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Sequence

from virt_balloon_stats.advice import Advice, Limits, Point, Policy, advise, host_total
from virt_balloon_stats.domxml import parse_memory
from virt_balloon_stats.errors import NEEDS_PROMETHEUS_CLIENT, DomainNotRunning, InvalidArgument
from virt_balloon_stats.formats import format_age, human_bytes, render_json, render_table

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from virt_balloon_stats.host import Guest

__all__ = [
    "PointSource",
    "DomainAdvice",
    "limits_of",
    "advise_guest",
    "render_advice_table",
    "render_advice_json",
    "advice_families",
    "render_advice_prometheus",
]

#: A domain's history: ``source(uuid, since, until)`` gives its points that
#: start in ``[since, until)``, as :meth:`History.points
#: <virt_balloon_stats.history.History.points>` does; none for a domain it
#: does not know.
PointSource = Callable[[str, float, float], Sequence[Point]]


@dataclasses.dataclass(frozen=True)
class DomainAdvice:
    """One domain's advice, and which domain on which connection it is for."""

    uri: str
    domain: str
    uuid: str
    advice: Advice

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document: ``domain``, ``uuid``, then :meth:`Advice.to_dict
        <virt_balloon_stats.advice.Advice.to_dict>`'s keys."""
        return {"domain": self.domain, "uuid": self.uuid, **self.advice.to_dict()}


def limits_of(xml: str) -> Limits:
    """A running domain's limits from its live XML: balloon size, ``<memory>``, ``<min_guarantee>``.

    :raise InvalidDomainXML: When the XML has no sizes that can be read.
    """
    sizes = parse_memory(xml)
    return Limits(actual=sizes.current, maximum=sizes.maximum, min_guarantee=sizes.min_guarantee)


def advise_guest(guest: Guest, uri: str, source: PointSource, policy: Policy, now: float) -> DomainAdvice:
    """Advise one domain: its limits from libvirt, its points over the window from ``source``.

    A domain the source has no points for gets "insufficient history".

    :raise DomainNotRunning: When the domain is shut off: it holds no memory to give back.
    :raise LibvirtFailure: When libvirt cannot give the domain's XML.
    :raise InvalidDomainXML: When its sizes cannot be read.
    :raise HistoryError: When the history cannot be read.
    """
    if guest.id is None:
        raise DomainNotRunning(
            "domain is not running, so it holds no memory to give back; pick a running one with 'virsh list'",
            domain=guest.name,
        )
    limits = limits_of(guest.xml())
    # Before the epoch there is no history, and the store's times would overflow.
    points = source(guest.uuid, max(0.0, now - policy.window_seconds), now)
    return DomainAdvice(uri, guest.name, guest.uuid, advise(points, limits, policy, now))


def _host_lines(advices: Sequence[DomainAdvice], hosts: Sequence[str]) -> Iterator[str]:
    for uri in hosts:
        mine = [a.advice for a in advices if a.uri == uri]
        advised = sum(1 for a in mine if a.recommended is not None)
        yield (f"host {uri}: {human_bytes(host_total(mine))} reclaimable "
               f"({advised} of {len(mine)} domain{'s' if len(mine) != 1 else ''} advised)")


def render_advice_table(
    advices: Sequence[DomainAdvice], hosts: Sequence[str], *, show_uri: bool = False
) -> str:
    """One row per domain, then one line per host (``hosts``: the URIs that answered) with its total."""
    header = ("DOMAIN", "ACTUAL", "RECOMMENDED", "RECLAIMABLE", "DEMAND", "CONFIDENCE", "HISTORY", "PRESSURE",
              "REASON")
    rows = [
        (
            a.domain + (f"@{a.uri}" if show_uri else ""),
            human_bytes(a.advice.actual),
            human_bytes(a.advice.recommended),
            human_bytes(a.advice.reclaimable),
            human_bytes(a.advice.demand),
            f"{a.advice.confidence:.2f}",
            format_age(a.advice.history_seconds),
            str(a.advice.pressure_events),
            a.advice.reason,
        )
        for a in advices
    ]
    table = render_table(header, rows) + "\n\n" if rows else ""
    return table + "\n".join(_host_lines(advices, hosts))


def render_advice_json(advices: Sequence[DomainAdvice]) -> str:
    """A JSON array, one document per domain (the host total is the table's and Prometheus')."""
    return render_json([a.to_dict() for a in advices])


def advice_families(advices: Sequence[DomainAdvice], hosts: Sequence[str]) -> List[Metric]:
    """The advice as Prometheus gauges, labelled as the domain series are; absent figures are left out.

    :raise InvalidArgument: When prometheus_client is not installed.
    """
    try:
        from prometheus_client.core import GaugeMetricFamily
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise InvalidArgument(NEEDS_PROMETHEUS_CLIENT) from err
    labels = ["uri", "domain", "uuid"]
    recommended = GaugeMetricFamily(
        "virt_balloon_recommended_bytes", "memory the guest should have, judged from its history",
        labels=labels,
    )
    reclaimable = GaugeMetricFamily(
        "virt_balloon_reclaimable_bytes", "balloon size above the recommended size: what could be taken back",
        labels=labels,
    )
    confidence = GaugeMetricFamily(
        "virt_balloon_advice_confidence", "0 to 1: how much usable history the advice rests on",
        labels=labels,
    )
    for a in advices:
        ids = [a.uri, a.domain, a.uuid]
        if a.advice.recommended is not None:
            recommended.add_metric(ids, a.advice.recommended)
        if a.advice.reclaimable is not None:
            reclaimable.add_metric(ids, a.advice.reclaimable)
        confidence.add_metric(ids, a.advice.confidence)
    host = GaugeMetricFamily(
        "virt_balloon_host_reclaimable_bytes",
        "memory the host could take back: its guests' reclaimable, summed",
        labels=["uri"],
    )
    for uri in hosts:
        host.add_metric([uri], host_total(a.advice for a in advices if a.uri == uri))
    return [recommended, reclaimable, confidence, host]


class _Families:
    """A ``prometheus_client`` collector of fixed families, for a registry of its own (not the global one)."""

    def __init__(self, families: List[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_advice_prometheus(advices: Sequence[DomainAdvice], hosts: Sequence[str]) -> str:
    """The text exposition format of :func:`advice_families`.

    :raise InvalidArgument: When prometheus_client is not installed.
    """
    families = advice_families(advices, hosts)
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()

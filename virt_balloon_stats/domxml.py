"""Domain XML to a balloon device description: pure, no policy.

The parser is hardened: no entity expansion, no DTD loading, no network,
no huge trees. Domain XML comes from libvirt, but a tool run as root should
not trust any input more than it must.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from lxml import etree

from virt_balloon_stats.errors import InvalidDomainXML

__all__ = ["MODELS", "BalloonDevice", "parse_balloon"]

#: libvirt's memballoon models, plus ``absent`` when the element is missing
#: (libvirt adds a virtio balloon to QEMU domains unless told ``none``).
MODELS = (
    "virtio",
    "virtio-transitional",
    "virtio-non-transitional",
    "xen",
    "none",
    "absent",
)


@dataclasses.dataclass(frozen=True)
class BalloonDevice:
    """What libvirt's XML says about a domain's ``<memballoon>``.

    :ivar model: One of :data:`MODELS`.
    :ivar alias: ``<alias name>``; present in live XML, absent in inactive XML.
    :ivar address_type: ``pci``, ``ccw``, ``virtio-mmio``..., or ``None``.
    :ivar stats_period: ``<stats period>`` in seconds; ``None`` when absent.
    :ivar autodeflate: ``autodeflate='on'|'off'``; ``None`` when absent.
    :ivar free_page_reporting: ``freePageReporting='on'|'off'``; ``None`` when absent.
    """

    model: str
    alias: Optional[str] = None
    address_type: Optional[str] = None
    stats_period: Optional[int] = None
    autodeflate: Optional[bool] = None
    free_page_reporting: Optional[bool] = None

    @property
    def present(self) -> bool:
        """Whether QEMU has a balloon device at all."""
        return self.model not in ("none", "absent")


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _on_off(value: Optional[str]) -> Optional[bool]:
    if value is None:
        return None
    return value == "on"


def parse_balloon(xml: str) -> BalloonDevice:
    """Read the balloon device from a domain XML document.

    :raise InvalidDomainXML: When the text is not a well-formed ``<domain>``
        or the stats period is not a non-negative integer.
    """
    try:
        root = etree.fromstring(xml.encode("utf-8"), parser=_parser())
    except UnicodeEncodeError as err:
        raise InvalidDomainXML(f"the domain XML is not valid Unicode ({err.reason} at {err.start})") from err
    except etree.XMLSyntaxError as err:
        raise InvalidDomainXML(f"the domain XML is not well-formed: {err}") from err
    if root.getroottree().docinfo.doctype:
        # libvirt never writes one; a DOCTYPE can only carry entities, which
        # lxml would still expand inside attribute values.
        raise InvalidDomainXML("domain XML must not carry a DOCTYPE")
    if root.tag != "domain":
        raise InvalidDomainXML(f"expected a <domain> document, got <{root.tag!s}>")
    node = root.find("./devices/memballoon")
    if node is None:
        return BalloonDevice(model="absent")
    stats = node.find("./stats")
    period_text = stats.get("period") if stats is not None else None
    period: Optional[int] = None
    if period_text is not None:
        # Digits only, and not thousands of them (int() refuses over 4300).
        if not re.fullmatch(r"[0-9]+", period_text) or len(period_text.lstrip("0")) > 1000:
            raise InvalidDomainXML(
                f"<memballoon><stats period={period_text[:40]!r}> is not a number of seconds"
            )
        period = int(period_text)
    alias = node.find("./alias")
    address = node.find("./address")
    return BalloonDevice(
        model=node.get("model", "absent"),
        alias=alias.get("name") if alias is not None else None,
        address_type=address.get("type") if address is not None else None,
        stats_period=period,
        autodeflate=_on_off(node.get("autodeflate")),
        free_page_reporting=_on_off(node.get("freePageReporting")),
    )

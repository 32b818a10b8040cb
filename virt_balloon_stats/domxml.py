"""Domain XML to a balloon device description and memory sizes: pure, no policy.

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

__all__ = ["MODELS", "BalloonDevice", "parse_balloon", "MemorySizes", "parse_memory"]

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


def _domain(xml: str) -> etree._Element:
    """The ``<domain>`` root of a document, parsed with the hardened parser.

    :raise InvalidDomainXML: When the text is not a well-formed ``<domain>``.
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
    return root


def _whole_number(text: str) -> bool:
    """Digits only, and not thousands of them (int() refuses over 4300)."""
    return re.fullmatch(r"[0-9]+", text) is not None and len(text.lstrip("0")) <= 1000


def parse_balloon(xml: str) -> BalloonDevice:
    """Read the balloon device from a domain XML document.

    :raise InvalidDomainXML: When the text is not a well-formed ``<domain>``
        or the stats period is not a non-negative integer.
    """
    root = _domain(xml)
    node = root.find("./devices/memballoon")
    if node is None:
        return BalloonDevice(model="absent")
    stats = node.find("./stats")
    period_text = stats.get("period") if stats is not None else None
    period: Optional[int] = None
    if period_text is not None:
        if not _whole_number(period_text):
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


@dataclasses.dataclass(frozen=True)
class MemorySizes:
    """What libvirt's XML says about a domain's memory, in bytes.

    :ivar current: ``<currentMemory>``. In live XML it is the balloon size
        libvirt keeps (what ``virDomainGetInfo`` reports as its memory); in
        inactive XML, the size the domain boots with. Absent, it is ``<memory>``,
        as libvirt takes it.
    :ivar maximum: ``<memory>``: the most the guest can have.
    :ivar min_guarantee: ``<memtune><min_guarantee>``; ``None`` when absent.
    """

    current: int
    maximum: int
    min_guarantee: Optional[int]


#: libvirt's size units by first letter: ``k`` and ``KiB`` are 1024, ``KB`` 1000 (its ``virScaleInteger``).
_POWERS = "kmgtpe"

#: libvirt keeps sizes in an unsigned 64-bit integer of bytes.
_MAX_BYTES = 2**64 - 1


def _size(root: etree._Element, path: str) -> Optional[int]:
    """Bytes of one size element, in its ``unit`` (libvirt's default: KiB); ``None`` when absent.

    :raise InvalidDomainXML: When its value is not a whole number or its unit is not libvirt's.
    """
    node = root.find(path)
    if node is None:
        return None
    text, unit = (node.text or "").strip(), node.get("unit", "KiB")
    low = unit.lower()
    if low in ("b", "byte", "bytes"):
        scale = 1
    elif low[:1] and low[0] in _POWERS and low[1:] in ("", "ib", "b"):
        scale = (1000 if low[1:] == "b" else 1024) ** (_POWERS.index(low[0]) + 1)
    else:
        raise InvalidDomainXML(f"<{node.tag!s} unit={unit[:40]!r}> is not a unit of size libvirt knows")
    if not _whole_number(text) or int(text) * scale > _MAX_BYTES:
        raise InvalidDomainXML(f"<{node.tag!s}> {text[:40]!r} is not a number of {unit} below 2^64 bytes")
    return int(text) * scale


def parse_memory(xml: str) -> MemorySizes:
    """Read a domain's memory sizes from its XML: ``<memory>``, ``<currentMemory>``, ``<min_guarantee>``.

    :raise InvalidDomainXML: When the text is not a well-formed ``<domain>``,
        has no ``<memory>``, or a size or unit is not one libvirt writes.
    """
    root = _domain(xml)
    maximum = _size(root, "./memory")
    if maximum is None:
        raise InvalidDomainXML("the domain XML has no <memory>, so no size for the guest")
    current = _size(root, "./currentMemory")
    return MemorySizes(
        current=maximum if current is None else current,
        maximum=maximum,
        min_guarantee=_size(root, "./memtune/min_guarantee"),
    )

"""virt_balloon_stats.domxml.parse_memory: a domain's memory sizes from libvirt's domain XML.

Every recorded document (live and inactive, of both stacks) is parsed; the
expected sizes are read from the same document with a plain regular
expression. None has a ``<memtune>``: libvirt's QEMU driver refuses
``<min_guarantee>`` ("Parameter 'min_guarantee' not supported by QEMU"), so
the testbed cannot make one; it is inserted into recorded documents here,
with every unit libvirt reads, and with bad values.
"""

from __future__ import annotations

import re

import pytest

from tests.unit.conftest import STACKS, load, scenario_names
from virt_balloon_stats.domxml import MemorySizes, parse_memory
from virt_balloon_stats.errors import InvalidDomainXML

KiB, MiB, GiB = 2**10, 2**20, 2**30

RECORDED_XML = [
    pytest.param(load(name, stack)[key], id=f"{stack}-{name}-{key}")
    for stack in STACKS
    for name in scenario_names(stack)
    for key in ("xml_live", "xml_inactive")
]


def _kib(xml: str, element: str) -> int:
    match = re.search(rf"<{element} unit='KiB'>([0-9]+)</{element}>", xml)
    assert match, f"every recorded document has <{element}> in KiB"
    return int(match.group(1)) * KiB


def with_memtune(xml: str, inner: str) -> str:
    """A recorded document with a ``<memtune>`` where libvirt writes it, after ``<currentMemory>``."""
    changed, count = re.subn(r"(</currentMemory>)", rf"\1\n  <memtune>{inner}</memtune>", xml, count=1)
    assert count == 1
    return changed


@pytest.mark.parametrize("xml", RECORDED_XML)
def test_recorded_xml(xml):
    assert parse_memory(xml) == MemorySizes(
        current=_kib(xml, "currentMemory"), maximum=_kib(xml, "memory"), min_guarantee=None
    )


def test_the_recorded_guests_have_their_testbed_sizes(stack):
    """Guard: 192 MiB guests, the noos one 64 MiB, the step one 384 MiB, none ballooned down at recording."""
    sizes_of = {"noos": 64, "step": 384}
    for name in scenario_names(stack):
        sizes = parse_memory(load(name, stack)["xml_live"])
        assert sizes.current == sizes.maximum == sizes_of.get(name, 192) * MiB, name


@pytest.mark.parametrize("stack", STACKS)
def test_min_guarantee_in_a_memtune_beside_other_limits(stack):
    xml = with_memtune(
        load("virtio", stack)["xml_live"],
        "<hard_limit unit='KiB'>1048576</hard_limit><soft_limit unit='KiB'>524288</soft_limit>"
        "<min_guarantee unit='KiB'>131072</min_guarantee>",
    )
    assert parse_memory(xml) == MemorySizes(current=192 * MiB, maximum=192 * MiB, min_guarantee=128 * MiB)


def test_a_memtune_without_min_guarantee_has_none():
    xml = with_memtune(load("virtio")["xml_live"], "<hard_limit unit='KiB'>1048576</hard_limit>")
    assert parse_memory(xml).min_guarantee is None


@pytest.mark.parametrize(
    "unit, value, expected",
    [
        (None, "131072", 128 * MiB),  # libvirt's default unit is KiB
        ("KiB", "131072", 128 * MiB),
        ("k", "131072", 128 * MiB),
        ("kib", "131072", 128 * MiB),
        ("KB", "131072", 131_072_000),
        ("b", "1048576", MiB),
        ("bytes", "1048576", MiB),
        ("M", "128", 128 * MiB),
        ("MiB", "128", 128 * MiB),
        ("MB", "128", 128_000_000),
        ("G", "2", 2 * GiB),
        ("GB", "2", 2_000_000_000),
        ("TiB", "1", 2**40),
        ("E", "15", 15 * 2**60),
        ("KiB", "0", 0),
        ("KiB", " 131072\n", 128 * MiB),
    ],
)
def test_units_as_libvirt_reads_them(unit, value, expected):
    attribute = "" if unit is None else f" unit='{unit}'"
    xml = with_memtune(load("virtio")["xml_live"], f"<min_guarantee{attribute}>{value}</min_guarantee>")
    assert parse_memory(xml).min_guarantee == expected


@pytest.mark.parametrize(
    "unit, value",
    [
        ("KiB", "-1"),
        ("KiB", "1.5"),
        ("KiB", ""),
        ("KiB", "0x10"),
        ("KiB", "9" * 5000),
        ("E", "16"),  # 2^64 bytes: past libvirt's unsigned 64 bits
        ("pages", "1"),
        ("Kb2", "1"),
        ("", "1"),
        ("x" * 500, "1"),
    ],
)
def test_a_size_libvirt_would_not_write_is_refused(unit, value):
    xml = with_memtune(load("virtio")["xml_live"], f"<min_guarantee unit='{unit}'>{value}</min_guarantee>")
    with pytest.raises(InvalidDomainXML) as caught:
        parse_memory(xml)
    assert "min_guarantee" in str(caught.value) and len(str(caught.value)) < 200


def test_without_current_memory_it_is_the_memory():
    xml = re.sub(r"\s*<currentMemory[^>]*>[^<]*</currentMemory>", "", load("virtio")["xml_inactive"])
    assert parse_memory(xml) == MemorySizes(current=192 * MiB, maximum=192 * MiB, min_guarantee=None)


def test_a_ballooned_guest_has_its_current_size():
    xml = load("virtio")["xml_live"].replace(
        "<currentMemory unit='KiB'>196608</currentMemory>", "<currentMemory unit='KiB'>131072</currentMemory>"
    )
    assert parse_memory(xml) == MemorySizes(current=128 * MiB, maximum=192 * MiB, min_guarantee=None)


@pytest.mark.parametrize(
    "xml, message",
    [
        ("<domain type='qemu'><name>x</name></domain>", "no <memory>"),
        ("<domain", "not well-formed"),
        ("<node/>", "expected a <domain>"),
        ("<!DOCTYPE domain [<!ENTITY x 'y'>]><domain><memory>1</memory></domain>", "DOCTYPE"),
    ],
)
def test_a_document_without_sizes_is_refused(xml, message):
    with pytest.raises(InvalidDomainXML, match=message):
        parse_memory(xml)

"""virt_balloon_stats.domxml: the balloon device from libvirt's domain XML.

Every recorded document (live and inactive, of both stacks) is parsed; the
expected values are read from the same document with a plain regular
expression, a different route to the same answer. Synthetic documents cover what the
testbed cannot produce (s390 ccw, virtio-mmio, no <memballoon> at all) and
hostile input.
"""

from __future__ import annotations

import re

import pytest

from tests.unit.conftest import STACKS, load, scenario_names
from virt_balloon_stats.domxml import MODELS, BalloonDevice, parse_balloon
from virt_balloon_stats.errors import InvalidDomainXML

RECORDED_XML = [
    pytest.param(load(name, stack)[key], id=f"{stack}-{name}-{key}")
    for stack in STACKS
    for name in scenario_names(stack)
    for key in ("xml_live", "xml_inactive")
]


def _memballoon(xml):
    match = re.search(r"<memballoon\b[^>]*/>|<memballoon\b.*?</memballoon>", xml, re.S)
    assert match, "every recorded QEMU domain has a <memballoon>"
    return match.group(0)


def _attr(text, element, attribute):
    match = re.search(rf"<{element}\b[^>]*\b{attribute}='([^']*)'", text)
    return match.group(1) if match else None


@pytest.mark.parametrize("xml", RECORDED_XML)
def test_recorded_xml(xml):
    """model, alias, address type and stats period, as the document says."""
    element = _memballoon(xml)
    period = _attr(element, "stats", "period")
    device = parse_balloon(xml)
    assert device == BalloonDevice(
        model=_attr(element, "memballoon", "model"),
        alias=_attr(element, "alias", "name"),
        address_type=_attr(element, "address", "type"),
        stats_period=None if period is None else int(period),
    )
    assert device.model in MODELS
    assert device.present is (device.model != "none")


def test_recordings_cover_the_models_and_routes_we_need(stack):
    """Guard: the table above includes virtio, transitional with a user alias, none and no-period."""
    devices = {name: parse_balloon(load(name, stack)["xml_live"]) for name in scenario_names(stack)}
    assert devices["virtio"].model == "virtio" and devices["virtio"].stats_period == 2
    assert devices["transitional"] == BalloonDevice(
        "virtio-transitional", "ua-mybal", "pci", 2, None, None
    )
    assert devices["none"] == BalloonDevice("none")
    assert not devices["none"].present
    assert devices["nostats"].stats_period is None


def test_each_set_is_the_stack_it_says(stack):
    """Guard: every domain of a set ran the machine type of the QEMU its set was recorded with.

    debian12: QEMU 7.2, pc-q35-7.2, libvirt 9.0; next: QEMU 10.0.2,
    pc-q35-10.0, libvirt 11.3, whose domains also get an implicit iTCO
    watchdog on q35 (which the balloon parser ignores).
    """
    expected = {"debian12": ("7.2.", "9.0.0", "pc-q35-7.2"), "next": ("10.0.2", "11.3.0", "pc-q35-10.0")}
    qemu, libvirt_version, machine = expected[stack]
    for name in scenario_names(stack):
        fixture = load(name, stack)
        assert fixture["recorded_with"]["qemu"].startswith(qemu), name
        assert fixture["recorded_with"]["libvirt"] == libvirt_version, name
        for key in ("xml_live", "xml_inactive"):
            assert _attr(fixture[key], "type", "machine") == machine, (name, key)
            assert ("<watchdog model='itco'" in fixture[key]) is (stack == "next"), (name, key)


def _domain(memballoon):
    return f"<domain type='kvm'><name>x</name><devices>{memballoon}</devices></domain>"


SYNTHETIC = [
    pytest.param(
        "<memballoon model='virtio'><alias name='balloon0'/>"
        "<address type='ccw' cssid='0xfe' ssid='0x0' devno='0x0002'/></memballoon>",
        BalloonDevice("virtio", "balloon0", "ccw", None), id="s390-ccw",
    ),
    pytest.param(
        "<memballoon model='virtio'><address type='virtio-mmio'/></memballoon>",
        BalloonDevice("virtio", None, "virtio-mmio", None), id="virtio-mmio",
    ),
    pytest.param(
        "<memballoon model='virtio' autodeflate='on' freePageReporting='off'>"
        "<stats period='10'/></memballoon>",
        BalloonDevice("virtio", None, None, 10, True, False), id="autodeflate-on-fpr-off",
    ),
    pytest.param(
        "<memballoon model='virtio' autodeflate='off' freePageReporting='on'/>",
        BalloonDevice("virtio", None, None, None, False, True), id="autodeflate-off-fpr-on",
    ),
    pytest.param(
        "<memballoon model='virtio-non-transitional'><stats period='0'/></memballoon>",
        BalloonDevice("virtio-non-transitional", None, None, 0), id="non-transitional-period-0",
    ),
    pytest.param("<memballoon model='xen'/>", BalloonDevice("xen"), id="xen"),
    pytest.param("", BalloonDevice("absent"), id="no-memballoon"),
]


@pytest.mark.parametrize("memballoon, expected", SYNTHETIC)
def test_synthetic_devices(memballoon, expected):
    """Addresses and attributes the testbed (x86 PCI, libvirt defaults) does not produce."""
    device = parse_balloon(_domain(memballoon))
    assert device == expected


def test_missing_memballoon_is_absent_not_present():
    """No element: ``absent``, and absent means no balloon to talk to."""
    device = parse_balloon(_domain(""))
    assert device.model == "absent"
    assert not device.present


@pytest.mark.parametrize(
    "period",
    ["two", "-1", "1.5", "", " 2", "0x10", "²", "١٢"],
)
def test_non_numeric_period_is_invalid_domain_xml(period):
    """Anything but ASCII digits is refused as InvalidDomainXML (never ValueError).

    ``²`` and ``١٢`` (Arabic-Indic digits) pass str.isdigit() but are not the
    decimal numbers libvirt writes.
    """
    with pytest.raises(InvalidDomainXML) as info:
        parse_balloon(_domain(f"<memballoon model='virtio'><stats period='{period}'/></memballoon>"))
    assert "period" in str(info.value)


@pytest.mark.parametrize(
    "xml, what",
    [
        pytest.param("", "not well-formed", id="empty"),
        pytest.param("<domain><devices>", "not well-formed", id="truncated"),
        pytest.param("virsh: error", "not well-formed", id="text"),
        pytest.param("<network><name>default</name></network>", "<network>", id="not-a-domain"),
    ],
)
def test_malformed_xml(xml, what):
    """Garbage and other libvirt objects are InvalidDomainXML, with a reason."""
    with pytest.raises(InvalidDomainXML) as info:
        parse_balloon(xml)
    assert what in str(info.value)


def test_malformed_xml_keeps_the_parser_error_as_cause():
    """The lxml error is chained for --debug."""
    with pytest.raises(InvalidDomainXML) as info:
        parse_balloon("<domain>")
    assert info.value.__cause__ is not None


def _laughs(depth):
    entities = ['<!ENTITY lol0 "LOLTEXT">'] + [
        f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10}">' for i in range(1, depth + 1)
    ]
    return "<!DOCTYPE domain [" + "".join(entities) + "]>"


def test_billion_laughs_is_refused_not_expanded():
    """The classic 10^9 expansion: refused, and nothing expanded reaches the result."""
    xml = _laughs(9) + _domain("<memballoon model='virtio'><alias name='&lol9;'/></memballoon>")
    with pytest.raises(InvalidDomainXML) as info:
        parse_balloon(xml)
    assert "LOLTEXT" not in str(info.value)


@pytest.mark.parametrize(
    "memballoon",
    [
        pytest.param("<memballoon model='virtio'><alias name='&lol2;'/></memballoon>", id="alias"),
        pytest.param("<memballoon model='&lol0;'/>", id="model"),
        pytest.param("<memballoon model='virtio'><address type='&lol1;'/></memballoon>", id="address"),
    ],
)
def test_small_internal_entities_are_not_expanded(memballoon):
    """"no entity expansion" (the module's promise): an entity's text never shows up in the device.

    A small expansion passes libxml2's amplification limit, so only the
    parser settings (or refusing any DTD, which libvirt never writes) keep it out.
    """
    xml = _laughs(2) + _domain(memballoon)
    try:
        device = parse_balloon(xml)
    except InvalidDomainXML as err:
        assert "LOLTEXT" not in str(err)
        return
    assert "LOLTEXT" not in repr(device)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("SECRET-MARKER-9f3a")
    return path


@pytest.mark.parametrize(
    "memballoon",
    [
        pytest.param("<memballoon model='virtio'><alias name='&xxe;'/></memballoon>", id="attribute"),
        pytest.param("<memballoon model='virtio'><alias name='a'>&xxe;</alias></memballoon>", id="text"),
    ],
)
def test_external_entity_is_never_fetched(secret_file, memballoon):
    """An external entity (a local file here) is not read into the result or the error."""
    xml = f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "{secret_file.as_uri()}">]>' + _domain(memballoon)
    try:
        result = repr(parse_balloon(xml))
    except InvalidDomainXML as err:
        result = str(err)
    assert "SECRET-MARKER" not in result


def test_external_dtd_is_not_loaded(tmp_path):
    """An external DTD could add default attributes; it must not be loaded."""
    dtd = tmp_path / "domain.dtd"
    dtd.write_text("<!ATTLIST alias name CDATA 'FROM-DTD'>")
    xml = f'<!DOCTYPE domain SYSTEM "{dtd.as_uri()}">' + _domain(
        "<memballoon model='virtio'><alias/></memballoon>"
    )
    try:
        result = repr(parse_balloon(xml))
    except InvalidDomainXML as err:
        result = str(err)
    assert "FROM-DTD" not in result

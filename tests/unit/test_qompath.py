"""virt_balloon_stats.qompath: where the balloon lives in QOM, and the path cache.

The alias route is exercised with the recorded qom-list replies of the
``virtio`` (libvirt's alias ``balloon0``) and ``transitional`` (user alias
``ua-mybal``) scenarios. The search route needs a tree QEMU builds for a
device created without an id, which libvirt never does; that tree is built
from the recorded replies by moving the recorded balloon entry to
``/machine/peripheral-anon/device[1]``, where QEMU puts anonymous devices.
"""

from __future__ import annotations

import json

import pytest

from tests.fakelibvirt import FakeDomain
from tests.unit.conftest import World, balloon, load, stack_scenarios, world
from virt_balloon_stats.domxml import BalloonDevice, parse_balloon
from virt_balloon_stats.errors import NoBalloonDevice, QOMPathNotFound
from virt_balloon_stats.host import Guest
from virt_balloon_stats.qompath import MAX_LIST_CALLS, QOMPathCache, expected_qom_type, resolve

# (model, address type) -> QOM type, from libvirt's qemuBuildMemballoonCommandLine
# and QEMU's device names; None means "no virtio balloon for this".
QOM_TYPES = [
    ("virtio", None, "virtio-balloon-pci"),
    ("virtio", "pci", "virtio-balloon-pci"),
    ("virtio", "ccw", "virtio-balloon-ccw"),
    ("virtio", "virtio-mmio", "virtio-balloon-device"),
    ("virtio-transitional", None, "virtio-balloon-pci-transitional"),
    ("virtio-transitional", "pci", "virtio-balloon-pci-transitional"),
    ("virtio-non-transitional", None, "virtio-balloon-pci-non-transitional"),
    ("virtio-non-transitional", "pci", "virtio-balloon-pci-non-transitional"),
    ("virtio", "isa", None),
    ("xen", None, None),
    ("xen", "pci", None),
    ("xen", "ccw", None),
    ("xen", "virtio-mmio", None),
]


@pytest.mark.parametrize("model, address, qom_type", QOM_TYPES)
def test_expected_qom_type(model, address, qom_type):
    """libvirt's derivation of the QOM type; a xen balloon is never a virtio one, on any address."""
    device = BalloonDevice(model=model, address_type=address)
    if qom_type is None:
        with pytest.raises(QOMPathNotFound):
            expected_qom_type(device)
    else:
        assert expected_qom_type(device) == qom_type


@pytest.mark.parametrize("model", ["none", "absent"])
def test_expected_qom_type_without_balloon(model):
    """No balloon at all is its own error, not a failed search."""
    with pytest.raises(NoBalloonDevice):
        expected_qom_type(BalloonDevice(model=model))


def _peripheral_type(fixture, name):
    command = {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}
    reply = next(json.loads(q["reply"]) for q in fixture["qmp"] if q["command"] == command)
    return next(e["type"] for e in reply["return"] if e["name"] == name)


WITH_BALLOON = ["virtio", "transitional", "virtio-hog", "nodriver", "noos", "stale", "paused", "reset"]


@pytest.mark.parametrize("stack, name", stack_scenarios(only=WITH_BALLOON))
def test_resolve_by_alias(stack, name):
    """The alias in the live XML names the child of /machine/peripheral the recorder found."""
    fixture = load(name, stack)
    device = balloon(fixture)
    w = World([fixture], stack=stack)
    path = resolve(w.client.qmp, w.guest(), device)
    assert path.path == fixture["balloon_path"] == f"/machine/peripheral/{device.alias}"
    assert path.method == "alias"
    assert f"child<{path.qom_type}>" == _peripheral_type(fixture, device.alias)
    assert w.transport.commands() == [
        {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}},
        {"execute": "qom-list", "arguments": {"path": fixture["balloon_path"]}},
    ]


def test_resolve_of_no_balloon_sends_nothing():
    """model='none': NoBalloonDevice before any QMP command."""
    w = world("none")
    with pytest.raises(NoBalloonDevice):
        resolve(w.client.qmp, w.guest(), balloon(w.fixtures[0]))
    assert w.transport.sent == []


def _anonymous(fixture):
    """The recorded exchanges, with the balloon moved where QEMU puts a device without an id.

    Synthetic on purpose: libvirt always gives the balloon an id, so the
    testbed cannot record this tree. Every reply is a recorded one; only the
    balloon's entry is taken out of /machine/peripheral and listed, renamed
    ``device[1]``, under /machine/peripheral-anon (QEMU's docs show that path).
    """
    peripheral = {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}
    old_path = fixture["balloon_path"]
    alias = old_path.rsplit("/", 1)[1]
    new_path = "/machine/peripheral-anon/device[1]"
    exchanges = []
    for q in fixture["qmp"]:
        command, reply = q["command"], json.loads(q["reply"])
        if command == peripheral:
            entry = next(e for e in reply["return"] if e["name"] == alias)
            reply["return"].remove(entry)
            exchanges.append({"command": command, "reply": json.dumps(reply)})
            anon = {"return": [{"name": "type", "type": "string"}, dict(entry, name="device[1]")]}
            exchanges.append({
                "command": {"execute": "qom-list", "arguments": {"path": "/machine/peripheral-anon"}},
                "reply": json.dumps(anon),
            })
            continue
        if command.get("arguments", {}).get("path") == old_path:
            command = dict(command, arguments=dict(command["arguments"], path=new_path))
        exchanges.append({"command": command, "reply": q["reply"]})
    fixture["qmp"] = exchanges
    return new_path


@pytest.mark.parametrize("stack, name", stack_scenarios(only={"virtio", "transitional"}))
def test_resolve_by_search_when_alias_is_missing(stack, name):
    """The alias is not under /machine/peripheral: the search finds the balloon in peripheral-anon."""
    fixture = load(name, stack)
    device = balloon(fixture)
    new_path = _anonymous(fixture)
    w = World([fixture], stack=stack)
    path = resolve(w.client.qmp, w.guest(), device)
    assert path.path == new_path
    assert path.method == "search"
    assert path.qom_type == expected_qom_type(device)
    assert w.transport.commands()[-1] == {"execute": "qom-list", "arguments": {"path": new_path}}


def test_resolve_by_search_without_alias_in_xml():
    """An XML without <alias> goes straight to the search (no alias route call)."""
    fixture = load("virtio")
    new_path = _anonymous(fixture)
    device = BalloonDevice(model="virtio", address_type="pci", stats_period=2)
    w = World([fixture])
    assert resolve(w.client.qmp, w.guest(), device).path == new_path
    paths = [c["arguments"]["path"] for c in w.transport.commands("qom-list")]
    assert paths == ["/machine/peripheral", "/machine/peripheral-anon", new_path]


def _wide_tree(fixture, children):
    """A tree with ``children`` root ports and no balloon anywhere.

    Synthetic: every node is the recorded ``pci.1`` entry, renamed; a big
    guest has this many (and more) nodes. The walk must give up on its bound.
    """
    peripheral = {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}
    reply = next(json.loads(q["reply"]) for q in fixture["qmp"] if q["command"] == peripheral)
    port = next(e for e in reply["return"] if e["name"] == "pci.1")
    leaf = json.dumps({"return": [{"name": "type", "type": "string"}]})
    names = [f"pci.{i}" for i in range(children)]
    ports = [{"name": "type", "type": "string"}] + [dict(port, name=n) for n in names]
    anon = {"execute": "qom-list", "arguments": {"path": "/machine/peripheral-anon"}}
    exchanges = [
        {"command": peripheral, "reply": json.dumps({"return": ports})},
        {"command": anon, "reply": leaf},
        {"command": {"execute": "qom-list", "arguments": {"path": "/machine"}},
         "reply": json.dumps({"return": [{"name": "peripheral", "type": "child<container>"},
                                         {"name": "peripheral-anon", "type": "child<container>"}]})},
    ]
    exchanges += [
        {"command": {"execute": "qom-list", "arguments": {"path": f"/machine/peripheral/{n}"}}, "reply": leaf}
        for n in names
    ]
    fixture["qmp"] = exchanges


def test_bounded_search_gives_up_after_max_list_calls():
    """A tree bigger than the bound: QOMPathNotFound after exactly MAX_LIST_CALLS search calls."""
    fixture = load("virtio")
    _wide_tree(fixture, MAX_LIST_CALLS * 2)
    w = World([fixture])
    with pytest.raises(QOMPathNotFound) as info:
        resolve(w.client.qmp, w.guest(), balloon(fixture))
    alias_route_calls = 1
    assert len(w.transport.commands("qom-list")) == alias_route_calls + MAX_LIST_CALLS
    assert str(MAX_LIST_CALLS) in str(info.value)
    assert info.value.domain == fixture["domain"]["name"]


def test_search_skips_missing_containers():
    """QEMU's DeviceNotFound for a container (recorded reply) does not stop the search."""
    fixture = load("virtio")
    new_path = _anonymous(fixture)
    not_found = next(q["reply"] for q in fixture["qmp"] if "DeviceNotFound" in q["reply"])
    # /machine/peripheral answers DeviceNotFound (a recorded error reply) on the search route.
    for q in fixture["qmp"]:
        if q["command"] == {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}:
            q["reply"] = not_found
    w = World([fixture])
    assert resolve(w.client.qmp, w.guest(), balloon(fixture)).path == new_path


def test_found_object_without_polling_property_is_not_trusted():
    """An object of the right type but without guest-stats-polling-interval is not the balloon."""
    fixture = load("virtio")
    path = fixture["balloon_path"]
    for q in fixture["qmp"]:
        if q["command"] == {"execute": "qom-list", "arguments": {"path": path}}:
            reply = json.loads(q["reply"])
            reply["return"] = [e for e in reply["return"] if e["name"] != "guest-stats-polling-interval"]
            q["reply"] = json.dumps(reply)
    w = World([fixture])
    with pytest.raises(QOMPathNotFound):
        resolve(w.client.qmp, w.guest(), balloon(fixture))


def test_cache_resolves_once_per_incarnation():
    """Cached per (UUID, id): a second ask costs no qom-list; a restart (new id) re-resolves."""
    fixture = load("virtio")
    w = World([fixture])
    cache = QOMPathCache()
    device = balloon(fixture)
    first = cache.resolve(w.client.qmp, w.guest(), device)
    assert len(w.transport.commands("qom-list")) == 2
    assert cache.resolve(w.client.qmp, w.guest(), device) == first
    assert len(w.transport.commands("qom-list")) == 2

    restarted = FakeDomain(fixture, dom_id=fixture["domain"]["id"] + 1)
    again = Guest(restarted, w.host.counter)
    assert cache.get(again) is None
    assert cache.resolve(w.client.qmp, again, device) == first
    assert len(w.transport.commands("qom-list")) == 4
    # The earlier incarnation's entry was dropped, not kept beside the new one.
    assert cache.get(w.guest()) is None


def test_cache_forget_drops_the_domain():
    """forget() makes the next resolve ask QEMU again."""
    fixture = load("virtio")
    w = World([fixture])
    cache = QOMPathCache()
    cache.resolve(w.client.qmp, w.guest(), balloon(fixture))
    cache.forget(w.guest())
    assert cache.get(w.guest()) is None
    cache.resolve(w.client.qmp, w.guest(), balloon(fixture))
    assert len(w.transport.commands("qom-list")) == 4


def test_client_qom_path_uses_the_cache():
    """BalloonStats.qom_path resolves once per domain incarnation."""
    fixture = load("transitional")
    w = World([fixture])
    assert w.client.qom_path(w.guest()).path == fixture["balloon_path"]
    assert w.client.qom_path(w.guest()).path == fixture["balloon_path"]
    assert len(w.transport.commands("qom-list")) == 2
    assert parse_balloon(fixture["xml_live"]).alias == "ua-mybal"

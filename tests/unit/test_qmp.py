"""virt_balloon_stats.qmp: the allowlist, building commands, and reading replies.

The replies are those QEMU 7.2 and QEMU 10.0 gave through libvirt's
passthrough on the testbed (every recorded exchange of every scenario of
both stacks), plus a few malformed ones, built inline, that a well-behaved
QEMU never sends.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import STACKS, World, load, scenario_names, world
from virt_balloon_stats.errors import CommandNotAllowed, QMPBadReply, QMPExecuteError
from virt_balloon_stats.qmp import POLLING_PROPERTY, build_command, check_allowed, parse_reply

ALL_EXCHANGES = [
    pytest.param(q["command"], q["reply"], id=f"{stack}-{name}-{i}-{q['command']['execute']}")
    for stack in STACKS
    for name in scenario_names(stack)
    for i, q in enumerate(load(name, stack)["qmp"])
]

# QMP commands that would change or stop the guest; the passthrough would run
# any of them, so the allowlist must refuse them before anything is sent.
REFUSED = [
    ("quit", None),
    ("system_reset", None),
    ("stop", None),
    ("cont", None),
    ("device_del", {"id": "balloon0"}),
    ("balloon", {"value": 1048576}),
    ("migrate", {"uri": "tcp:192.0.2.1:4444"}),
    ("human-monitor-command", {"command-line": "info balloon"}),
    ("qmp_capabilities", None),
    ("QOM-GET", {"path": "/machine", "property": "type"}),
    ("qom_get", {"path": "/machine", "property": "type"}),
    ("", None),
]

# qom-set of anything but the polling interval, including the property name
# QEMU's own doc gets wrong and the backend's other writable properties.
REFUSED_QOM_SET = [
    {"path": "/machine/peripheral/balloon0", "property": "stats-polling-interval", "value": 2},
    {"path": "/machine/peripheral/balloon0", "property": "deflate-on-oom", "value": True},
    {"path": "/machine/peripheral/balloon0", "property": "free-page-reporting", "value": True},
    {"path": "/machine/peripheral/balloon0", "property": "guest-stats", "value": {}},
    {"path": "/machine/peripheral/balloon0", "property": "GUEST-STATS-POLLING-INTERVAL", "value": 2},
    {"path": "/machine/peripheral/balloon0", "value": 2},
    None,
]


@pytest.mark.parametrize("execute, arguments", REFUSED)
def test_commands_off_the_allowlist_are_refused(execute, arguments):
    """Anything that is not a balloon read is refused, and says nothing was sent."""
    with pytest.raises(CommandNotAllowed) as info:
        build_command(execute, arguments)
    assert repr(execute) in str(info.value)
    assert "nothing was sent" in str(info.value)


@pytest.mark.parametrize("arguments", REFUSED_QOM_SET)
def test_qom_set_of_any_other_property_is_refused(arguments):
    """Only the polling interval may be written."""
    with pytest.raises(CommandNotAllowed) as info:
        check_allowed("qom-set", arguments)
    assert POLLING_PROPERTY in str(info.value)


@pytest.mark.parametrize(
    "execute, arguments",
    [(execute, arguments) for execute, arguments in REFUSED]
    + [("qom-set", arguments) for arguments in REFUSED_QOM_SET],
)
def test_refused_commands_never_reach_libvirt(execute, arguments):
    """The refusal happens in the client, before the transport is called."""
    w = world("virtio")
    guest = w.guest()
    with pytest.raises(CommandNotAllowed) as info:
        w.client.qmp.execute(guest, execute, arguments)
    assert w.transport.sent == []
    assert w.host.counter.total() == 0
    assert info.value.sent is None


@pytest.mark.parametrize("command, reply", ALL_EXCHANGES)
def test_every_recorded_command_is_allowed_and_built_without_id(command, reply):
    """The commands the recorder sent are the package's kind, except the error cases it provoked.

    It also sent the doc-typo qom-set and a qom-set of -1, to record QEMU's
    answers; the package refuses both before anything is sent.
    """
    arguments = command.get("arguments")
    if command["execute"] == "qom-set" and (
        arguments["property"] != POLLING_PROPERTY or arguments["value"] < 0
    ):
        with pytest.raises(CommandNotAllowed):
            build_command(command["execute"], arguments)
        return
    built = json.loads(build_command(command["execute"], arguments))
    assert built == command
    assert "id" not in built


def test_built_command_is_compact_json_without_arguments_when_none():
    """query-balloon carries no ``arguments`` member at all."""
    assert build_command("query-balloon") == '{"execute":"query-balloon"}'
    assert build_command("query-balloon", {}) == '{"execute":"query-balloon"}'


@pytest.mark.parametrize("command, reply", ALL_EXCHANGES)
def test_parse_reply_on_every_recorded_reply(command, reply):
    """``return`` becomes the value; ``error`` becomes QMPExecuteError with QEMU's class and desc."""
    sent = json.dumps(command)
    message = json.loads(reply)
    if "error" in message:
        with pytest.raises(QMPExecuteError) as info:
            parse_reply(sent, reply)
        err = info.value
        assert err.error_class == message["error"]["class"]
        assert err.desc == message["error"]["desc"]
        assert err.sent == sent
        assert err.received == reply
        assert message["error"]["class"] in str(err) and message["error"]["desc"] in str(err)
    else:
        assert parse_reply(sent, reply) == message["return"]


def test_recordings_hold_both_reply_kinds(stack):
    """Guard for the table above: each set does contain QMP errors and returns."""
    kinds = {
        "error" if "error" in json.loads(p.values[1]) else "return"
        for p in ALL_EXCHANGES if p.id.startswith(f"{stack}-")
    }
    assert kinds == {"error", "return"}


# Malformed replies: synthetic, since QEMU never sent these on the testbed.
BAD_REPLIES = [
    pytest.param("", "not JSON", id="empty"),
    pytest.param("{\"return\":", "not JSON", id="truncated"),
    pytest.param("<html>", "not JSON", id="html"),
    pytest.param("[1, 2]", "not a JSON object", id="array"),
    pytest.param("\"return\"", "not a JSON object", id="string"),
    pytest.param("null", "not a JSON object", id="null"),
    pytest.param("{\"id\":\"libvirt-1\"}", "neither 'return' nor 'error'", id="neither"),
    pytest.param("{\"QMP\":{\"version\":{}}}", "neither 'return' nor 'error'", id="greeting"),
    pytest.param("{\"error\":\"boom\"}", "malformed", id="error-not-object"),
    pytest.param("{\"error\":{\"class\":\"GenericError\"}}", "malformed", id="error-no-desc"),
    pytest.param("{\"error\":{\"desc\":\"x\"}}", "malformed", id="error-no-class"),
    pytest.param("{\"error\":{\"class\":1,\"desc\":\"x\"}}", "malformed", id="error-class-not-str"),
]


@pytest.mark.parametrize("received, what", BAD_REPLIES)
def test_parse_reply_bad_replies_are_typed_and_keep_the_texts(received, what):
    """A bad reply is a QMPBadReply showing the offending text, with sent and received kept."""
    sent = build_command("query-balloon")
    with pytest.raises(QMPBadReply) as info:
        parse_reply(sent, received)
    err = info.value
    assert what in str(err)
    assert err.sent == sent
    assert err.received == received
    assert repr(received[:200]) in str(err)


def test_parse_reply_not_json_is_raised_from_the_decoder_error():
    """The JSON decoder's error is kept as the cause."""
    with pytest.raises(QMPBadReply) as info:
        parse_reply("{}", "{bad")
    assert isinstance(info.value.__cause__, ValueError)


def test_parse_reply_quotes_at_most_200_characters():
    """A huge bad reply does not flood the one-line message."""
    received = "x" * 5000
    with pytest.raises(QMPBadReply) as info:
        parse_reply("{}", received)
    assert len(str(info.value)) < 400
    assert info.value.received == received


def test_qmp_error_through_the_client_names_the_domain(virtio):
    """The client tags QEMU's refusal with the domain, keeping class, desc and both texts."""
    nope = "/machine/peripheral/nope"
    command = {"execute": "qom-get", "arguments": {"path": nope, "property": "guest-stats"}}
    w = world("virtio")
    with pytest.raises(QMPExecuteError) as info:
        w.client.qmp.qom_get(w.guest(), nope, "guest-stats")
    recorded = next(q for q in virtio["qmp"] if q["command"] == command)
    err = info.value
    assert err.domain == virtio["domain"]["name"]
    assert err.error_class == json.loads(recorded["reply"])["error"]["class"]
    assert err.received == recorded["reply"]
    assert json.loads(err.sent) == command


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param('{"return":{"stats":{}}}', id="not-a-list"),
        pytest.param('{"return":[{"name":"type"}]}', id="no-type"),
        pytest.param('{"return":[{"name":1,"type":"string"}]}', id="name-not-str"),
    ],
)
def test_qom_list_rejects_a_reply_that_is_not_a_property_list(virtio, reply):
    """Synthetic qom-list answers of the wrong shape: QMPBadReply naming the path."""
    path = "/machine/peripheral"
    virtio["qmp"] = [{"command": {"execute": "qom-list", "arguments": {"path": path}}, "reply": reply}]
    w = World([virtio])
    with pytest.raises(QMPBadReply) as info:
        w.client.qmp.qom_list(w.guest(), path)
    assert path in str(info.value)
    assert info.value.domain == virtio["domain"]["name"]


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param('{"return":{}}', id="no-actual"),
        pytest.param('{"return":{"actual":"1"}}', id="string"),
        pytest.param('{"return":{"actual":true}}', id="bool"),
        pytest.param('{"return":[]}', id="not-object"),
    ],
)
def test_query_balloon_rejects_a_non_integer_actual(virtio, reply):
    """Synthetic query-balloon answers without an integer ``actual``."""
    virtio["qmp"] = [{"command": {"execute": "query-balloon"}, "reply": reply}]
    w = World([virtio])
    with pytest.raises(QMPBadReply) as info:
        w.client.qmp.query_balloon(w.guest())
    assert "actual" in str(info.value)


def test_query_balloon_returns_recorded_actual_bytes(virtio):
    """``actual`` is bytes, as QEMU said, and libvirt's ``actual`` is the same in KiB."""
    w = World([virtio])
    actual = w.client.qmp.query_balloon(w.guest())
    recorded = next(
        json.loads(q["reply"]) for q in virtio["qmp"] if q["command"]["execute"] == "query-balloon"
    )
    assert actual == recorded["return"]["actual"]
    assert actual // 1024 == virtio["memory_stats"]["actual"]

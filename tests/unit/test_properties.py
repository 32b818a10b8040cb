"""Bad input never escapes as an unexpected exception: property-based tests over every parser.

Each test feeds one parser or validator inputs drawn by Hypothesis (arbitrary
text, arbitrary JSON, near-miss shapes, huge and deeply nested values) and
checks that every outcome is either a valid value, as the parser documents
it, or an error of the package's own tree with a readable message. Any other
exception is left to fail the test, so the report names the input and the
exception that escaped. The ``@example`` cases are edges named in the
reliability issue; they run on every run, before the generated ones.

Nothing here needs a daemon or the network. The CLI runs with every ``-c`` and
``LIBVIRT_DEFAULT_URI`` on libvirt's in-process ``test://`` driver with a file
that is missing or does not parse, which fails at once, and any other URI
fails the test. ``counted`` (conftest) adds up the cases run; the total is
printed at the end of the run.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fractions
import hashlib
import io
import ipaddress
import json
import math
import operator
import os
import re
import sys
import types
import uuid
from decimal import Decimal
from typing import Any, Callable, Dict, List, Optional, Tuple, Type
from xml.sax.saxutils import quoteattr

import libvirt
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import counted, world
from virt_balloon_stats import exporter
from virt_balloon_stats.cli import main
from virt_balloon_stats.collector import Cycle, HostState
from virt_balloon_stats.crosscheck import CrossCheck, Result, Verdict, crosscheck, skipped
from virt_balloon_stats.domxml import MODELS, BalloonDevice, parse_balloon
from virt_balloon_stats.errors import (
    BalloonStatsError,
    CommandNotAllowed,
    InvalidArgument,
    InvalidDomainXML,
    QMPBadReply,
    QMPExecuteError,
    QMPFailure,
)
from virt_balloon_stats.exporter import check_password, load_users, parse_listen
from virt_balloon_stats.metrics import render
from virt_balloon_stats.polling import (
    MAX_LIBVIRT_PERIOD,
    MAX_QEMU_INTERVAL,
    ROUTES,
    PollingState,
    validate_interval,
)
from virt_balloon_stats.qmp import POLLING_PROPERTY, build_command, parse_reply
from virt_balloon_stats.sample import SOURCES, Sample
from virt_balloon_stats.stats import (
    ACTUAL,
    LAST_UPDATE,
    RSS,
    STATS,
    STATS_BY_QEMU_NAME,
    GuestStats,
    Status,
    classify,
    memory_stats_from_domstats,
    parse_guest_stats,
    stats_from_libvirt,
)

# -- shared strategies ---------------------------------------------------------------------

PROFILE: Dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
#: For the tests that share one tmp_path or monkeypatch between all their cases, on purpose.
SHARED_FIXTURE: Dict[str, Any] = {
    **PROFILE,
    "suppress_health_check": [*PROFILE["suppress_health_check"], HealthCheck.function_scoped_fixture],
}

#: Over Python's 4300-digit limit on int <-> str conversion.
BIG = 10**5000

#: Integers with a meaning: unsupported (-1, 2^64-1), C int, uint32, int64 and uint64 edges.
EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**64)
WIRE_INTS = st.integers(-(2**70), 2**70) | st.sampled_from(EDGE_INTS)
#: Past what a float holds: a QMP reply can carry such an int (json.loads takes up to
#: 4300 digits), float arithmetic cannot.
BEYOND_FLOAT = st.integers(2**1024, 2**1100) | st.integers(-(2**1100), -(2**1024))
REPLY_INTS = WIRE_INTS | BEYOND_FLOAT | st.sampled_from([10**4299, -(10**4299)])

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), WIRE_INTS, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=9)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)

#: Not JSON at all: Python objects a careless caller could pass.
ODD_OBJECTS = st.sampled_from(
    [b"5", bytearray(b"x"), Decimal("5"), fractions.Fraction(5), complex(5, 0), object(), (5,), {5}, [5], 5.0]
)


def _surrogateescaped(data: bytes) -> str:
    """Bytes as Python hands a non-UTF-8 argv, file name or file to a program."""
    return data.decode("utf-8", "surrogateescape")


#: Every kind of text: plain unicode, lone surrogates, non-UTF-8 bytes, and huge repetitions.
ANY_TEXT = st.one_of(
    st.text(),
    st.text(st.characters(exclude_categories=())),
    st.binary().map(_surrogateescaped),
    st.builds(operator.mul, st.text(min_size=1, max_size=8), st.integers(1, 100_000)),
)


def _merged(*parts: Dict[Any, Any]) -> Dict[Any, Any]:
    out: Dict[Any, Any] = {}
    for part in parts:
        out.update(part)
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _outcome(
    call: Callable[..., Any], *args: Any, errors: Tuple[Type[BalloonStatsError], ...], **kwargs: Any
) -> Tuple[bool, Any]:
    """``(True, value)``, or ``(False, error)`` for one of ``errors``; anything else fails the test."""
    try:
        return True, call(*args, **kwargs)
    except errors as err:
        assert str(err).strip(), f"{type(err).__name__} with an empty message"
        return False, err


def _same(a: Any, b: Any) -> bool:
    return bool(a == b) or repr(a) == repr(b)  # repr: NaN is not equal to itself


# -- qmp.parse_reply -----------------------------------------------------------------------

SENT = '{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}'

#: What a QMP reply is made of, for text that is nearly JSON.
JSON_TOKENS = st.sampled_from(
    [
        "{", "}", "[", "]", ":", ",", '"', "\\", "\\u", "\\ud800", "\\u0000", '"return"', '"error"',
        '"class"', '"desc"', '"id"', '"libvirt-1"', "null", "true", "false", "NaN", "Infinity",
        "-Infinity", "1e999", "-", "0", "1", "01", "1.5", "18446744073709551615", "9" * 4301, '"x"',
        " ", "\n", "\x00", "'", "\ufeff",
    ]
)
NEAR_JSON = st.lists(JSON_TOKENS, max_size=40).map("".join)


def _expected_reply(message: Any) -> Tuple[str, Any]:
    """What a reply means in QMP: a value, an execute error, or a bad reply."""
    if not isinstance(message, dict):
        return "bad", None
    if "error" in message:
        error = message["error"]
        if isinstance(error, dict) and all(isinstance(error.get(k), str) for k in ("class", "desc")):
            return "error", (error["class"], error["desc"])
        return "bad", None
    if "return" not in message:
        return "bad", None
    return "value", message["return"]


def _check_reply(received: str, expected: Optional[Tuple[str, Any]]) -> None:
    ok, result = _outcome(parse_reply, SENT, received, errors=(QMPExecuteError, QMPBadReply))
    if not ok:
        assert isinstance(result, QMPFailure)
        assert result.received is received and result.sent == SENT, "the raw texts must be kept"
    if expected is None:
        return
    kind, detail = expected
    if kind == "value":
        assert ok and _same(result, detail)
    elif kind == "error":
        assert isinstance(result, QMPExecuteError) and (result.error_class, result.desc) == detail
    else:
        assert isinstance(result, QMPBadReply)


@settings(max_examples=1000, **PROFILE)
@given(received=ANY_TEXT | NEAR_JSON)
@example(received="[" * 100_000 + "]" * 100_000)
@example(received='{"return": ' + "[" * 5_000 + "]" * 5_000 + "}")
@example(received='{"return": ' + "9" * 4301 + "}")
@example(received='{"return": 1}'.encode("utf-16").decode("latin-1"))
@counted
def test_parse_reply_of_any_text(received):
    """Any text is a value, an execute error or a bad reply, never a raw exception."""
    try:
        expected = _expected_reply(json.loads(received))
    except (ValueError, RecursionError):
        expected = ("bad", None)
    _check_reply(received, expected)


ERROR_MEMBERS = st.one_of(
    st.fixed_dictionaries({"class": st.text(max_size=12), "desc": st.text(max_size=30)}),
    st.dictionaries(
        st.sampled_from(["class", "desc", "data"]) | st.text(max_size=5), JSON_VALUES, max_size=3
    ),
)
REPLIES = st.one_of(
    JSON_VALUES,
    st.builds(
        _merged,
        st.fixed_dictionaries(
            {}, optional={"return": JSON_VALUES, "error": ERROR_MEMBERS | JSON_VALUES, "id": JSON_SCALARS}
        ),
        st.dictionaries(
            st.sampled_from(["event", "QMP", "timestamp", "data"]) | st.text(max_size=6),
            JSON_VALUES,
            max_size=2,
        ),
    ),
)


@settings(max_examples=1000, **PROFILE)
@given(reply=REPLIES, ensure_ascii=st.booleans(), indent=st.none() | st.integers(0, 2))
@example(reply={"return": {}, "error": {"class": "GenericError", "desc": ""}}, ensure_ascii=True, indent=None)
@example(reply={"error": {"class": 1, "desc": "x"}}, ensure_ascii=True, indent=None)
@example(reply={"error": "DeviceNotFound"}, ensure_ascii=True, indent=None)
@example(reply={"id": "libvirt-1"}, ensure_ascii=True, indent=None)
@example(reply={"return": None}, ensure_ascii=True, indent=None)
@counted
def test_parse_reply_of_any_json(reply, ensure_ascii, indent):
    """Arbitrary JSON, and replies whose ``return`` or ``error`` has any type, mean what QMP says."""
    _check_reply(json.dumps(reply, ensure_ascii=ensure_ascii, indent=indent), _expected_reply(reply))


@settings(max_examples=200, **PROFILE)
@given(
    depth=st.integers(1, 100_000),
    nesting=st.sampled_from(
        [("[", "]"), ('{"a":', "}"), ('{"return":', "}"), ('{"error":', "}"), ('[{"x":', "}]")]
    ),
    closed=st.booleans(),
)
@example(depth=100_000, nesting=("[", "]"), closed=True)
@example(depth=10_000, nesting=('{"return":', "}"), closed=True)
@counted
def test_parse_reply_of_deep_nesting(depth, nesting, closed):
    """A reply nested past Python's recursion limit is a bad reply, not a RecursionError."""
    opener, closer = nesting
    _check_reply(opener * depth + "1" + (closer * depth if closed else ""), None)


# -- qmp.check_allowed / build_command, and through the client ------------------------------

ALLOWED = ("qom-list", "qom-get", "qom-set", "query-balloon")
EXECUTES = st.one_of(
    st.sampled_from(ALLOWED),
    st.sampled_from(
        [
            "QOM-GET", "qom_get", "Qom-Get", "qom-get ", " qom-get", "qom-get\x00", "qom-get\n",
            "q\u043em-get",  # Cyrillic o
            "qom\u2010get",  # Unicode hyphen
            "\uff51\uff4f\uff4d-get",  # full-width
            "qom-s\u0435t", "query_balloon", "QUERY-BALLOON", "qom-list\t", "quit", "device_del",
            "human-monitor-command", "qmp_capabilities", "balloon", "migrate", "",
        ]
    ),
    st.text(max_size=16),
    st.sampled_from([None, 1, b"qom-get", ("qom-get",), ["qom-get"]]),
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "/machine", "/machine/", "/machine/peripheral/balloon0",
            "/machine/peripheral/balloon0/virtio-backend", "/machinex", "/Machine", "machine",
            "/objects/sec0", "/", "", "/machine/../objects", "//machine", " /machine", "/machine\x00",
            "/machine/\n", "/machine/\x1f", "/machine/\x7f", "/machine/\u2028", "/machine/ball\u043eon0",
        ]
    ),
    st.text().map(lambda t: "/machine/" + t),
    st.text(),
    st.integers(480, 540).map(lambda n: "/machine/" + "a" * n),
    st.sampled_from([None, 1, True, ["/machine"], b"/machine", {"path": "/machine"}]),
)
PROPERTIES = st.one_of(
    st.sampled_from(
        [
            "guest-stats", POLLING_PROPERTY, "guest-stats ", "Guest-Stats", "guest_stats",
            "stats-polling-interval", POLLING_PROPERTY.upper(), "guest-st\u0430ts", "type", "deflate-on-oom",
            "free-page-reporting",
            "secret", "actual", "",
        ]
    ),
    st.text(max_size=30),
    st.sampled_from([None, 1, True, ["guest-stats"], BIG]),
)
SET_VALUES = st.one_of(
    st.integers(),
    st.sampled_from(EDGE_INTS + (BIG, -BIG)),
    st.booleans(),
    st.floats(),
    st.text(max_size=12),
    JSON_VALUES,
)
ARGUMENTS = st.one_of(
    st.none(),
    st.builds(
        _merged,
        st.fixed_dictionaries({}, optional={"path": PATHS, "property": PROPERTIES, "value": SET_VALUES}),
        st.dictionaries(
            st.sampled_from(["id", "arguments", "execute", "Path", "path ", "control"])
            | st.text(max_size=6)
            | st.integers(0, 3),
            JSON_VALUES,
            max_size=2,
        ),
    ),
    st.fixed_dictionaries({"path": PATHS, "property": PROPERTIES, "value": SET_VALUES}),
    st.fixed_dictionaries({"path": PATHS, "property": PROPERTIES}),
)

#: The exact members each command may carry, as the allowlist describes them.
SHAPES = {
    "qom-list": {"path"},
    "qom-get": {"path", "property"},
    "qom-set": {"path", "property", "value"},
    "query-balloon": set(),
}

BALLOON = "/machine/peripheral/balloon0"

#: A client over the recorded fake transport: a refused command must never reach it.
_QMP_WORLD = world("virtio")


def _assert_allowed_shape(text: str) -> None:
    message = json.loads(text)
    assert isinstance(message, dict) and set(message) <= {"execute", "arguments"}
    execute = message["execute"]
    arguments = message.get("arguments", {})
    assert execute in ALLOWED and isinstance(arguments, dict)
    assert "id" not in message and "id" not in arguments
    assert set(arguments) == SHAPES[execute]
    if "path" in arguments:
        path = arguments["path"]
        assert isinstance(path, str) and (path == "/machine" or path.startswith("/machine/"))
        assert len(path) <= 512 and not any(ord(c) < 0x20 for c in path)
    if execute == "qom-get":
        assert arguments["property"] in ("guest-stats", POLLING_PROPERTY)
    if execute == "qom-set":
        value = arguments["value"]
        assert arguments["property"] == POLLING_PROPERTY
        assert type(value) is int and 0 <= value <= 2**32 - 1


@settings(max_examples=1000, **PROFILE)
@given(execute=EXECUTES, arguments=ARGUMENTS)
@example(execute="qom-set", arguments={"path": BALLOON, "property": POLLING_PROPERTY, "value": 2**32})
@example(execute="qom-set", arguments={"path": BALLOON, "property": POLLING_PROPERTY, "value": True})
@example(execute="qom-set", arguments={"path": BALLOON, "property": POLLING_PROPERTY, "value": 2.0})
@example(execute="qom-set", arguments={"path": BALLOON, "property": POLLING_PROPERTY, "value": BIG})
@example(execute="qom-get", arguments={"path": BALLOON, "property": "guest-stats", "id": "x"})
@example(execute="QOM-GET", arguments={"path": BALLOON, "property": "guest-stats"})
@example(execute="qom-get", arguments={"path": BALLOON, "property": ["guest-stats"]})
@counted
def test_build_command_sends_only_the_allowlist(execute, arguments):
    """A command is refused before the transport, or is one of the four balloon commands, exactly shaped."""
    ok, result = _outcome(build_command, execute, arguments, errors=(CommandNotAllowed,))
    if ok:
        _assert_allowed_shape(result)
        return
    assert "nothing was sent" in str(result)
    transport = _QMP_WORLD.transport
    before = len(transport.sent)
    with pytest.raises(CommandNotAllowed):
        _QMP_WORLD.client.qmp.execute(_QMP_WORLD.guest(), execute, arguments)
    assert len(transport.sent) == before, "a refused command reached the transport"


# -- stats ---------------------------------------------------------------------------------

STAT_NAMES = st.one_of(
    st.sampled_from([s.qemu for s in STATS] + ["stat-from-the-future", "last-update", "actual", ""]),
    st.text(max_size=12),
)
STAT_VALUES = REPLY_INTS | st.booleans() | st.floats() | st.text(max_size=5) | st.none() | JSON_VALUES
GUEST_STATS_VALUES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries(
        {"stats": st.dictionaries(STAT_NAMES, REPLY_INTS, max_size=14), "last-update": st.integers(0, 2**64)}
    ),
    st.builds(
        _merged,
        st.fixed_dictionaries(
            {},
            optional={
                "stats": st.dictionaries(STAT_NAMES, STAT_VALUES, max_size=14) | JSON_VALUES,
                "last-update": REPLY_INTS | st.booleans() | st.floats() | st.text(max_size=5) | st.none(),
            },
        ),
        st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2),
    ),
)


@settings(max_examples=1000, **PROFILE)
@given(value=GUEST_STATS_VALUES)
@example(value={"stats": {"stat-free-memory": 2**64 - 1, "stat-swap-in": -1, "stat-x": 7}, "last-update": 0})
@example(value={"stats": {"stat-free-memory": True}, "last-update": 5})
@example(value={"stats": {"stat-free-memory": 1.0}, "last-update": 5})
@example(value={"stats": {}, "last-update": -1})
@example(value={"stats": {}})
@example(value={"stats": [], "last-update": 1})
@counted
def test_parse_guest_stats_of_any_value(value):
    """guest-stats is read exactly (unsupported -1 / 2^64-1 as None, unknown names kept) or refused.

    QEMU's figures are uint64 (-1 from older QEMU) and last-update is epoch
    seconds: anything outside those ranges is not QEMU's, and is refused.
    """
    ok, result = _outcome(parse_guest_stats, value, errors=(QMPBadReply,))
    valid = (
        isinstance(value, dict)
        and isinstance(value.get("stats"), dict)
        and _whole(value.get("last-update"))
        and 0 <= value["last-update"] <= 2**63 - 1
        and all(_whole(v) and -1 <= v <= 2**64 - 1 for v in value["stats"].values())
    )
    assert ok is valid
    if ok:
        assert result == GuestStats(
            values={k: None if v in (-1, 2**64 - 1) else v for k, v in value["stats"].items()},
            last_update=value["last-update"] or None,
        )


EVERY_SPEC = STATS + (ACTUAL, LAST_UPDATE, RSS)
DOMSTATS_KEYS = st.sampled_from(
    sorted({s.domstats for s in EVERY_SPEC if s.domstats} | {"balloon.maximum", "state.state"})
) | st.text(max_size=10)
LIBVIRT_KEYS = st.one_of(
    st.sampled_from(sorted({s.libvirt for s in EVERY_SPEC if s.libvirt} | {"minor_fault_rate"})),
    st.text(max_size=10),
)
KIB = st.integers(0, 2**64) | st.sampled_from(EDGE_INTS)
#: What libvirt gives: unsigned long longs.
U64 = st.integers(0, 2**64 - 1)
ANY_FIGURE = KIB | st.floats() | st.text(max_size=6) | st.none() | st.booleans() | JSON_VALUES | ODD_OBJECTS


@settings(max_examples=500, **PROFILE)
@given(
    record=st.dictionaries(DOMSTATS_KEYS, U64, max_size=16),
    memory_stats=st.dictionaries(LIBVIRT_KEYS, U64),
)
@counted
def test_libvirt_figures_as_libvirt_gives_them(record, memory_stats):
    """Integer figures map one to one: domstats names to memoryStats keys, KiB to bytes, None when absent."""
    out = memory_stats_from_domstats(record)
    with_guest = LAST_UPDATE.domstats in record
    for spec in EVERY_SPEC:
        present = spec.domstats in record and (with_guest or spec not in (ACTUAL, LAST_UPDATE))
        assert (spec.libvirt in out) is present
        if present:
            assert out[spec.libvirt] == record[spec.domstats]
    assert set(out) <= {s.libvirt for s in EVERY_SPEC}

    guest, actual = stats_from_libvirt(memory_stats)
    for spec in STATS:
        if spec.libvirt is None:
            assert spec.qemu not in guest.values  # libvirt cannot say anything about it
            continue
        raw = memory_stats.get(spec.libvirt)
        in_qemu_unit = None if raw is None else raw * 1024 if spec.unit == "bytes" else raw
        assert guest.values[spec.qemu] == in_qemu_unit
    assert actual == (None if "actual" not in memory_stats else memory_stats["actual"] * 1024)
    assert guest.last_update == (memory_stats.get("last_update") or None)


@settings(max_examples=300, **PROFILE)
@given(record=st.dictionaries(DOMSTATS_KEYS, ANY_FIGURE, max_size=16))
@example(record={"balloon.unused": "abc"})
@example(record={"balloon.unused": None})
@example(record={"balloon.unused": 1.5})
@example(record={"balloon.unused": float("inf")})
@counted
def test_domstats_record_of_any_types(record):
    """A non-integer domstats field is refused with our error, not a ValueError or TypeError from int()."""
    ok, out = _outcome(memory_stats_from_domstats, record, errors=(BalloonStatsError,))
    if ok:
        assert all(_whole(v) for v in out.values())


@settings(max_examples=300, **PROFILE)
@given(memory_stats=st.dictionaries(LIBVIRT_KEYS, ANY_FIGURE, max_size=16))
@example(memory_stats={"unused": "abc"})
@example(memory_stats={"unused": {}})
@example(memory_stats={"last_update": "x"})
@counted
def test_memory_stats_of_any_types(memory_stats):
    """A non-integer memoryStats figure is refused with our error, never multiplied into garbage."""
    ok, result = _outcome(stats_from_libvirt, memory_stats, errors=(BalloonStatsError,))
    if ok:
        guest, actual = result
        assert all(v is None or _whole(v) for v in guest.values.values())
        assert actual is None or _whole(actual)
        assert guest.last_update is None or _whole(guest.last_update)


LIBVIRT_STATES = ("running", "paused", "shutoff", "blocked", "crashed", "pmsuspended", "nostate", "shutdown")


@settings(max_examples=1000, **PROFILE)
@given(
    state=st.sampled_from(LIBVIRT_STATES) | st.text(max_size=12),
    has_balloon=st.booleans(),
    interval=st.none() | REPLY_INTS,
    last_update=st.none() | REPLY_INTS,
    now=st.floats() | st.integers(0, 2**40),
    grace=st.floats() | st.integers(-10, 10**6),
)
@example(state="running", has_balloon=True, interval=5, last_update=2**1100, now=1.8e9, grace=5.0)
@example(state="running", has_balloon=True, interval=-5, last_update=0, now=float("nan"), grace=float("inf"))
@counted
def test_classify_always_answers(state, has_balloon, interval, last_update, now, grace):
    """Every combination gets a status, in the documented order of precedence, and a message.

    Times past a float's range (no clock gives them; parse_guest_stats refuses
    them) are refused with InvalidArgument, never an OverflowError.
    """
    ok, result = _outcome(
        lambda: classify(
            state=state, has_balloon=has_balloon, interval=interval, last_update=last_update, now=now,
            grace=grace,
        ),
        errors=(InvalidArgument,),
    )
    if not ok:
        assert max(abs(interval or 0), abs(last_update or 0)) > 2**1000, (interval, last_update)
        return
    status, message = result
    assert isinstance(status, Status) and isinstance(message, str) and message.strip()
    if not has_balloon:
        assert status is Status.NO_BALLOON
    elif state == "paused":
        assert status is Status.PAUSED
    elif not interval:
        assert status is Status.POLLING_DISABLED
    elif last_update is None:
        assert status is Status.NEVER_UPDATED
    else:
        assert status in (Status.OK, Status.STALE)


# -- domxml.parse_balloon ------------------------------------------------------------------

XML_FRAGMENTS = st.sampled_from(
    [
        "<domain>", "</domain>", "<devices>", "</devices>", "<memballoon model='virtio'>", "<memballoon>",
        "</memballoon>", "<stats period='5'/>", "<alias name='balloon0'/>", "<address type='pci'/>",
        "<domain/>", "<?xml version='1.0'?>", "<?xml version='1.0' encoding='UTF-16'?>",
        "<?xml version='1.0' encoding='ISO-8859-1'?>", "<!DOCTYPE domain>", "<!-- x -->", "<![CDATA[",
        "]]>", "&amp;", "&lol;", "&#0;", "&#x110000;", "<", ">", "'", '"', "=", " ", "\x00", "\ufeff",
        "\ud800", "xmlns='urn:x'", "<x:domain xmlns:x='urn:x'>",
    ]
)
NEAR_XML = st.lists(XML_FRAGMENTS, max_size=30).map("".join)


@settings(max_examples=500, **PROFILE)
@given(xml=ANY_TEXT | NEAR_XML)
@example(xml="<domain><name>\ud800</name></domain>")
@example(xml="")
@example(xml="<domain>" * 300 + "</domain>" * 300)
@counted
def test_parse_balloon_of_any_text(xml):
    """Any text is a balloon description or InvalidDomainXML."""
    ok, result = _outcome(parse_balloon, xml, errors=(InvalidDomainXML,))
    if ok:
        assert isinstance(result, BalloonDevice)


#: Characters XML 1.0 allows; tab, CR and LF go through quoteattr's character references.
XML_TEXT = st.text(
    st.characters(
        min_codepoint=0x09, exclude_categories=("Cs",), exclude_characters="\x0b\x0c\ufffe\uffff"
    ).filter(lambda c: c in "\t\n\r" or ord(c) >= 0x20),
    max_size=20,
)
HUGE_XML_TEXT = st.builds(
    operator.mul, st.text("ab<&'\"\u00e9\u4e2d", min_size=1, max_size=4), st.integers(1_000, 100_000)
)
PERIODS = st.one_of(
    st.sampled_from(
        [
            "0", "2", "5", "-1", "+5", " 5", "5 ", "5.0", "1e3", "0x10", "\u0665", "\uff15", "abc",
            "2147483648", "18446744073709551615", "0" * 40 + "7", "9" * 5000,
        ]
    ),
    st.integers(0, 2**70).map(str),
    XML_TEXT,
)

#: "Any int that long, or InvalidDomainXML": the oracle cannot convert 4300 digits and more itself.
HUGE_PERIOD: Any = object()


def _domain_document(
    *,
    model: Optional[str] = "virtio",
    alias: Optional[str] = None,
    address_type: Optional[str] = None,
    period: Optional[str] = None,
    autodeflate: Optional[str] = None,
    free_page_reporting: Optional[str] = None,
    has_balloon: bool = True,
    depth: int = 0,
    root: str = "domain",
    declaration: str = "",
) -> Tuple[str, Any]:
    """A domain XML document around a <memballoon>, and what parse_balloon must make of it.

    ``None`` leaves an attribute (or the element) out; ``""`` for alias, address
    type or period writes the element without its attribute.
    """

    def attrs(**pairs: Optional[str]) -> str:
        return "".join(f" {k}={quoteattr(v)}" for k, v in pairs.items() if v is not None)

    balloon = ""
    if has_balloon:
        inner = "<!-- a comment -->"
        if period is not None:
            inner += f"<stats{attrs(period=period or None)}/>"
        if alias is not None:
            inner += f"<alias{attrs(name=alias or None)}/>"
        if address_type is not None:
            inner += f"<address{attrs(type=address_type or None)}/>"
        switches = attrs(model=model, autodeflate=autodeflate, freePageReporting=free_page_reporting)
        balloon = f"<memballoon{switches}>{inner}</memballoon><memballoon model='second'/>"
    decoy = "<hub><memballoon model='decoy'><stats period='x'/></memballoon></hub>"
    deep = "<n>" * depth + "</n>" * depth
    ns = " xmlns:x='urn:x'" if root.startswith("x:") else ""
    devices = f"<devices>{decoy}{deep}{balloon}</devices>"
    xml = f"{declaration}<{root}{ns} type='kvm'><name>vm</name>{devices}</{root}>"

    expected: Any
    if root != "domain" or depth + 2 > 256:  # libxml2 stops at 256 levels without XML_PARSE_HUGE
        expected = InvalidDomainXML
    elif not has_balloon:
        expected = BalloonDevice(model="absent")
    elif period and not re.fullmatch(r"[0-9]+", period):
        expected = InvalidDomainXML
    else:
        expected = BalloonDevice(
            model="absent" if model is None else model,
            alias=alias or None,
            address_type=address_type or None,
            stats_period=(HUGE_PERIOD if len(period.lstrip("0")) > 4000 else int(period)) if period else None,
            autodeflate=None if autodeflate is None else autodeflate == "on",
            free_page_reporting=None if free_page_reporting is None else free_page_reporting == "on",
        )
    return xml, expected


ON_OFF = st.none() | st.sampled_from(["on", "off", "ON", "yes", ""]) | XML_TEXT
ATTR_TEXT = XML_TEXT | HUGE_XML_TEXT
DOMAIN_DOCUMENTS = st.builds(
    _domain_document,
    model=st.none() | st.sampled_from(MODELS + ("virtio-balloon", "VIRTIO", "")) | ATTR_TEXT,
    alias=st.none() | st.just("") | ATTR_TEXT,
    address_type=st.none() | st.just("") | st.sampled_from(["pci", "ccw", "virtio-mmio"]) | ATTR_TEXT,
    period=st.none() | st.just("") | PERIODS,
    autodeflate=ON_OFF,
    free_page_reporting=ON_OFF,
    has_balloon=st.booleans(),
    depth=st.integers(0, 300),
    root=st.sampled_from(["domain", "domain", "domain", "Domain", "domainx", "x:domain"]),
    declaration=st.sampled_from(["", "<?xml version='1.0'?>", "<?xml version='1.0' encoding='UTF-8'?>\n"]),
)


@settings(max_examples=1000, **PROFILE)
@given(document=DOMAIN_DOCUMENTS)
@example(document=_domain_document(period="9" * 5000))
@example(document=_domain_document(period="\u0665"))
@example(document=_domain_document(period="-1", alias="balloon0"))
@example(document=_domain_document(alias="x" * 1_000_000, address_type="pci", period="0"))
@example(document=_domain_document(depth=254))
@counted
def test_parse_balloon_of_generated_domains(document):
    """model, alias, address type, stats period and the two switches are read exactly; bad periods refused."""
    xml, expected = document
    ok, result = _outcome(parse_balloon, xml, errors=(InvalidDomainXML,))
    if expected is InvalidDomainXML:
        assert not ok
    elif expected.stats_period is HUGE_PERIOD:
        if ok:  # or refused: no libvirt writes a period of thousands of digits
            assert _whole(result.stats_period) and result.stats_period.bit_length() > 13_000
            assert result == dataclasses.replace(expected, stats_period=result.stats_period)
    else:
        assert ok and result == expected


SECRET = "vbs-secret-9f1c2e"
ENTITY_TARGETS = (
    "@SECRET_URI@", "@SECRET_PATH@", "file:///etc/passwd", "/etc/passwd", "http://127.0.0.1:9/x.dtd"
)


def _entity_payloads(target: str, levels: int, fanout: int) -> List[str]:
    """DOCTYPE tricks: external entities, parameter entities, an external DTD, entity bombs, XInclude."""
    balloon = (
        "<devices><memballoon model='virtio'><alias name='{a}'/><stats period='{p}'/></memballoon></devices>"
    )
    bomb = "".join(
        ["<!ENTITY a0 'lol'>"] + [f"<!ENTITY a{i} '{f'&a{i - 1};' * fanout}'>" for i in range(1, levels + 1)]
    )
    external = f"<!DOCTYPE domain [<!ENTITY xxe SYSTEM '{target}'>]>"
    return [
        f"{external}<domain><name>&xxe;</name>" + balloon.format(a="&xxe;", p="5") + "</domain>",
        f"{external}<domain>" + balloon.format(a="b0", p="&xxe;") + "</domain>",
        f"<!DOCTYPE domain [<!ENTITY % p SYSTEM '{target}'> %p;]><domain/>",
        f"<!DOCTYPE domain SYSTEM '{target}'><domain>" + balloon.format(a="&ext;", p="5") + "</domain>",
        f"<!DOCTYPE domain [{bomb}]><domain><name>&a{levels};</name>"
        + balloon.format(a=f"&a{levels};", p="5")
        + "</domain>",
        f"<!DOCTYPE domain [<!ENTITY big '{'x' * 10_000}'>]>"
        f"<domain><name>{'&big;' * fanout * 100}</name></domain>",
        "<domain xmlns:xi='http://www.w3.org/2001/XInclude'><devices><memballoon model='virtio'>"
        f"<alias><xi:include href='{target}' parse='text'/></alias></memballoon></devices>"
        f"<xi:include href='{target}' parse='text'/></domain>",
    ]


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    """A local file whose content must never show up in a parse result or an error."""
    path = tmp_path_factory.mktemp("xxe") / "secret.txt"
    path.write_text(f"{SECRET}\n<!ENTITY ext '{SECRET}'>\n")
    return path


@settings(max_examples=200, **PROFILE)
@given(
    target=st.sampled_from(ENTITY_TARGETS),
    levels=st.integers(1, 12),
    fanout=st.integers(1, 12),
    which=st.integers(0, 6),
)
@example(target="file:///etc/passwd", levels=10, fanout=10, which=0)
@example(target="@SECRET_URI@", levels=1, fanout=1, which=6)
@counted
def test_parse_balloon_never_reads_or_expands_entities(secret_file, target, levels, fanout, which):
    """DOCTYPE payloads are refused; no local file, no entity bomb ever reaches the result or the error."""
    target = target.replace("@SECRET_URI@", secret_file.as_uri()).replace("@SECRET_PATH@", str(secret_file))
    xml = _entity_payloads(target, levels, fanout)[which]
    ok, result = _outcome(parse_balloon, xml, errors=(InvalidDomainXML,))
    seen = repr(result) + str(result)
    assert SECRET not in seen and "root:x:0:0" not in seen and "lollol" not in seen
    if "<!DOCTYPE" in xml:
        assert not ok, "a DOCTYPE must be refused"


# -- polling.validate_interval -------------------------------------------------------------

INTERVAL_WORDS = st.sampled_from(
    [
        "5", " 5 ", "\t5\n", "5.0", "1e3", "\u0665", "\uff15", "+5", "-0", "-1", "0x10", "5_000",
        "\u00a05\u00a0", "", " ", "4294967295", "4294967296", "2147483647", "2147483648",
        "0" * 5000 + "5", "9" * 5000,
    ]
)
INTERVAL_VALUES = st.one_of(
    st.integers(),
    st.sampled_from(EDGE_INTS + (BIG, -BIG)),
    st.booleans(),
    st.none(),
    st.floats(),
    INTERVAL_WORDS,
    st.integers().map(str),
    st.integers().map(lambda i: f" {i}\t"),
    st.text(max_size=10),
    ODD_OBJECTS,
)


def _expected_interval(value: Any, via: Any) -> Tuple[Optional[bool], Optional[int]]:
    """The documented rule: an int, or ASCII digits with an optional minus; 0 to the route's bound.

    Returns whether the value must be accepted, and as what. ``None``: either answer is
    right, for a digit string longer than any command line needs (zeros before a 5).
    """
    limit = {"libvirt": MAX_LIBVIRT_PERIOD, "qmp": MAX_QEMU_INTERVAL}.get(via if isinstance(via, str) else "")
    if limit is None:
        return False, None
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"-?[0-9]+", text):
            return False, None
        digits = text.lstrip("-").lstrip("0") or "0"
        if (text.startswith("-") and digits != "0") or len(digits) > len(str(limit)):
            return False, None  # negative, or too long to be in bounds (and to give to int() here)
        value = int(digits)
        if len(text) > 100:
            return (None, value) if value <= limit else (False, None)
    if _whole(value) and 0 <= value <= limit:
        return True, value
    return False, None


@settings(max_examples=1000, **PROFILE)
@given(value=INTERVAL_VALUES, via=st.sampled_from(ROUTES) | st.text(max_size=8) | st.none())
@example(value="9" * 5000, via="libvirt")
@example(value="0" * 5000 + "5", via="qmp")
@example(value=BIG, via="qmp")
@example(value=" 5 ", via="libvirt")
@example(value="\u0665", via="libvirt")
@example(value=2**31, via="libvirt")
@example(value=2**31, via="qmp")
@counted
def test_validate_interval_of_anything(value, via):
    """Whole seconds within the route's bounds come back as an int; anything else is InvalidArgument."""
    ok, result = _outcome(validate_interval, value, via=via, errors=(InvalidArgument,))
    accepted, number = _expected_interval(value, via)
    if accepted is not None:
        assert ok is accepted
    if ok:
        assert _whole(result) and result == number


# -- crosscheck ----------------------------------------------------------------------------

CROSSCHECK_INTS = WIRE_INTS | BEYOND_FLOAT


@st.composite
def crosscheck_inputs(draw: Any) -> Tuple[GuestStats, Optional[int], Dict[str, Any], bool]:
    """guest-stats, actual and memoryStats: consistent under libvirt's mapping, or anything."""
    values = draw(st.dictionaries(STAT_NAMES, st.none() | CROSSCHECK_INTS, max_size=14))
    guest = GuestStats(values=values, last_update=draw(st.none() | st.integers(0, 2**64)))
    actual = draw(st.none() | CROSSCHECK_INTS)
    if draw(st.booleans()):
        memory_stats: Dict[str, Any] = {
            spec.libvirt: spec.to_libvirt(values[spec.qemu])
            for spec in STATS
            if values.get(spec.qemu) is not None and spec.libvirt
        }
        if guest.last_update:
            memory_stats["last_update"] = guest.last_update
        if actual is not None:
            memory_stats["actual"] = ACTUAL.to_libvirt(actual)
        memory_stats.update(draw(st.dictionaries(st.sampled_from(["rss", "minor_fault_rate"]), KIB)))
        return guest, actual, memory_stats, True
    memory_stats = draw(st.dictionaries(LIBVIRT_KEYS, CROSSCHECK_INTS | JSON_SCALARS, max_size=16))
    return guest, actual, memory_stats, False


@settings(max_examples=1000, **PROFILE)
@given(inputs=crosscheck_inputs())
@counted
def test_crosscheck_never_raises(inputs):
    """Any inputs give a verdict; consistent ones agree; the JSON form always serialises."""
    guest, actual, memory_stats, consistent = inputs
    check = crosscheck(guest, actual, memory_stats)
    assert isinstance(check, CrossCheck) and check.result in tuple(Result)
    json.dumps(check.to_dict())
    if consistent:
        assert check.result is Result.AGREE, check
    if check.result is Result.INCONCLUSIVE:
        assert check.reason.strip() and not check.checks
    assert (check.result is Result.MISMATCH) == bool(check.mismatches)
    assert all(c.verdict in tuple(Verdict) for c in check.checks)


# -- exporter: parse_listen, check_password, load_users --------------------------------------

LISTEN_HOSTS = st.sampled_from(
    [
        "", "127.0.0.1", "0.0.0.0", "localhost", "::1", "[::1]", "[::]", "[fe80::1%eth0]", "[]", "[[::1]]",
        "[1.2.3.4]", "[::1", "::1]", "\u0661", "host name", "h\nost",
    ]
) | st.text(max_size=12)
LISTEN_PORTS = st.sampled_from(
    ["0", "80", "9474", "65535", "65536", "99999", "000080", "123456", "-1", " 80", "80 ", "", "\u0668\u0660"]
) | st.integers(0, 10**6).map(str) | st.text(max_size=6)


@settings(max_examples=1000, **PROFILE)
@given(text=st.builds(lambda h, p: f"{h}:{p}", LISTEN_HOSTS, LISTEN_PORTS) | st.text() | LISTEN_HOSTS)
@counted
def test_parse_listen_of_any_text(text):
    """(host, port): port 0-65535, a valid IPv6 host when it has a colon, and it reads back the same."""
    ok, result = _outcome(parse_listen, text, errors=(InvalidArgument,))
    if not ok:
        return
    host, port = result
    assert isinstance(host, str) and _whole(port) and 0 <= port <= 65535
    if ":" in host:
        ipaddress.IPv6Address(host)
    assert parse_listen(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") == (host, port)


#: scrypt parameters cheap enough to run hundreds of times...
CHEAP_N = st.sampled_from([2, 4, 16, 256, 1024])
#: ...and ones that must fail fast. No number int() would take: a valid one could make
#: scrypt run for minutes (a cost only the file's owner can set, so not a finding).
BAD_PARAMETER = st.one_of(
    st.sampled_from(["0", "1", "3", "-1", "-16", "", " ", "x", "1.5", "0x10", str(2**64), "9" * 5000]),
    st.integers(max_value=0).map(str),
    st.integers(min_value=2**32).map(str),
    st.text(max_size=5).filter(lambda t: not re.fullmatch(r"\s*[+-]?[\d_]+\s*", t)),
)


@st.composite
def encoded_passwords(draw: Any) -> Tuple[str, str, Optional[bool]]:
    """A password and an encoded hash (right, wrong, or broken anywhere), and whether it must match."""
    password = draw(st.text(max_size=20))
    if draw(st.integers(0, 4)) == 0:
        encoded = draw(st.text() | st.builds("$".join, st.lists(BAD_PARAMETER, min_size=6, max_size=6)))
        return password, encoded, None
    n, r, p = draw(CHEAP_N), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    salt = draw(st.binary(max_size=16))
    right = draw(st.booleans())
    secret = (password if right else password + "!").encode()
    # 16 bytes at least: a wrong password must not match by chance.
    digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=draw(st.integers(16, 64)))
    b64 = base64.b64encode
    fields = ["scrypt", str(n), str(r), str(p), b64(salt).decode(), b64(digest).decode()]
    broken = draw(st.sets(st.integers(0, 5), max_size=2))
    for index in broken:
        fields[index] = draw(BAD_PARAMETER if 1 <= index <= 3 else st.text(max_size=12))
    return password, "$".join(fields), None if broken else right


@settings(max_examples=400, **PROFILE)
@given(case=encoded_passwords())
@example(case=("pw", "scrypt$-1$1$1$$iw==", None))
@example(case=("pw", f"scrypt${2**64}$8$1$c2FsdA==$aGFzaA==", None))
@example(case=("pw", "scrypt$16$-1$1$c2FsdA==$aGFzaA==", None))
@example(case=("pw", "scrypt$16$1$1$c2FsdA==$", None))
@example(case=("pw", "scrypt$1048576$8$1$c2FsdA==$aGFzaA==", None))
@example(case=("\ud800", "scrypt$16$1$1$c2FsdA==$aGFzaA==", None))
@counted
def test_check_password_never_raises(case):
    """Any encoded line gives True or False; the right password of a good line gives True."""
    password, encoded, expected = case
    result = check_password(password, encoded)
    assert result is True or result is False
    if expected is not None:
        assert result is expected


USER_LINES = st.one_of(
    st.sampled_from(
        [
            "", "   ", "# comment", "  # indented comment", "alice:scrypt$16384$8$1$c2FsdA==$aGFzaA==",
            "bob:scrypt$1$2$3$4$5", "carol:scrypt$$$$$", ":scrypt$1$2$3$4$5", "dave", "dave:", "eve:md5$x",
            "frank:scrypt$1$2$3$4$5$6", "gr:ace:scrypt$1$2$3$4$5", " hal : scrypt$1$2$3$4$5",
        ]
    ),
    st.builds(
        lambda user, rest: f"{user}:scrypt${rest}",
        st.text(max_size=8),
        st.lists(st.text("ab$", max_size=3), max_size=6).map("$".join),
    ),
    st.text(max_size=30),
)
LINE_BREAKS = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1c", "\x85", "\u2028"])


@st.composite
def users_files(draw: Any) -> Tuple[bytes, int]:
    """A basic-auth file's bytes (mostly text, sometimes not UTF-8) and its mode."""
    if draw(st.integers(0, 5)) == 0:
        data = draw(st.binary(max_size=200))
    else:
        lines = draw(st.lists(USER_LINES, max_size=8))
        data = "".join(line + draw(LINE_BREAKS) for line in lines).encode("utf-8", "surrogateescape")
    return data, draw(st.sampled_from([0o600, 0o600, 0o640, 0o400, 0o644, 0o604, 0o000]))


@settings(max_examples=300, **SHARED_FIXTURE)
@given(file=users_files())
@example(file=(b"alice:scrypt$1$2$3$4$5\n\xff\n", 0o600))
@example(file=(b"alice:scrypt$1$2$3$4$5\n", 0o644))
@example(file=(b"# nobody\n", 0o600))
@counted
def test_load_users_of_any_file(tmp_path, file):
    """A file gives users with scrypt lines, or InvalidArgument: never a decoding error."""
    data, mode = file
    path = tmp_path / "users"
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(data)
    path.chmod(mode)
    ok, users = _outcome(load_users, str(path), errors=(InvalidArgument,))
    if mode & 0o004:
        assert not ok, "a world-readable file must be refused"
    if not ok:
        return
    lines = {line.strip() for line in data.decode("utf-8").splitlines()}
    assert users
    for user, encoded in users.items():
        assert user and ":" not in user and not user.startswith("#")
        assert encoded.startswith("scrypt$") and encoded.count("$") == 5
        assert f"{user}:{encoded}" in lines


# -- metrics.render ------------------------------------------------------------------------

LABEL_TEXT = st.text(max_size=16) | st.sampled_from(['vm "q"', "back\\slash", "new\nline", "\\n", "\r", "{}"])
#: What can reach the metrics: parse_guest_stats and libvirt's figures are 64-bit (beyond is refused there).
METRIC_INTS = st.integers(-1, 2**64 - 1) | st.sampled_from([e for e in EDGE_INTS if -1 <= e < 2**64])


def _cycle(domains: List[Tuple[str, str, Dict[str, Optional[int]], Optional[int]]], **extra: Any) -> Cycle:
    """A finished cycle of samples (URI, domain name, figures, actual) as the collector hands it over."""
    samples = tuple(
        Sample(
            uri=uri,
            domain=domain,
            uuid=str(uuid.UUID(int=i)),
            id=extra.get("id"),
            state=extra.get("state", "running"),
            source=extra.get("source", "qmp"),
            sampled_at=extra.get("sampled_at", 1.8e9),
            status=extra.get("status", Status.OK),
            message="generated",
            polling=extra.get("polling", PollingState(5, 5)),
            crosscheck=skipped("generated"),
            stats=GuestStats(values=values, last_update=extra.get("last_update")),
            actual_bytes=actual,
        )
        for i, (uri, domain, values, actual) in enumerate(domains)
    )
    hosts = {s.uri: HostState(s.uri, extra.get("up", True)) for s in samples}
    return Cycle(1, extra.get("started_at", 1.8e9), 0.5, samples, hosts, (), {}, {})


def _as_float(value: int) -> float:
    """What an exposition can say of an int: the nearest float, or an infinity past them all."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


CYCLES = st.builds(
    _cycle,
    st.lists(
        st.tuples(
            LABEL_TEXT, LABEL_TEXT, st.dictionaries(STAT_NAMES, st.none() | METRIC_INTS, max_size=12),
            st.none() | METRIC_INTS,
        ),
        min_size=1,
        max_size=4,
    ),
    id=st.none() | st.integers(1, 2**31),
    state=st.sampled_from(LIBVIRT_STATES),
    source=st.sampled_from(SOURCES),
    sampled_at=st.floats(0, 2**40),
    status=st.sampled_from(list(Status)),
    polling=st.builds(PollingState, st.none() | st.integers(0, 2**32 - 1), st.none() | st.integers(0, 2**31)),
    last_update=st.none() | st.integers(1, 2**63 - 1),
    up=st.booleans(),
    started_at=st.floats(0, 2**40),
)


@settings(max_examples=300, **PROFILE)
@given(cycle=CYCLES)
@example(cycle=_cycle([("qemu:///system", 'vm "a"\\\n\u00e9', {"stat-free-memory": 2**64 - 2}, 2**30)]))
@example(cycle=_cycle([("qemu:///system", "vm", {"stat-new": 2**64 - 1}, None)]))
@counted
def test_render_always_parses_and_labels_round_trip(cycle):
    """Whatever the names and figures, Prometheus' own parser reads the exposition back unchanged."""
    families = text_string_to_metric_families(render(cycle))
    series = [(f.name, s.labels, s.value) for f in families for s in f.samples]
    ids = {(s.uri, s.domain, s.uuid) for s in cycle.samples}
    assert {(lb["uri"], lb["domain"], lb["uuid"]) for _, lb, _ in series if "domain" in lb} == ids
    unknown = {
        (s.uri, s.domain, s.uuid, name): value
        for s in cycle.samples
        for name, value in s.stats.values.items()
        if value is not None and name not in STATS_BY_QEMU_NAME
    }
    exported = {
        (lb["uri"], lb["domain"], lb["uuid"], lb["stat"]): value
        for name, lb, value in series
        if name == "virt_balloon_guest_stat"
    }
    assert set(exported) <= set(unknown)
    for key, value in unknown.items():
        if key in exported:
            assert exported[key] == _as_float(value)
        else:
            assert abs(value) > sys.float_info.max, f"{key} left out"  # only one no float can hold


# -- the CLI -------------------------------------------------------------------------------

COMMANDS = (
    "stats", "period", "enable", "disable", "path", "check", "watch", "rearm", "stream", "exporter", "record",
    "advise", "balloon",
)

#: Where the generated command lines' files live; replaced by the test's tmp_path.
TMP = "@TMP@"
#: libvirt's test driver on a file that is missing or not a test-driver file: it
#: fails at once, in process. Any other URI fails the test.
FAILING_URIS = (
    "test:///nonexistent/vbs-property-tests.xml", f"test://{TMP}/garbage.xml", f"test://{TMP}/gone.xml"
)
TEXTFILES = (f"{TMP}/out.prom", f"{TMP}/missing/out.prom", f"{TMP}/dir")
PEMS = (f"{TMP}/cert.pem", f"{TMP}/missing.pem", f"{TMP}/dir")
USERS_FILES = {
    "users-ok": (b"alice:scrypt$16384$8$1$c2FsdA==$aGFzaA==\n", 0o600),
    "users-open": (b"alice:scrypt$1$2$3$4$5\n", 0o644),
    "users-bad": (b"alice\n", 0o600),
    "users-latin1": ("\u00e9ve:scrypt$1$2$3$4$5\n".encode("latin-1"), 0o600),
    "users\nnewline": (b"bob\n", 0o600),
}
USERS = tuple(f"{TMP}/{name}" for name in USERS_FILES) + (f"{TMP}/missing-users", f"{TMP}/dir")
#: History files: a new one, one that is not a history, a folder, one whose folder is missing.
HISTORIES = (f"{TMP}/history.sqlite", f"{TMP}/garbage.xml", f"{TMP}/dir", f"{TMP}/missing/history.sqlite")

SECONDS = st.sampled_from(
    ["0", "1", "5", "0.5", "-1", "1e3", "nan", "inf", "-inf", "", " 5 ", "\u0665", "abc", "1_0", "9" * 5000]
) | st.integers(-10, 10**6).map(str)
DURATIONS = SECONDS | st.sampled_from(["8d", "36h", "90m", "300s", "1d2h", "d", "-1h", "0s", "1e9d", "nanh"])
INTERVAL_ARGS = INTERVAL_WORDS | st.integers(-(2**40), 2**40).map(str) | st.sampled_from(["1.5", "-1", "+5"])
#: A real argv holds no NUL; anything else, non-UTF-8 bytes included, can be typed.
WORDS = st.text(st.characters(exclude_characters="\x00"), max_size=12) | st.binary(max_size=8).map(
    lambda data: _surrogateescaped(data.replace(b"\x00", b""))
)
DOMAIN_WORDS = st.sampled_from(["web1", "0", "1", "00000000-0000-0000-0000-000000000000"]) | WORDS.filter(
    lambda t: not t.startswith("-")
)
GLOBAL_OPTIONS = ("-c", "--connect", "--format", "-r", "--readonly", "--debug")


def _cli_options() -> Dict[str, Dict[str, Any]]:
    """Each command's options (cli.build_parser's), with what to give them (None: a flag)."""
    source = st.sampled_from(SOURCES + ("QMP", "", "x"))
    via = st.sampled_from(ROUTES + ("QMP", "other"))
    common: Dict[str, Any] = {
        "-c": st.sampled_from(FAILING_URIS),
        "--connect": st.sampled_from(FAILING_URIS),
        "--format": st.sampled_from(["table", "json", "prometheus", "yaml", ""]),
        "-r": None,
        "--readonly": None,
        "--debug": None,
    }
    timing = {"--grace": SECONDS, "--timeout": SECONDS}
    sizes = st.sampled_from(["128M", "1G", "0", "1.5GiB", "12Q", "-5M", "", "4096k", "1e3"]) | WORDS
    percents = st.sampled_from(["5", "5%", "0", "100", "101", "-1", "nan", "12.5 %", ""]) | WORDS
    stepping = {
        "--yes": None, "--step": percents, "--step-max": sizes, "--min-confidence": SECONDS,
        "--cooldown": DURATIONS, "--settle": DURATIONS, "--pressure-available": percents, "--max": sizes,
        "--target-host-available": sizes, "--max-total": sizes, "--textfile": st.sampled_from(TEXTFILES),
    }
    reading = {**common, **timing, "--all": None, "--source": source}
    setting = {**common, "--via": via, "--live": None, "--config": None}
    return {
        "stats": {**reading, "--bytes": None, "--textfile": st.sampled_from(TEXTFILES)},
        "period": {**setting, "--set": INTERVAL_ARGS},
        "enable": {**setting, "--period": INTERVAL_ARGS},
        "disable": setting,
        "path": {**common, "--all": None},
        "check": {**reading, "--max-age": SECONDS},
        "watch": {**reading, "--interval": SECONDS, "--count": SECONDS},
        "rearm": {**common, **timing, "--all": None, "--via": via, "--force": None, "--wait": SECONDS},
        "stream": {**reading, "--interval": SECONDS, "--count": SECONDS},
        "record": {
            **reading, "--interval": SECONDS, "--count": SECONDS, "--history": st.sampled_from(HISTORIES),
        },
        "advise": {
            **common,
            **stepping,
            "--all": None,
            "--history": st.sampled_from(HISTORIES),
            "--window": DURATIONS,
            "--min-history": DURATIONS,
            "--apply": None,
            "--source": source,
            "--timeout": SECONDS,
        },
        "balloon": {
            **reading,
            **stepping,
            "--advise-every": DURATIONS,
            "--interval": SECONDS,
            "--count": SECONDS,
            "--history": st.sampled_from(HISTORIES),
            "--window": DURATIONS,
            "--min-history": DURATIONS,
        },
        "exporter": {
            **reading,
            "--listen": st.sampled_from(["127.0.0.1:0", ":0", "[::1]:0", "[::1]", "1:2:3", "h:9999"]) | WORDS,
            "--interval": SECONDS,
            "--tls-cert": st.sampled_from(PEMS),
            "--tls-key": st.sampled_from(PEMS),
            "--basic-auth-file": st.sampled_from(USERS),
            "--hash-password": None,
        },
    }


CLI_OPTIONS = _cli_options()


@st.composite
def command_lines(draw: Any) -> List[str]:
    """argv from the real vocabulary: options before and after a command, values, domains and junk."""
    if draw(st.integers(0, 9)):
        command = draw(st.sampled_from(COMMANDS))
    else:
        command = draw(st.sampled_from(["", "stat", "STATS", "help"]) | WORDS)
    known = CLI_OPTIONS.get(command, CLI_OPTIONS["stats"])

    def option(names: Any) -> List[str]:
        name = draw(st.sampled_from(sorted(names)))
        value = known.get(name, CLI_OPTIONS["stats"].get(name))
        return [name] if value is None else [name, draw(value)]

    argv: List[str] = []
    for _ in range(draw(st.integers(0, 2))):
        argv += option(GLOBAL_OPTIONS)
    argv.append(command)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 5:
            argv += option(known)
        elif kind < 8:
            argv.append(draw(DOMAIN_WORDS))
        elif kind < 9:
            argv.append(draw(INTERVAL_ARGS))
        else:
            argv.append(draw(WORDS))
    argv += draw(st.sampled_from([[]] * 12 + [["--help"], ["-h"], ["--version"]]))
    if command in ("watch", "stream", "record", "balloon"):
        argv += ["--count", "1"]  # they run until Ctrl-C otherwise
    if command in ("record", "advise", "balloon"):
        argv += ["--history", f"{TMP}/history.sqlite"]  # never the default, a system path
    return argv


def _asks_for_help(argv: List[str]) -> bool:
    for word in argv:
        if word in ("-h", "--help", "--version"):
            return True
        if len(word) > 2 and ("--help".startswith(word) or "--version".startswith(word)):
            return True  # argparse takes unambiguous prefixes
        if word.startswith("-") and not word.startswith("--") and "h" in word:
            return True  # -rh: short flags run together
    return False


def _interrupted(self: Any) -> None:
    """Stands in for Exporter.start, which binds a port and serves until a signal: stop at once instead."""
    raise KeyboardInterrupt


@pytest.fixture
def cli_world(tmp_path, monkeypatch):
    """The files the command lines name, and a libvirt that only ever opens the failing URIs."""
    (tmp_path / "garbage.xml").write_text("<node><not-a-libvirt-test-driver-file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    for name, (content, mode) in USERS_FILES.items():
        (tmp_path / name).write_bytes(content)
        (tmp_path / name).chmod(mode)
    uris = [u.replace(TMP, str(tmp_path)) for u in FAILING_URIS]
    opened: List[Optional[str]] = []

    def only_failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def open_(uri: Optional[str] = None, *args: Any) -> Any:
            opened.append(uri)
            assert uri in uris, f"the CLI tried to open {uri!r}"
            return real(uri, *args)

        return open_

    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", uris[0])
    for name in ("open", "openReadOnly", "openAuth"):
        monkeypatch.setattr(libvirt, name, only_failing(getattr(libvirt, name)))
    monkeypatch.setattr(exporter.Exporter, "start", _interrupted)
    return types.SimpleNamespace(tmp=str(tmp_path), uris=uris, opened=opened, monkeypatch=monkeypatch)


def _run_cli(argv: List[str]) -> Tuple[Any, str, str, str, str]:
    """main(argv): its status (or argparse's SystemExit), its out and err, and what argparse printed."""
    out, err, real_out, real_err = io.StringIO(), io.StringIO(), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(real_out), contextlib.redirect_stderr(real_err):
        try:
            code: Any = main(argv, out=out, err=err)
        except SystemExit as exit_:
            code = exit_
    return code, out.getvalue(), err.getvalue(), real_out.getvalue(), real_err.getvalue()


def test_cli_harness_fails_fast_without_a_daemon(cli_world):
    """The harness: a command reaches libvirt through the failing default URI only, and says so once."""
    code, out, err, _, _ = _run_cli(["stats", "web1"])
    assert code == 1 and out == ""
    assert err.startswith(cli_world.uris[0] + ": cannot connect") and err.count("\n") == 1
    assert cli_world.opened == [cli_world.uris[0]]


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_vocabulary_is_the_parsers(command):
    """Every option the generator uses is one the command's --help lists."""
    code, _, _, shown, _ = _run_cli([command, "--help"])
    assert isinstance(code, SystemExit) and code.code == 0
    assert [name for name in CLI_OPTIONS[command] if name not in shown] == []


@settings(max_examples=600, **SHARED_FIXTURE)
@given(argv=command_lines(), password=st.text(max_size=12))
@example(argv=["enable", "--period", "9" * 5000, "web1"], password="")
@example(argv=["period", "web1", "9" * 5000], password="")
@example(argv=["exporter", "--basic-auth-file", f"{TMP}/users-latin1"], password="")
@example(argv=["exporter", "--basic-auth-file", f"{TMP}/users\nnewline"], password="")
@example(argv=["exporter", "--hash-password"], password="pw")
@example(argv=["stats", "--textfile", f"{TMP}/dir", "--all"], password="")
@example(argv=["--version"], password="")
@counted
def test_cli_never_raises(cli_world, argv, password):
    """main() returns 0-3 or 130 for any command line, with one-line errors and no traceback without
    --debug; argparse exits only for help, version (0) and usage errors (2)."""
    argv = [word.replace(TMP, cli_world.tmp) for word in argv]
    cli_world.monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))  # exporter --hash-password
    code, _, err, shown, argparse_err = _run_cli(argv)
    assert set(cli_world.opened) <= set(cli_world.uris)
    if isinstance(code, SystemExit):
        if code.code == 0:
            event("argparse exit 0 (help, version)")
            assert _asks_for_help(argv) and shown
        else:
            event("argparse exit 2 (usage error)")
            assert code.code == 2 and "error:" in argparse_err
        return
    event(f"main returned {code}")
    assert code in (0, 1, 2, 3, 130)
    if code == 2:
        assert err.endswith("\n") and err.splitlines()[-1].strip(), "status 2 without its error line"
    if "--debug" not in argv:
        assert "Traceback" not in err
        for word in argv:
            if "\n" in word.strip():
                assert word not in err, f"{word!r} echoed with its newline: an error of more than one line"

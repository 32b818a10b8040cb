"""virt_balloon_stats.host: libvirt error translation, domain look-up, RPC counting.

libvirt errors come from each recorded set's libvirt-errors.json (what
libvirt 9.0 and libvirt 11.3 raised on the testbed), plus a few codes the
testbed could not produce on demand (a non-QEMU driver, a dropped
connection, a hung QEMU); those are built inline with libvirt's own message
text.
"""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from tests.fakelibvirt import FakeConnect, FakeDomain, libvirt_error
from tests.unit.conftest import (
    STACKS,
    URI,
    World,
    libvirt_error_record,
    libvirt_errors,
    load,
    recorded_error,
    wait_until,
)
from virt_balloon_stats.errors import (
    BalloonStatsError,
    ConnectionFailed,
    DomainNotFound,
    DomainNotRunning,
    InvalidArgument,
    LibvirtFailure,
    OperationDenied,
    OperationTimedOut,
    UnsupportedHypervisor,
)
from virt_balloon_stats.events import EventLoopHold
from virt_balloon_stats.host import Guest, Host, RPCCounter, libvirt_call, translate_error

# Recorded case -> the package's exception, and a word its hint must contain.
RECORDED_TRANSLATIONS = {
    "command-carries-id": (LibvirtFailure, "qemuMonitorCommand failed"),
    "command-not-json": (LibvirtFailure, "qemuMonitorCommand failed"),
    "read-only-monitor-command": (OperationDenied, "--source libvirt"),
    "read-only-set-memory-stats-period": (OperationDenied, "read-write"),
    "read-only-set-memory": (OperationDenied, "read-write"),
    "set-memory-over-maximum": (LibvirtFailure, "setMemoryFlags failed"),
    "memory-stats-not-running": (DomainNotRunning, "start it"),
    "monitor-command-not-running": (DomainNotRunning, "start it"),
    "unknown-domain": (DomainNotFound, "virsh list --all"),
}

# The libvirt call each recorded case came from, as the package names it.
CALL_OF_CASE = {
    "command-carries-id": "qemuMonitorCommand",
    "command-not-json": "qemuMonitorCommand",
    "read-only-monitor-command": "qemuMonitorCommand",
    "read-only-set-memory-stats-period": "setMemoryStatsPeriod",
    "read-only-set-memory": "setMemoryFlags",
    "set-memory-over-maximum": "setMemoryFlags",
    "memory-stats-not-running": "memoryStats",
    "monitor-command-not-running": "qemuMonitorCommand",
    "unknown-domain": "lookupByName",
}


def test_every_recorded_error_case_has_an_expectation(stack):
    """A newly recorded case must be added to the table."""
    assert {r["case"] for r in libvirt_errors(stack)} == set(RECORDED_TRANSLATIONS)


RECORDED_CASES = [
    pytest.param(stack, record["case"], id=f"{stack}-{record['case']}")
    for stack in STACKS
    for record in libvirt_errors(stack)
]


@pytest.mark.parametrize("stack, case", RECORDED_CASES)
def test_translate_recorded_errors(stack, case):
    """Each recorded libvirtError becomes the right exception, keeping code and libvirt's text."""
    record = libvirt_error_record(case, stack)
    expected_type, hint = RECORDED_TRANSLATIONS[case]
    err = translate_error(recorded_error(case, stack), call=CALL_OF_CASE[case], domain="dom1")
    assert type(err) is expected_type
    assert err.code == record["code"]
    assert err.libvirt_message == record["message"]
    assert err.domain == "dom1"
    assert hint in str(err)
    assert record["message"] in str(err)


# Synthetic errors, with libvirt's own message formats (src/util/virerror.c).
SYNTHETIC = [
    pytest.param(
        libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_NONE,
        "this function is not supported by the connection driver: virDomainQemuMonitorCommand",
        UnsupportedHypervisor, id="3-no-support",
    ),
    pytest.param(
        libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
        "Cannot recv data: Connection reset by peer",
        ConnectionFailed, id="38-system-error",
    ),
    pytest.param(
        libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU,
        "Timed out during operation: cannot acquire state change lock "
        "(held by monitor=qemuDispatchDomainMonitorCommand)",
        OperationTimedOut, id="68-timeout",
    ),
    pytest.param(
        libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_DOMAIN,
        "Requested operation is not valid: domain is not running",
        DomainNotRunning, id="55-not-running",
    ),
    pytest.param(
        libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU,
        "Requested operation is not valid: domain is already running",
        LibvirtFailure, id="55-other",
    ),
    pytest.param(
        libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC,
        "internal error: client socket is closed",
        ConnectionFailed, id="1-from-rpc",
    ),
    # Seen on the testbed: a domain destroyed while a qemuMonitorCommand to it
    # was in flight. QEMU's monitor went away; libvirt's connection did not.
    pytest.param(
        libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU,
        "Unable to read from monitor: Connection reset by peer",
        DomainNotRunning, id="38-from-qemu-monitor",
    ),
    pytest.param(
        libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE,
        "internal error: unexpected reply",
        ConnectionFailed, id="1-from-remote",
    ),
]


@pytest.mark.parametrize("code, domain, message, expected", SYNTHETIC)
def test_translate_synthetic_codes(code, domain, message, expected):
    """Codes 3, 38, 68 and 55 map by code (55 only when the domain is not running)."""
    err = translate_error(libvirt_error(code, domain, message), call="qemuMonitorCommand", domain="d")
    assert type(err) is expected
    assert err.code == code
    assert err.libvirt_message == message


def test_translated_errors_share_the_one_root(stack):
    """Every translation is a BalloonStatsError, so one except clause catches them."""
    for record in libvirt_errors(stack):
        err = translate_error(recorded_error(record["case"], stack), call="x", domain=None)
        assert isinstance(err, BalloonStatsError)


def test_libvirt_11_gives_the_same_errors_as_9_0_but_its_json_parsers_text():
    """Code, error domain and text of every case both sets have are the same on libvirt 9.0 and 11.3.

    Only a command that is not JSON differs, in its text alone: libvirt 9.0
    parses with yajl ("cannot parse json ..."), libvirt 11 with json-c
    ("failed to parse JSON: ...").
    """
    old = {r["case"]: r for r in libvirt_errors("debian12")}
    new = {r["case"]: r for r in libvirt_errors("next")}
    assert set(new) == set(old)
    assert all(new[case] == old[case] for case in old if case != "command-not-json")
    for record, text in ((old["command-not-json"], "internal error: cannot parse json "),
                         (new["command-not-json"], "internal error: failed to parse JSON: ")):
        assert (record["code"], record["domain"]) == (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_NONE)
        assert record["message"].startswith(text)


def test_libvirt_call_counts_and_raises_from_the_libvirt_error():
    """The context manager counts the call even when it fails, and chains the cause."""
    counter = RPCCounter()
    original = recorded_error("memory-stats-not-running")
    with pytest.raises(DomainNotRunning) as info:
        with libvirt_call(counter, "memoryStats", "dom1"):
            raise original
    assert info.value.__cause__ is original
    assert counter.snapshot() == {"memoryStats": 1}


def test_libvirt_call_lets_other_exceptions_through():
    """Only libvirtError is translated; a bug stays a bug."""
    with pytest.raises(KeyError):
        with libvirt_call(RPCCounter(), "x"):
            raise KeyError("k")


def test_rpc_counter_counts_by_name_and_in_total_across_threads():
    """Shared by all threads of a connection: no lost increments."""
    counter = RPCCounter()

    def work():
        for _ in range(500):
            counter.add("memoryStats")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counter.add("XMLDesc")
    assert counter.snapshot() == {"memoryStats": 2000, "XMLDesc": 1}
    assert counter.total() == 2001


def _host(*names, **kwargs):
    fixtures = [load(n) for n in names]
    domains = kwargs.pop("domains", None) or [FakeDomain(f) for f in fixtures]
    conn = FakeConnect(domains, not_found=libvirt_error_record("unknown-domain"), **kwargs)
    return Host(conn, URI), conn, fixtures


@pytest.mark.parametrize("key", ["name", "uuid", "id"])
def test_lookup_by_each_identity(key):
    """virsh's three ways to name a domain all find it."""
    host, conn, (fixture,) = _host("virtio")
    spec = str(fixture["domain"][key])
    guest = host.lookup(spec)
    assert guest.uuid == fixture["domain"]["uuid"]
    assert guest.name == fixture["domain"]["name"]


def test_lookup_order_is_id_then_uuid_then_name():
    """A digit string is tried as an id first, then as a name (a domain may be called "42")."""
    fixture = load("virtio")
    fixture["domain"]["name"] = "42"
    host, conn, _ = _host(domains=[FakeDomain(fixture)])
    guest = host.lookup("42")
    assert guest.name == "42"
    assert [c[0] for c in conn.calls] == ["lookupByID", "lookupByName"]
    assert host.counter.snapshot() == {"lookupByID": 1, "lookupByName": 1}


def test_lookup_by_uuid_goes_straight_to_uuid():
    """A UUID is not a digit string: no lookupByID, and no name look-up once found."""
    host, conn, (fixture,) = _host("virtio")
    host.lookup(fixture["domain"]["uuid"])
    assert [c[0] for c in conn.calls] == ["lookupByUUIDString"]


def test_lookup_of_an_id_stops_at_the_id():
    """A running domain's id finds it in one call."""
    host, conn, (fixture,) = _host("virtio")
    host.lookup(str(fixture["domain"]["id"]))
    assert conn.calls == [("lookupByID", (fixture["domain"]["id"],))]


def test_lookup_of_an_unknown_name_is_domain_not_found_with_recorded_code():
    """After the id and UUID routes fail, the name route's error is the one reported."""
    host, conn, _ = _host("virtio")
    record = libvirt_error_record("unknown-domain")
    with pytest.raises(DomainNotFound) as info:
        host.lookup("vbs-tb-rec-nope")
    assert info.value.code == record["code"]
    assert info.value.libvirt_message == record["message"]
    assert isinstance(info.value.__cause__, libvirt.libvirtError)


def test_lookup_of_an_empty_name_is_refused_before_calling_libvirt():
    """An empty spec is a usage error, not a libvirt round trip."""
    host, conn, _ = _host("virtio")
    with pytest.raises(InvalidArgument):
        host.lookup("")
    assert conn.calls == []


def test_running_guests_lists_active_domains_sorted_by_name():
    """Inactive domains (id -1) are left out; the ACTIVE flag is passed."""
    a, b, c = load("virtio"), load("nostats"), load("paused")
    domains = [FakeDomain(a), FakeDomain(b), FakeDomain(c, dom_id=-1)]
    host, conn, _ = _host(domains=domains)
    guests = host.running_guests()
    assert [g.name for g in guests] == sorted([a["domain"]["name"], b["domain"]["name"]])
    assert conn.calls_to("listAllDomains") == [(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,)]


def test_domain_records_is_one_call_with_nowait_keyed_by_uuid():
    """One domainListGetStats for every domain, state and BALLOON, NOWAIT so a hung QEMU cannot stall it."""
    host, conn, fixtures = _host("virtio", "nostats", "nodriver")
    guests = [host.lookup(f["domain"]["name"]) for f in fixtures]
    result = host.domain_records(guests)
    calls = conn.calls_to("domainListGetStats")
    assert len(calls) == 1
    doms, stats, flags = calls[0]
    assert [d.UUIDString() for d in doms] == [f["domain"]["uuid"] for f in fixtures]
    assert stats == libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_STATE
    assert flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert {uuid: dict(r.balloon) for uuid, r in result.items()} == {
        f["domain"]["uuid"]: f["all_domain_stats"] for f in fixtures
    }
    assert {r.state for r in result.values()} == {"running"}
    assert host.counter.snapshot()["domainListGetStats"] == 1


def test_domain_records_of_no_domain_makes_no_call():
    """Nothing to ask, nothing sent."""
    host, conn, _ = _host("virtio")
    assert host.domain_records([]) == {}
    assert conn.calls == []


@pytest.mark.parametrize(
    "method, call, args",
    [
        ("state", "state", ()),
        ("xml", "XMLDesc", ()),
        ("memory_stats", "memoryStats", ()),
    ],
)
def test_guest_methods_count_their_call(method, call, args):
    """Each Guest method is one counted libvirt round trip."""
    w = World([load("virtio")])
    getattr(w.guest(), method)(*args)
    assert w.host.counter.snapshot() == {call: 1}


@pytest.mark.parametrize("name", ["virtio", "paused", "none"])
def test_guest_state_words(name):
    """libvirt's state numbers become words: running, paused."""
    fixture = load(name)
    w = World([fixture])
    expected = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}
    assert w.guest().state() == expected[fixture["domain"]["state"][0]]


@pytest.mark.parametrize(
    "inactive, key, flags",
    [(False, "xml_live", 0), (True, "xml_inactive", libvirt.VIR_DOMAIN_XML_INACTIVE)],
)
def test_guest_xml_live_or_inactive(inactive, key, flags):
    """The inactive flag is VIR_DOMAIN_XML_INACTIVE."""
    fixture = load("virtio")
    w = World([fixture])
    assert w.guest().xml(inactive=inactive) == fixture[key]
    assert w.domain.calls_to("XMLDesc") == [(flags,)]


def test_guest_memory_stats_is_libvirts_dict():
    """memoryStats comes back unchanged: KiB and counts, libvirt's keys."""
    fixture = load("virtio")
    assert World([fixture]).guest().memory_stats() == fixture["memory_stats"]


@pytest.mark.parametrize(
    "live, config, flags",
    [
        (True, False, libvirt.VIR_DOMAIN_AFFECT_LIVE),
        (False, True, libvirt.VIR_DOMAIN_AFFECT_CONFIG),
        (True, True, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG),
    ],
)
def test_set_memory_stats_period_flags(live, config, flags):
    """live and config map to AFFECT_LIVE and AFFECT_CONFIG."""
    w = World([load("virtio")])
    w.guest().set_memory_stats_period(7, live=live, config=config)
    assert w.domain.calls_to("setMemoryStatsPeriod") == [(7, flags)]


def test_set_memory_stats_period_read_only_is_operation_denied():
    """The recorded read-only refusal is OperationDenied naming the call."""
    error = recorded_error("read-only-set-memory-stats-period")
    fixture = load("virtio")
    w = World([fixture], domains=[FakeDomain(fixture, raises={"setMemoryStatsPeriod": error})])
    with pytest.raises(OperationDenied) as info:
        w.guest().set_memory_stats_period(5, live=True, config=False)
    assert "setMemoryStatsPeriod" in str(info.value)
    assert info.value.domain == fixture["domain"]["name"]


def test_cache_key_changes_with_the_id():
    """A restarted domain (same UUID, new id) has a new cache key."""
    fixture = load("virtio")
    counter = RPCCounter()
    before = Guest(FakeDomain(fixture), counter)
    after = Guest(FakeDomain(fixture, dom_id=fixture["domain"]["id"] + 1), counter)
    assert before.cache_key[0] == after.cache_key[0] == fixture["domain"]["uuid"]
    assert before.cache_key != after.cache_key
    assert Guest(FakeDomain(fixture, dom_id=-1), counter).id is None


def test_host_close_closes_the_connection_and_context_manager():
    """``with Host(...)`` closes the libvirt connection on exit."""
    host, conn, _ = _host("virtio")
    with host as h:
        assert h is host
    assert conn.closed


def test_host_open_failure_is_connection_failed(monkeypatch):
    """libvirt.open raising becomes ConnectionFailed with libvirt's code kept.

    libvirt.open is the libvirt boundary; the error is a real libvirtError.
    """
    error = libvirt_error(
        libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
        "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory",
    )

    def refuse(uri):
        raise error

    monkeypatch.setattr(libvirt, "open", refuse)
    with pytest.raises(ConnectionFailed) as info:
        Host.open("qemu:///system")
    assert info.value.code == libvirt.VIR_ERR_SYSTEM_ERROR
    assert "No such file" in str(info.value)


def test_host_open_uses_libvirt_default_uri(monkeypatch):
    """As virsh: LIBVIRT_DEFAULT_URI when set, else qemu:///system; read-only uses openReadOnly."""
    seen = []
    monkeypatch.setattr(libvirt, "open", lambda uri: seen.append(("open", uri)) or object())
    monkeypatch.setattr(libvirt, "openReadOnly", lambda uri: seen.append(("ro", uri)) or object())
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert Host.open().uri == "qemu:///system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+tcp://127.0.0.1/system")
    host = Host.open(readonly=True)
    assert host.uri == "qemu+tcp://127.0.0.1/system"
    assert seen == [("open", "qemu:///system"), ("ro", "qemu+tcp://127.0.0.1/system")]
    assert host.counter.snapshot() == {"openReadOnly": 1}


def test_close_gives_back_event_registrations_before_closing():
    """Registrations hold the connection: close() undoes them, or its socket would stay open."""
    conn = FakeConnect([], not_found=libvirt_error_record("unknown-domain"))
    host = Host(conn, "qemu:///system")
    host.watch(lambda event: None)
    registered = len(conn.calls_to("domainEventRegisterAny"))
    host.close()
    assert registered == 4 and conn.deregistered == set(range(registered))
    names = [name for name, _ in conn.calls]
    assert names.count("unregisterCloseCallback") == 1
    assert names.index("unregisterCloseCallback") < names.index("close") and conn.closed


# -- holding libvirt's event loop ----------------------------------------------------------------


def test_a_held_event_loop_waits_until_every_hold_is_released(ticks):
    first, second = EventLoopHold(), EventLoopHold()
    time.sleep(0.05)  # the turn it was in ends
    held = len(ticks)
    time.sleep(0.2)
    assert len(ticks) <= held + 1
    first.release()
    first.release()  # a second release does nothing: the other hold still counts
    time.sleep(0.2)
    assert len(ticks) <= held + 1
    second.release()
    assert wait_until(lambda: len(ticks) > held + 5, within=5.0)
    with EventLoopHold():
        time.sleep(0.05)
        held = len(ticks)
        time.sleep(0.1)
        assert len(ticks) <= held + 1
    assert wait_until(lambda: len(ticks) > held + 5, within=5.0)


# -- a balloon step, and the job check before it ---------------------------------------------------


def test_set_memory_asks_libvirt_for_whole_kib_on_the_live_domain_only():
    w = World([load("step")])
    guest = w.host.lookup("vbs-tb-rec-step")
    guest.set_memory(352 * 2**20 + 1000)
    assert w.domain.calls_to("setMemoryFlags") == [(352 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)]
    assert guest.counter.snapshot().get("setMemoryFlags") == 1


@pytest.mark.parametrize("size", [0, -1, 1023])
def test_a_size_under_one_kib_is_refused_before_libvirt(size):
    w = World([load("step")])
    guest = w.host.lookup("vbs-tb-rec-step")
    with pytest.raises(InvalidArgument):
        guest.set_memory(size)
    assert w.domain.calls_to("setMemoryFlags") == []


@pytest.mark.parametrize("stack", STACKS)
def test_a_size_over_memory_is_libvirts_recorded_refusal(stack):
    w = World([load("step", stack)], stack=stack)
    w.domain.fail("setMemoryFlags", recorded_error("set-memory-over-maximum", stack))
    with pytest.raises(LibvirtFailure) as caught:
        w.host.lookup("vbs-tb-rec-step").set_memory(2**40)
    assert caught.value.code == libvirt.VIR_ERR_INVALID_ARG
    assert "cannot set memory higher than max memory" in str(caught.value)


@pytest.mark.parametrize("stack", STACKS)
def test_the_recorded_step_settled_where_libvirt_was_asked(stack):
    """What the stepper relies on: the balloon size libvirt reports follows setMemoryFlags, within seconds."""
    step = load("step", stack)["set_memory"]
    assert step["returned"] == 0 and step["call_seconds"] < 1
    assert step["before"]["memory_stats"]["actual"] - step["target_kib"] == 32 * 1024
    assert step["after"]["memory_stats"]["actual"] == step["after"]["info"][2] == step["target_kib"]
    assert f"<currentMemory unit='KiB'>{step['target_kib']}</currentMemory>" in step["after"]["xml_live"]
    assert step["after"]["job_info"][0] == libvirt.VIR_DOMAIN_JOB_NONE


@pytest.mark.parametrize("stack", STACKS)
def test_no_job_on_the_recorded_domain(stack):
    w = World([load("step", stack)], stack=stack)
    guest = w.host.lookup(w.domain.name())
    assert guest.job_active() is False
    assert w.domain.calls_to("jobInfo") == [()]


def test_a_job_of_any_type_is_active():
    """Synthetic: the recorded domains had no job; a migration's type is VIR_DOMAIN_JOB_UNBOUNDED."""
    fixture = dict(load("step"))
    fixture["job_info"] = [libvirt.VIR_DOMAIN_JOB_UNBOUNDED] + [0] * 11
    w = World([fixture])
    assert w.host.lookup("vbs-tb-rec-step").job_active() is True


@pytest.mark.parametrize("stack", STACKS)
def test_the_hosts_available_memory_is_free_cached_and_buffers_of_getmemorystats(stack):
    fixture = load("step", stack)
    node = fixture["node_memory_stats"]
    w = World([fixture], stack=stack)
    available = w.host.node_available()
    assert available == (node["free"] + node["cached"] + node["buffers"]) * 1024
    assert 0 < available <= node["total"] * 1024
    assert w.conn.calls == [("getMemoryStats", (libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0))]


def test_a_host_figure_without_free_memory_is_a_libvirt_failure():
    w = World([load("step")])
    w.conn.node_memory_stats = {"total": 1}
    with pytest.raises(LibvirtFailure) as caught:
        w.host.node_available()
    assert "gave no free memory" in str(caught.value)

"""virt_balloon_stats.transport: the real passthrough transport and the QMP client.

LibvirtQemuTransport is given an injected ``qemuMonitorCommand`` (the one
seam it offers), which answers with recorded replies or raises the real
libvirtError recorded on the testbed (libvirt 9.0 and 11.3).
"""

from __future__ import annotations

import json

import libvirt
import libvirt_qemu
import pytest

from tests.fakelibvirt import FakeDomain, libvirt_error
from tests.unit.conftest import STACKS, libvirt_error_record, libvirt_errors, load, recorded_error
from virt_balloon_stats.errors import (
    CommandNotAllowed,
    DomainNotRunning,
    LibvirtFailure,
    OperationDenied,
    OperationTimedOut,
)
from virt_balloon_stats.host import Guest, RPCCounter
from virt_balloon_stats.transport import LibvirtQemuTransport, QMPClient


def _guest():
    return Guest(FakeDomain(load("virtio")), RPCCounter())


def test_default_transport_is_libvirt_qemu_monitor_command():
    """Without an injected function the transport calls libvirt_qemu.qemuMonitorCommand."""
    transport = LibvirtQemuTransport()
    assert transport._monitor_command is libvirt_qemu.qemuMonitorCommand
    assert isinstance(QMPClient().transport, LibvirtQemuTransport)


def test_monitor_command_passes_domain_command_and_flags_zero():
    """flags must be 0: libvirt's HMP flag would change the reply format."""
    fixture = load("virtio")
    exchange = next(q for q in fixture["qmp"] if q["command"]["execute"] == "query-balloon")
    seen = []

    def monitor(dom, command, flags):
        seen.append((dom, command, flags))
        return exchange["reply"]

    guest = _guest()
    command = json.dumps(exchange["command"])
    assert LibvirtQemuTransport(monitor).monitor_command(guest, command) == exchange["reply"]
    assert seen == [(guest.domain, command, 0)]
    assert guest.counter.snapshot() == {"qemuMonitorCommand": 1}


PASSTHROUGH_ERRORS = {
    "read-only-monitor-command": OperationDenied,
    "monitor-command-not-running": DomainNotRunning,
    "command-carries-id": LibvirtFailure,
    "command-not-json": LibvirtFailure,
}

CASES = [
    pytest.param(stack, record["case"], PASSTHROUGH_ERRORS[record["case"]], id=f"{stack}-{record['case']}")
    for stack in STACKS
    for record in libvirt_errors(stack)
    if record["case"] in PASSTHROUGH_ERRORS
]


@pytest.mark.parametrize("stack, case, expected", CASES)
def test_recorded_passthrough_errors_become_typed_errors(stack, case, expected):
    """libvirt's passthrough errors are translated, chained, and name the domain."""
    record = libvirt_error_record(case, stack)
    error = recorded_error(case, stack)

    def monitor(dom, command, flags):
        raise error

    guest = _guest()
    with pytest.raises(expected) as info:
        LibvirtQemuTransport(monitor).monitor_command(guest, '{"execute":"query-balloon"}')
    assert type(info.value) is expected
    assert info.value.code == record["code"]
    assert info.value.domain == guest.name
    assert info.value.__cause__ is error
    assert guest.counter.snapshot() == {"qemuMonitorCommand": 1}


def test_hung_qemu_timeout_is_operation_timed_out():
    """Code 68, as seen on the testbed with a SIGSTOPped QEMU (text from GROUND_TRUTH)."""
    error = libvirt_error(
        libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU,
        "Timed out during operation: cannot acquire state change lock "
        "(held by monitor=qemuDispatchDomainMonitorCommand)",
    )

    def monitor(dom, command, flags):
        raise error

    with pytest.raises(OperationTimedOut) as info:
        QMPClient(LibvirtQemuTransport(monitor)).query_balloon(_guest())
    assert "try again" in str(info.value)


def test_read_only_hint_points_at_the_libvirt_source():
    """On a read-only connection the passthrough is refused; the hint says what works instead."""
    error = recorded_error("read-only-monitor-command")

    def monitor(dom, command, flags):
        raise error

    with pytest.raises(OperationDenied) as info:
        QMPClient(LibvirtQemuTransport(monitor)).query_balloon(_guest())
    assert "--source libvirt" in str(info.value)


def test_client_sends_exactly_the_built_command_text():
    """No id, compact JSON: the recorded command dict, byte for byte as built."""
    fixture = load("virtio")
    path = fixture["balloon_path"]
    command = {"execute": "qom-get", "arguments": {"path": path, "property": "guest-stats-polling-interval"}}
    reply = next(q["reply"] for q in fixture["qmp"] if q["command"] == command)
    seen = []

    def monitor(dom, text, flags):
        seen.append(text)
        return reply

    value = QMPClient(LibvirtQemuTransport(monitor)).qom_get(_guest(), path, "guest-stats-polling-interval")
    assert value == json.loads(reply)["return"]
    assert [json.loads(t) for t in seen] == [command]
    assert '"id"' not in seen[0]


@pytest.mark.parametrize("refused", [True, 1.0, "1", -1, 2**32])
def test_a_command_built_once_does_not_let_a_lookalike_through(refused):
    """Built commands are kept, keyed by value and type: True == 1 == 1.0, but only the int is allowed."""
    fixture = load("virtio")
    path = fixture["balloon_path"]
    sent = []

    def monitor(dom, text, flags):
        sent.append(json.loads(text))
        return '{"return": {}}'

    client = QMPClient(LibvirtQemuTransport(monitor))
    for _ in range(2):
        client.set_polling_interval(_guest(), path, 1)
    arguments = {"path": path, "property": "guest-stats-polling-interval", "value": refused}
    with pytest.raises(CommandNotAllowed):
        client.execute(_guest(), "qom-set", arguments)
    assert [c["arguments"]["value"] for c in sent] == [1, 1]
    assert all(type(c["arguments"]["value"]) is int for c in sent)

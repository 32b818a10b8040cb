"""QMP through libvirt's qemu-monitor-command passthrough.

The only module that imports ``libvirt_qemu``. :class:`Transport` is the
seam: one method that takes a domain and a JSON command and returns QEMU's raw
reply. :class:`LibvirtQemuTransport` is the real one; tests give
:class:`QMPClient` a transport that answers with replies recorded on the
testbed.

Every passthrough call marks the domain as tainted (``custom-monitor``) in
libvirt: ``virsh dominfo`` shows it and the domain log records it. That is
libvirt's way to say "someone talked to QEMU behind my back", and it is why
the ``libvirt`` source exists.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

import libvirt_qemu

from virt_balloon_stats.errors import QMPBadReply, QMPFailure
from virt_balloon_stats.host import Guest, libvirt_call
from virt_balloon_stats.qmp import POLLING_PROPERTY, build_command, parse_reply

__all__ = ["Transport", "LibvirtQemuTransport", "QMPClient"]


def _command_text(execute: str, arguments: Optional[Mapping[str, Any]]) -> str:
    """:func:`~virt_balloon_stats.qmp.build_command`, once per distinct command.

    A collector sends the same ``qom-get`` to every domain in every cycle;
    building and checking its text once saves a tenth of the Python work of
    a steady reading.
    """
    # Keyed by type too: True == 1 == 1.0, but only the int is an allowed value.
    items = tuple((name, type(value), value) for name, value in (arguments or {}).items())
    try:
        return _built(execute, items)
    except TypeError:  # an unhashable argument: never one of ours, and refused below
        return build_command(execute, arguments)


@functools.lru_cache(maxsize=1024)
def _built(execute: str, items: Tuple[Tuple[str, type, Any], ...]) -> str:
    return build_command(execute, {name: value for name, _, value in items})


class Transport(Protocol):
    """Sends one QMP command (JSON text, no ``id``) and returns the raw reply."""

    def monitor_command(self, guest: Guest, command: str) -> str:
        """Send ``command`` to ``guest``'s QEMU and return its reply text."""


class LibvirtQemuTransport:
    """The real transport: ``libvirt_qemu.qemuMonitorCommand(dom, cmd, 0)``.

    :param monitor_command: The libvirt function to call; only tests that
        exercise error translation pass another one.
    """

    def __init__(self, monitor_command: Optional[Callable[[Any, str, int], str]] = None) -> None:
        self._monitor_command = monitor_command or libvirt_qemu.qemuMonitorCommand

    def monitor_command(self, guest: Guest, command: str) -> str:
        """Send through the passthrough; libvirt errors become ours.

        :raise LibvirtFailure: (or a subclass) When libvirt refuses or fails.
        """
        with libvirt_call(guest.counter, "qemuMonitorCommand", guest.name):
            return str(self._monitor_command(guest.domain, command, 0))


class QMPClient:
    """The handful of QMP commands this package sends, with typed results.

    Stateless apart from its transport, so one instance serves all threads.
    """

    def __init__(self, transport: Optional[Transport] = None) -> None:
        self.transport: Transport = transport or LibvirtQemuTransport()

    def execute(self, guest: Guest, execute: str, arguments: Optional[Mapping[str, Any]] = None) -> Any:
        """Send one allowed command and return its ``return`` value.

        :raise CommandNotAllowed: When the command is not allowed (not sent).
        :raise QMPExecuteError: When QEMU answers with an error.
        :raise QMPBadReply: When the reply is malformed.
        :raise LibvirtFailure: When libvirt itself fails.
        """
        command = _command_text(execute, arguments)
        received = self.transport.monitor_command(guest, command)
        try:
            return parse_reply(command, received)
        except QMPFailure as err:
            err.domain = guest.name
            raise

    def qom_list(self, guest: Guest, path: str) -> List[Dict[str, str]]:
        """Return the properties of the QOM object at ``path`` (name and type)."""
        value = self.execute(guest, "qom-list", {"path": path})
        if not isinstance(value, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("type"), str)
            for p in value
        ):
            raise QMPBadReply(f"qom-list {path} did not return a list of properties", domain=guest.name)
        return [{"name": p["name"], "type": p["type"]} for p in value]

    def qom_get(self, guest: Guest, path: str, prop: str) -> Any:
        """Return the value of QOM property ``prop`` of the object at ``path``."""
        return self.execute(guest, "qom-get", {"path": path, "property": prop})

    def set_polling_interval(self, guest: Guest, path: str, seconds: int) -> None:
        """``qom-set`` QEMU's stats polling interval (0 disables)."""
        self.execute(guest, "qom-set", {"path": path, "property": POLLING_PROPERTY, "value": seconds})

    def query_balloon(self, guest: Guest) -> int:
        """Return the balloon's current size (``actual``), in bytes."""
        value = self.execute(guest, "query-balloon")
        actual = value.get("actual") if isinstance(value, dict) else None
        if not isinstance(actual, int) or isinstance(actual, bool):
            raise QMPBadReply("query-balloon did not return an integer 'actual'", domain=guest.name)
        return actual

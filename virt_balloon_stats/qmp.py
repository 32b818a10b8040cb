"""Pure QMP message handling: the allowlist, building commands, reading replies.

Nothing here does I/O. :mod:`virt_balloon_stats.transport` sends what
:func:`build_command` returns and hands the raw reply to :func:`parse_reply`.

Why an allowlist: the passthrough gives full control of QEMU (``quit``,
``device_del``, migration...). This tool only ever needs to read the balloon
and change its polling interval, so anything else is refused before it can
reach libvirt, whatever a caller or a bug asks for.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from virt_balloon_stats.errors import CommandNotAllowed, QMPBadReply, QMPExecuteError

__all__ = ["POLLING_PROPERTY", "check_allowed", "build_command", "parse_reply"]

#: The QOM property that sets QEMU's stats timer, in seconds (0 disables).
#: QEMU's docs/virtio-balloon-stats.txt spells it ``stats-polling-interval``
#: in its last example; that name does not exist.
POLLING_PROPERTY = "guest-stats-polling-interval"

_READ_ONLY_COMMANDS = frozenset({"qom-list", "qom-get", "query-balloon"})


def check_allowed(execute: str, arguments: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse any command this tool has no business sending.

    Allowed: ``qom-list``, ``qom-get``, ``query-balloon``, and ``qom-set`` of
    :data:`POLLING_PROPERTY` alone.

    :raise CommandNotAllowed: When the command is not on the allowlist.
    """
    if execute in _READ_ONLY_COMMANDS:
        return
    if execute == "qom-set":
        prop = (arguments or {}).get("property")
        if prop == POLLING_PROPERTY:
            return
        raise CommandNotAllowed(
            f"qom-set is allowed only for {POLLING_PROPERTY!r}, not {prop!r}; nothing was sent"
        )
    raise CommandNotAllowed(
        f"QMP command {execute!r} is not allowed (only qom-list, qom-get, query-balloon "
        f"and qom-set of {POLLING_PROPERTY!r}); nothing was sent"
    )


def build_command(execute: str, arguments: Optional[Mapping[str, Any]] = None) -> str:
    """Return the JSON text of an allowed command, without an ``id``.

    libvirt adds its own ``id`` and fails with "Unable to append command 'id'
    string" when the command already has one, so we never set it.

    :raise CommandNotAllowed: When the command is not on the allowlist.
    """
    check_allowed(execute, arguments)
    message: dict[str, Any] = {"execute": execute}
    if arguments:
        message["arguments"] = dict(arguments)
    return json.dumps(message, separators=(",", ":"))


def parse_reply(sent: str, received: str) -> Any:
    """Turn one raw QMP reply into its ``return`` value or a typed error.

    :raise QMPExecuteError: When the reply carries an ``error`` member.
    :raise QMPBadReply: When the reply is not JSON, not an object, has
        neither ``return`` nor ``error``, or has a malformed ``error``.
    """
    try:
        message = json.loads(received)
    except ValueError as err:
        raise QMPBadReply(
            f"QEMU's reply is not JSON ({err}): {received[:200]!r}", sent=sent, received=received
        ) from err
    if not isinstance(message, dict):
        raise QMPBadReply(
            f"QEMU's reply is not a JSON object: {received[:200]!r}", sent=sent, received=received
        )
    if "error" in message:
        error = message["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("class"), str)
            or not isinstance(error.get("desc"), str)
        ):
            raise QMPBadReply(
                f"QEMU's error reply is malformed: {received[:200]!r}", sent=sent, received=received
            )
        raise QMPExecuteError(error["class"], error["desc"], sent=sent, received=received)
    if "return" not in message:
        raise QMPBadReply(
            f"QEMU's reply has neither 'return' nor 'error': {received[:200]!r}",
            sent=sent,
            received=received,
        )
    return message["return"]

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

from virt_balloon_stats.errors import CommandNotAllowed, QMPBadReply, QMPExecuteError, short_repr

__all__ = ["POLLING_PROPERTY", "READABLE_PROPERTIES", "check_allowed", "build_command", "parse_reply"]

#: The QOM property that sets QEMU's stats timer, in seconds (0 disables).
#: QEMU's docs/virtio-balloon-stats.txt spells it ``stats-polling-interval``
#: in its last example; that name does not exist.
POLLING_PROPERTY = "guest-stats-polling-interval"

#: The only properties ever read or written: a ``qom-get`` of anything else
#: (another object's secrets, say) is refused like any other command.
READABLE_PROPERTIES = frozenset({"guest-stats", POLLING_PROPERTY})

#: QEMU's own upper bound for the interval (a uint32 of seconds).
_MAX_INTERVAL = 2**32 - 1

#: Longest QOM path accepted; real ones are well under 200 characters.
_MAX_PATH = 512

#: The exact argument members each allowed command takes.
_SHAPES = {
    "qom-list": {"path"},
    "qom-get": {"path", "property"},
    "qom-set": {"path", "property", "value"},
    "query-balloon": set(),
}


def check_allowed(execute: str, arguments: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse any command this tool has no business sending.

    Allowed, with exactly these members and nothing else (no ``id``, no
    extras, names in QEMU's own case): ``query-balloon``; ``qom-list`` of a
    path under ``/machine``; ``qom-get`` of ``guest-stats`` or
    :data:`POLLING_PROPERTY` on such a path; ``qom-set`` of
    :data:`POLLING_PROPERTY` to a whole number of seconds (0 to 2^32-1).

    :raise CommandNotAllowed: When the command is not on the allowlist.
    """
    args = dict(arguments or {})
    shape = _SHAPES.get(execute) if isinstance(execute, str) else None
    if shape is None:
        raise CommandNotAllowed(
            f"QMP command {execute!r} is not allowed (only qom-list, qom-get, query-balloon "
            f"and qom-set of {POLLING_PROPERTY!r}); nothing was sent"
        )
    if execute == "qom-set" and args.get("property") != POLLING_PROPERTY:
        raise CommandNotAllowed(
            f"qom-set is allowed only for {POLLING_PROPERTY!r}, not {short_repr(args.get('property'))}; "
            "nothing was sent"
        )
    if set(args) != shape:
        raise CommandNotAllowed(
            f"{execute} takes exactly {sorted(shape) or 'no arguments'}, not "
            f"{short_repr(sorted(map(str, args)))}; nothing was sent"
        )
    if "path" in shape:
        path = args["path"]
        if not isinstance(path, str) or not (path == "/machine" or path.startswith("/machine/")):
            raise CommandNotAllowed(
                f"{execute} is allowed only under /machine, not {short_repr(path)}; nothing was sent"
            )
        if len(path) > _MAX_PATH or any(ord(c) < 0x20 for c in path):
            raise CommandNotAllowed(f"{execute}: not a QOM path: {short_repr(path)}; nothing was sent")
    if execute == "qom-get" and (
        not isinstance(args["property"], str) or args["property"] not in READABLE_PROPERTIES
    ):
        raise CommandNotAllowed(
            f"qom-get is allowed only for {sorted(READABLE_PROPERTIES)}, not {short_repr(args['property'])}; "
            "nothing was sent"
        )
    if execute == "qom-set":
        value = args["value"]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INTERVAL:
            raise CommandNotAllowed(
                f"qom-set of {POLLING_PROPERTY} takes whole seconds from 0 to {_MAX_INTERVAL}, "
                f"not {short_repr(value)}; nothing was sent"
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
    except RecursionError as err:
        raise QMPBadReply(
            f"QEMU's reply is nested too deep to read: {received[:200]!r}", sent=sent, received=received
        ) from err
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

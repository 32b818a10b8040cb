"""The exceptions of virt_balloon_stats: one root, raised ``from`` their cause.

Every failure the library reports is a :class:`BalloonStatsError`, so a caller
(the CLI, an agent, a sysadmin's script) needs one ``except`` clause.
``libvirt.libvirtError`` never escapes: :mod:`virt_balloon_stats.host`
translates it once, by error code.

::

    BalloonStatsError
     +-- InvalidArgument            bad input, refused before anything is sent
     +-- LibvirtFailure             a libvirt call failed (error code kept)
     |    +-- ConnectionFailed      cannot open, or lost, the libvirt connection
     |    +-- DomainNotFound        no domain with that name, UUID or id
     |    +-- DomainNotRunning      the domain exists but is not running
     |    +-- OperationDenied       read-only connection or insufficient rights
     |    +-- UnsupportedHypervisor the connection is not to the QEMU driver
     |    +-- OperationTimedOut     libvirt gave up waiting (e.g. a hung QEMU)
     |    +-- TooManyCallsStuck     calls stuck on hung QEMUs reached the limit; not sent
     +-- QMPFailure
     |    +-- CommandNotAllowed     not on the allowlist; never sent
     |    +-- QMPExecuteError       QEMU answered with an ``error`` member
     |    +-- QMPBadReply           the reply is not a well-formed QMP reply
     +-- InvalidDomainXML           the domain XML could not be parsed
     +-- NoBalloonDevice            the domain has no balloon (``model='none'``)
     +-- QOMPathNotFound           the balloon could not be located in QOM
 +-- QEMUUnresponsive          QEMU did not answer within the deadline
 +-- HistoryError              the history file cannot be used (not one, newer, held)
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "BalloonStatsError",
    "InvalidArgument",
    "LibvirtFailure",
    "ConnectionFailed",
    "DomainNotFound",
    "DomainNotRunning",
    "OperationDenied",
    "UnsupportedHypervisor",
    "OperationTimedOut",
    "TooManyCallsStuck",
    "QMPFailure",
    "CommandNotAllowed",
    "QMPExecuteError",
    "QMPBadReply",
    "InvalidDomainXML",
    "NoBalloonDevice",
    "QOMPathNotFound",
    "QEMUUnresponsive",
    "HistoryError",
    "short_repr",
    "NEEDS_PROMETHEUS_CLIENT",
]


#: What a Prometheus rendering says when the ``exporter`` extra is not installed.
NEEDS_PROMETHEUS_CLIENT = (
    "Prometheus output needs prometheus_client: pip install 'virt_balloon_stats[exporter]' "
    "(Debian: apt install python3-prometheus-client)"
)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` for an error message, cut short; a huge integer is described, not printed.

    Bad input ends up quoted in messages: Python refuses to turn an int of
    over 4300 digits into text, and a message has no use for a megabyte.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BalloonStatsError(Exception):
    """Root of every error this library raises.

    :param message: One line saying what went wrong and, where we know it,
        what to do about it.
    :param domain: The domain the failure concerns, when there is one; the
        CLI prefixes its one-line error with it.
    """

    def __init__(self, message: str, *, domain: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.domain = domain

    def __str__(self) -> str:
        return self.message


class InvalidArgument(BalloonStatsError):
    """Input that was refused before any call was made (nothing changed)."""


class LibvirtFailure(BalloonStatsError):
    """A libvirt call failed; ``code`` is libvirt's ``VIR_ERR_*`` number.

    :param code: ``libvirtError.get_error_code()``, or ``None`` when unknown.
    :param libvirt_message: libvirt's own text, kept for ``--debug`` and logs.
    """

    def __init__(
        self,
        message: str,
        *,
        domain: Optional[str] = None,
        code: Optional[int] = None,
        libvirt_message: Optional[str] = None,
    ) -> None:
        super().__init__(message, domain=domain)
        self.code = code
        self.libvirt_message = libvirt_message


class ConnectionFailed(LibvirtFailure):
    """The libvirt connection could not be opened, or was lost."""


class DomainNotFound(LibvirtFailure):
    """No domain matches the given name, UUID or id."""


class DomainNotRunning(LibvirtFailure):
    """The domain is defined but not running, so QEMU cannot be asked."""


class OperationDenied(LibvirtFailure):
    """libvirt refused the call: typically a read-only connection."""


class UnsupportedHypervisor(LibvirtFailure):
    """The call needs libvirt's QEMU driver (``qemu:///...``)."""


class OperationTimedOut(LibvirtFailure):
    """libvirt timed out, e.g. waiting on a QEMU that does not answer."""


class TooManyCallsStuck(LibvirtFailure):
    """The call was not sent: as many calls as this client allows itself are running, stuck.

    Each call still running holds one of libvirtd's worker threads
    (``max_workers``, 20 by default, shared by every client), so a collector
    bounds its own calls in flight and waits for one to return rather than
    take libvirtd's last workers from virsh and the other clients.
    """


class QMPFailure(BalloonStatsError):
    """A QMP exchange failed; ``sent`` and ``received`` are the raw texts."""

    def __init__(
        self,
        message: str,
        *,
        domain: Optional[str] = None,
        sent: Optional[str] = None,
        received: Optional[str] = None,
    ) -> None:
        super().__init__(message, domain=domain)
        self.sent = sent
        self.received = received


class CommandNotAllowed(QMPFailure):
    """The command is not on the allowlist, so it was never sent."""


class QMPExecuteError(QMPFailure):
    """QEMU executed the command and answered with an ``error`` member.

    :param error_class: QMP's ``error.class`` (e.g. ``DeviceNotFound``).
    :param desc: QMP's ``error.desc``.
    """

    def __init__(
        self,
        error_class: str,
        desc: str,
        *,
        domain: Optional[str] = None,
        sent: Optional[str] = None,
        received: Optional[str] = None,
    ) -> None:
        super().__init__(
            f"QEMU refused the command: {error_class}: {desc}",
            domain=domain,
            sent=sent,
            received=received,
        )
        self.error_class = error_class
        self.desc = desc


class QMPBadReply(QMPFailure):
    """The reply is not JSON, or has neither ``return`` nor ``error``."""


class InvalidDomainXML(BalloonStatsError):
    """libvirt's domain XML could not be parsed."""


class NoBalloonDevice(BalloonStatsError):
    """The domain has no balloon device (``<memballoon model='none'/>``)."""


class QOMPathNotFound(BalloonStatsError):
    """The balloon device could not be located in QEMU's QOM tree."""


class QEMUUnresponsive(BalloonStatsError):
    """QEMU did not answer within the deadline: hung, stopped, or very busy.

    Carried by ``unresponsive`` samples; the call itself is left running in
    a daemon thread, and the domain is not asked again until it returns.
    """


class HistoryError(BalloonStatsError):
    """The history file cannot be used: not a history, from a newer schema, held by another writer.

    :param path: The history file.
    :param holder_pid: The process that writes the file, when another one
        does (``None`` when it could not be told).
    :param schema_version: The schema version found in the file, when that
        is what is wrong with it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        holder_pid: Optional[int] = None,
        schema_version: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.holder_pid = holder_pid
        self.schema_version = schema_version

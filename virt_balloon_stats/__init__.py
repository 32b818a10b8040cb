"""virt_balloon_stats: QEMU virtio-balloon guest memory statistics through libvirt.

Reads the figures QEMU's balloon device collects from the guest
(``guest-stats``), controls how often it collects them
(``guest-stats-polling-interval``), and checks them against libvirt's own
``memoryStats()``. Start with :class:`BalloonStats`; for many domains, or
for a long-running reader, use :class:`Collector`.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time they load on first use
    from virt_balloon_stats.collector import Collector, Cycle, HostState, Problem
    from virt_balloon_stats.crosscheck import CrossCheck, Result, Verdict
    from virt_balloon_stats.domxml import BalloonDevice
    from virt_balloon_stats.facade import BalloonStats
    from virt_balloon_stats.formats import human_bytes
    from virt_balloon_stats.errors import (
        BalloonStatsError,
        CommandNotAllowed,
        ConnectionFailed,
        DomainNotFound,
        DomainNotRunning,
        InvalidArgument,
        InvalidDomainXML,
        LibvirtFailure,
        NoBalloonDevice,
        OperationDenied,
        OperationTimedOut,
        TooManyCallsStuck,
        QMPBadReply,
        QMPExecuteError,
        QMPFailure,
        QEMUUnresponsive,
        QOMPathNotFound,
        UnsupportedHypervisor,
    )
    from virt_balloon_stats.host import silence_libvirt_stderr
    from virt_balloon_stats.host import Guest, Host, default_uri
    from virt_balloon_stats.polling import PollingState
    from virt_balloon_stats.qompath import QOMPath
    from virt_balloon_stats.sample import SOURCES, Sample
    from virt_balloon_stats.stats import STATS, GuestStats, StatSpec, Status

__version__ = "0.1.0"

__all__ = [
    "BalloonStats",
    "Collector",
    "Cycle",
    "HostState",
    "Problem",
    "Sample",
    "SOURCES",
    "Status",
    "GuestStats",
    "StatSpec",
    "STATS",
    "PollingState",
    "QOMPath",
    "BalloonDevice",
    "CrossCheck",
    "Result",
    "Verdict",
    "Guest",
    "Host",
    "default_uri",
    "human_bytes",
    "silence_libvirt_stderr",
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
]

#: Where each public name lives. Importing the package loads none of them:
#: a command that needs two modules does not pay for the other ten.
_LAZY = {
    "BalloonStats": "virt_balloon_stats.facade",
    "Collector": "virt_balloon_stats.collector",
    "Cycle": "virt_balloon_stats.collector",
    "HostState": "virt_balloon_stats.collector",
    "Problem": "virt_balloon_stats.collector",
    "CrossCheck": "virt_balloon_stats.crosscheck",
    "Result": "virt_balloon_stats.crosscheck",
    "Verdict": "virt_balloon_stats.crosscheck",
    "BalloonDevice": "virt_balloon_stats.domxml",
    "human_bytes": "virt_balloon_stats.formats",
    "BalloonStatsError": "virt_balloon_stats.errors",
    "CommandNotAllowed": "virt_balloon_stats.errors",
    "ConnectionFailed": "virt_balloon_stats.errors",
    "DomainNotFound": "virt_balloon_stats.errors",
    "DomainNotRunning": "virt_balloon_stats.errors",
    "InvalidArgument": "virt_balloon_stats.errors",
    "InvalidDomainXML": "virt_balloon_stats.errors",
    "LibvirtFailure": "virt_balloon_stats.errors",
    "NoBalloonDevice": "virt_balloon_stats.errors",
    "OperationDenied": "virt_balloon_stats.errors",
    "OperationTimedOut": "virt_balloon_stats.errors",
    "TooManyCallsStuck": "virt_balloon_stats.errors",
    "QMPBadReply": "virt_balloon_stats.errors",
    "QMPExecuteError": "virt_balloon_stats.errors",
    "QMPFailure": "virt_balloon_stats.errors",
    "QEMUUnresponsive": "virt_balloon_stats.errors",
    "QOMPathNotFound": "virt_balloon_stats.errors",
    "UnsupportedHypervisor": "virt_balloon_stats.errors",
    "Guest": "virt_balloon_stats.host",
    "Host": "virt_balloon_stats.host",
    "default_uri": "virt_balloon_stats.host",
    "silence_libvirt_stderr": "virt_balloon_stats.host",
    "PollingState": "virt_balloon_stats.polling",
    "QOMPath": "virt_balloon_stats.qompath",
    "SOURCES": "virt_balloon_stats.sample",
    "Sample": "virt_balloon_stats.sample",
    "STATS": "virt_balloon_stats.stats",
    "GuestStats": "virt_balloon_stats.stats",
    "StatSpec": "virt_balloon_stats.stats",
    "Status": "virt_balloon_stats.stats",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

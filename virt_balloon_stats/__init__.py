"""virt_balloon_stats: QEMU virtio-balloon guest memory statistics through libvirt.

Reads the figures QEMU's balloon device collects from the guest
(``guest-stats``), controls how often it collects them
(``guest-stats-polling-interval``), and checks them against libvirt's own
``memoryStats()``. Start with :class:`BalloonStats`; for many domains, or
for a long-running reader, use :class:`Collector`.
"""

import logging

from virt_balloon_stats.client import BalloonStats
from virt_balloon_stats.collector import Collector, Cycle, HostState, Problem
from virt_balloon_stats.crosscheck import CrossCheck, Result, Verdict
from virt_balloon_stats.domxml import BalloonDevice
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
    QMPBadReply,
    QMPExecuteError,
    QMPFailure,
    QEMUUnresponsive,
    QOMPathNotFound,
    UnsupportedHypervisor,
)
from virt_balloon_stats.host import Guest, Host, default_uri, silence_libvirt_stderr
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
    "QMPFailure",
    "CommandNotAllowed",
    "QMPExecuteError",
    "QMPBadReply",
    "InvalidDomainXML",
    "NoBalloonDevice",
    "QOMPathNotFound",
    "QEMUUnresponsive",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

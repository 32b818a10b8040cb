"""A fake of the libvirt boundary, built from fixtures recorded on the testbed.

Only what libvirt itself would do is faked here: ``virDomain`` and
``virConnect`` objects and ``libvirt_qemu.qemuMonitorCommand``. Everything
above that (the package's Host, Guest, transport, QMP client...) is the real
code under test. Errors are real ``libvirt.libvirtError`` instances carrying
the code, error domain and message libvirt gave on the testbed, so
``get_error_code()`` and ``get_error_domain()`` behave as in production.

A recorded fixture (``tests/fixtures/recorded/<scenario>.json``) holds one
domain's identity, live and inactive XML, ``memoryStats()``, its
``getAllDomainStats(BALLOON)`` record, and every QMP command sent with the raw
reply QEMU gave, in the order they were sent.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import libvirt

from virt_balloon_stats.host import Guest
from virt_balloon_stats.transport import LibvirtQemuTransport

__all__ = [
    "libvirt_error",
    "error_from_record",
    "canonical",
    "FakeDomain",
    "FakeConnect",
    "RecordedTransport",
]

#: VIR_ERR_ERROR: every error in the recordings had this level.
_LEVEL_ERROR = 2


def libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    """A real ``libvirtError`` as libvirt-python builds it from virGetLastError()."""
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, _LEVEL_ERROR, None, None, None, 0, 0)
    # libvirtError takes its text from the thread's last libvirt error when
    # there is one; force the recorded text whatever an earlier test left.
    err.args = (message,)
    return err


def error_from_record(record: Mapping[str, Any]) -> libvirt.libvirtError:
    """The error of one ``libvirt-errors.json`` entry."""
    return libvirt_error(record["code"], record["domain"], record["message"])


def canonical(command: Mapping[str, Any]) -> str:
    """One text per command dict, whatever the key order, to match recordings."""
    return json.dumps(command, sort_keys=True, separators=(",", ":"))


class FakeDomain:
    """One ``virDomain`` replaying a recorded fixture.

    :param fixture: A recorded scenario.
    :param dom_id: Overrides the recorded id (e.g. to model a restart: same
        UUID, new id); ``-1`` is libvirt's id of a domain that is not running.
    :param raises: libvirt method name -> error it raises instead of answering.
    """

    def __init__(
        self,
        fixture: Mapping[str, Any],
        *,
        dom_id: Optional[int] = None,
        raises: Optional[Mapping[str, libvirt.libvirtError]] = None,
    ) -> None:
        self.fixture = fixture
        info = fixture["domain"]
        self._name: str = info["name"]
        self._uuid: str = info["uuid"]
        self._id: int = info["id"] if dom_id is None else dom_id
        self._state: Tuple[int, int] = (info["state"][0], info["state"][1])
        self._raises = dict(raises or {})
        self._lock = threading.Lock()
        #: Every call made, as (method name, positional arguments).
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []

    def _called(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((method, args))
        if method in self._raises:
            raise self._raises[method]

    def calls_to(self, method: str) -> List[Tuple[Any, ...]]:
        """The arguments of every call to ``method``, in order."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def ID(self) -> int:
        return self._id

    def isActive(self) -> int:
        self._called("isActive")
        return int(self._id >= 0)

    def state(self, flags: int = 0) -> List[int]:
        self._called("state", flags)
        return list(self._state)

    def XMLDesc(self, flags: int = 0) -> str:
        self._called("XMLDesc", flags)
        key = "xml_inactive" if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else "xml_live"
        return str(self.fixture[key])

    def memoryStats(self) -> Dict[str, int]:
        self._called("memoryStats")
        return dict(self.fixture["memory_stats"])

    def setMemoryStatsPeriod(self, period: int, flags: int = 0) -> int:
        self._called("setMemoryStatsPeriod", period, flags)
        return 0


class FakeConnect:
    """A ``virConnect`` to the QEMU driver holding the given domains.

    :param domains: The domains this "hypervisor" has.
    :param not_found: The recorded ``unknown-domain`` entry of
        ``libvirt-errors.json``: its code, error domain and message shape are
        reused for every failed look-up.
    :param busy: UUIDs of domains whose QEMU does not answer: with ``NOWAIT``
        domainListGetStats returns them without balloon figures (as seen on
        the testbed with a SIGSTOPped QEMU).
    """

    def __init__(
        self,
        domains: Iterable[FakeDomain],
        *,
        not_found: Mapping[str, Any],
        busy: Iterable[str] = (),
    ) -> None:
        self.domains = list(domains)
        self._not_found = not_found
        self._busy = set(busy)
        self.closed = False
        self._lock = threading.Lock()
        #: Every call made, as (method name, positional arguments).
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []

    def _called(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((method, args))

    def calls_to(self, method: str) -> List[Tuple[Any, ...]]:
        """The arguments of every call to ``method``, in order."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def _missing(self, kind: str, value: object) -> libvirt.libvirtError:
        # Same code and error domain as recorded; the message names what was
        # asked, as libvirt's does ("no domain with matching name 'X'").
        message = re.sub(r"matching name '.*'", f"matching {kind} '{value}'", self._not_found["message"])
        return libvirt_error(self._not_found["code"], self._not_found["domain"], message)

    def lookupByName(self, name: str) -> FakeDomain:
        self._called("lookupByName", name)
        for dom in self.domains:
            if dom.name() == name:
                return dom
        raise self._missing("name", name)

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        self._called("lookupByUUIDString", uuid)
        for dom in self.domains:
            if dom.UUIDString() == uuid.lower():
                return dom
        raise self._missing("uuid", uuid)

    def lookupByID(self, dom_id: int) -> FakeDomain:
        self._called("lookupByID", dom_id)
        for dom in self.domains:
            if dom.ID() == dom_id and dom_id >= 0:
                return dom
        raise self._missing("id", dom_id)

    def listAllDomains(self, flags: int = 0) -> List[FakeDomain]:
        self._called("listAllDomains", flags)
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
            return [d for d in self.domains if d.ID() >= 0]
        return list(self.domains)

    def domainListGetStats(
        self, doms: Sequence[FakeDomain], stats: int = 0, flags: int = 0
    ) -> List[Tuple[FakeDomain, Dict[str, Any]]]:
        self._called("domainListGetStats", list(doms), stats, flags)
        out = []
        for dom in doms:
            record: Dict[str, Any] = {}
            if stats & libvirt.VIR_DOMAIN_STATS_BALLOON:
                record.update(dom.fixture["all_domain_stats"])
                if dom.UUIDString() in self._busy:
                    if not flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT:
                        raise AssertionError("a busy domain without NOWAIT would block libvirt for 30 s")
                    record = {}
            if stats & libvirt.VIR_DOMAIN_STATS_STATE:
                # libvirt reads the state from its own definition, without a
                # job on QEMU: a busy domain still has it.
                record["state.state"], record["state.reason"] = dom._state
            out.append((dom, record))
        return out

    def getType(self) -> str:
        self._called("getType")
        return "QEMU"

    def close(self) -> int:
        self._called("close")
        self.closed = True
        return 0


class RecordedTransport:
    """The package's Transport, answering with QEMU's recorded replies.

    It stands in for ``libvirt_qemu.qemuMonitorCommand`` only: the real
    :class:`~virt_balloon_stats.transport.LibvirtQemuTransport` wraps it, so
    RPC counting and libvirt error translation are the package's own.

    Each command is answered with the reply recorded for an equal command dict
    (key order does not matter). When the same command was recorded several
    times (e.g. the polling interval read before and after a ``qom-set``), the
    replies are given in recorded order and the last one is repeated after
    that, as a QEMU left in its final state would. A command that was never
    recorded fails the test: a unit test must not guess QEMU's answer.

    :param fixtures: Recorded scenarios; replies are looked up by domain UUID.
    :param raises: Command dicts for which qemuMonitorCommand raises this
        ``libvirtError`` instead (whatever the domain).
    """

    def __init__(
        self,
        *fixtures: Mapping[str, Any],
        raises: Sequence[Tuple[Mapping[str, Any], libvirt.libvirtError]] = (),
    ) -> None:
        self._replies: Dict[str, Dict[str, Deque[str]]] = {}
        for fixture in fixtures:
            table = self._replies.setdefault(fixture["domain"]["uuid"], {})
            for exchange in fixture["qmp"]:
                replies = table.setdefault(canonical(exchange["command"]), collections.deque())
                replies.append(exchange["reply"])
        self._raises = {canonical(cmd): err for cmd, err in raises}
        self._lock = threading.Lock()
        self._real = LibvirtQemuTransport(self.qemuMonitorCommand)
        #: Every command that reached "libvirt": domain name, raw text, flags.
        self.sent: List[Dict[str, Any]] = []

    def monitor_command(self, guest: Guest, command: str) -> str:
        """The Transport protocol's one method."""
        return self._real.monitor_command(guest, command)

    def qemuMonitorCommand(self, dom: FakeDomain, command: str, flags: int) -> str:
        """The fake of ``libvirt_qemu.qemuMonitorCommand(dom, cmd, flags)``."""
        parsed = json.loads(command)
        key = canonical(parsed)
        with self._lock:
            self.sent.append({"domain": dom.name(), "command": parsed, "raw": command, "flags": flags})
            if key in self._raises:
                raise self._raises[key]
            replies = self._replies.get(dom.UUIDString(), {}).get(key)
            if not replies:
                raise AssertionError(f"{dom.name()}: no recorded reply for {key}")
            return replies.popleft() if len(replies) > 1 else replies[0]

    def commands(self, execute: Optional[str] = None) -> List[Dict[str, Any]]:
        """The command dicts sent so far, optionally only those of one ``execute``."""
        with self._lock:
            return [s["command"] for s in self.sent if execute is None or s["command"]["execute"] == execute]

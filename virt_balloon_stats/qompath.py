"""Find a domain's balloon device in QEMU's QOM tree, the way libvirt does.

libvirt knows the balloon's QOM type from the device model and address
(:func:`expected_qom_type`), then looks for an object of that type: first at
``/machine/peripheral/<alias>`` (devices created with ``-device ...,id=ALIAS``
live there), then anywhere in the tree. We do the same and say which route
found it, and we confirm the object really is a balloon with a stats timer
(it has the ``guest-stats-polling-interval`` property) before trusting it.

The search is bounded (:data:`MAX_LIST_CALLS` ``qom-list`` calls at most)
because the tree of a large guest has thousands of nodes and every call is
a monitor round trip. Results are cached per domain UUID and id: the QOM
path can only change when QEMU restarts, and a restart changes the id.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Deque, Dict, Iterable, List, Optional, Tuple

from virt_balloon_stats.domxml import BalloonDevice
from virt_balloon_stats.errors import NoBalloonDevice, QMPExecuteError, QOMPathNotFound
from virt_balloon_stats.host import Guest
from virt_balloon_stats.qmp import POLLING_PROPERTY
from virt_balloon_stats.transport import QMPClient

__all__ = ["MAX_LIST_CALLS", "QOMPath", "expected_qom_type", "by_alias", "resolve", "QOMPathCache"]

#: Upper bound on ``qom-list`` calls spent searching the tree for one domain.
MAX_LIST_CALLS = 64

_PCI_TYPES = {
    "virtio": "virtio-balloon-pci",
    "virtio-transitional": "virtio-balloon-pci-transitional",
    "virtio-non-transitional": "virtio-balloon-pci-non-transitional",
}

# Searched first, in this order, when the alias route fails: where QEMU puts
# devices with an id, and where it puts those without (QEMU's own doc shows
# /machine/peripheral-anon/device[1]).
_SEARCH_ROOTS = ("/machine/peripheral", "/machine/peripheral-anon", "/machine")


@dataclasses.dataclass(frozen=True)
class QOMPath:
    """Where the balloon lives in QOM, and how we know.

    :ivar path: e.g. ``/machine/peripheral/balloon0``.
    :ivar qom_type: e.g. ``virtio-balloon-pci``.
    :ivar method: ``alias`` (found at ``/machine/peripheral/<alias>``) or
        ``search`` (found by walking the tree).
    :ivar detail: One sentence for people.
    """

    path: str
    qom_type: str
    method: str
    detail: str


def expected_qom_type(device: BalloonDevice) -> str:
    """The QOM type QEMU gives this balloon, as libvirt derives it.

    :raise NoBalloonDevice: When the domain has no balloon.
    :raise QOMPathNotFound: When the model/address pair is not one QEMU's
        virtio balloon takes (e.g. ``xen``).
    """
    if not device.present:
        raise NoBalloonDevice(f"the domain has no balloon device (model {device.model!r})")
    if device.model not in _PCI_TYPES:  # e.g. xen: no QEMU virtio balloon at all
        raise QOMPathNotFound(f"model {device.model!r} is not a QEMU virtio balloon")
    if device.address_type == "ccw":
        return "virtio-balloon-ccw"
    if device.address_type == "virtio-mmio":
        return "virtio-balloon-device"
    if device.address_type in (None, "pci"):
        return _PCI_TYPES[device.model]
    raise QOMPathNotFound(
        f"no QEMU virtio balloon type for model {device.model!r} on address {device.address_type!r}"
    )


def by_alias(device: BalloonDevice) -> Optional[QOMPath]:
    """Where a balloon with an alias lives, unconfirmed: ``/machine/peripheral/<alias>``.

    A reading's first ``qom-get`` on it confirms it (only a balloon has the
    stats properties), which saves :func:`resolve`'s two ``qom-list`` calls;
    if QEMU says no, the caller resolves the path properly.

    :raise NoBalloonDevice: When the domain has no balloon.
    :raise QOMPathNotFound: When the model is not a QEMU virtio balloon.
    """
    qom_type = expected_qom_type(device)
    if not device.alias:
        return None
    path = f"/machine/peripheral/{device.alias}"
    return QOMPath(path, qom_type, "alias", f"{path} answered the stats properties of a balloon")


def _children_of_type(entries: List[Dict[str, str]], qom_type: str) -> List[str]:
    wanted = f"child<{qom_type}>"
    return [e["name"] for e in entries if e["type"] == wanted]


def _is_balloon(qmp: QMPClient, guest: Guest, path: str) -> bool:
    props = qmp.qom_list(guest, path)
    return any(p["name"] == POLLING_PROPERTY for p in props)


def _search(qmp: QMPClient, guest: Guest, qom_type: str) -> Optional[str]:
    """Breadth-first walk of ``child<...>`` links, bounded in calls."""
    seen = set()
    queue: Deque[str] = collections.deque(_SEARCH_ROOTS)
    calls = 0
    while queue and calls < MAX_LIST_CALLS:
        path = queue.popleft()
        if path in seen:
            continue
        seen.add(path)
        calls += 1
        try:
            entries = qmp.qom_list(guest, path)
        except QMPExecuteError:
            continue  # e.g. no /machine/peripheral-anon when every device has an id
        for name in _children_of_type(entries, qom_type):
            return f"{path}/{name}"
        queue.extend(f"{path}/{e['name']}" for e in entries if e["type"].startswith("child<"))
    return None


def resolve(qmp: QMPClient, guest: Guest, device: BalloonDevice) -> QOMPath:
    """Locate the balloon of a running domain.

    :raise NoBalloonDevice: When the domain has no balloon.
    :raise QOMPathNotFound: When no object of the expected type with a stats
        timer is found within the search bound.
    """
    qom_type = expected_qom_type(device)
    if device.alias:
        try:
            entries = qmp.qom_list(guest, "/machine/peripheral")
        except QMPExecuteError:
            entries = []
        if device.alias in _children_of_type(entries, qom_type):
            path = f"/machine/peripheral/{device.alias}"
            if _is_balloon(qmp, guest, path):
                return QOMPath(
                    path,
                    qom_type,
                    "alias",
                    f"/machine/peripheral lists {device.alias!r} as child<{qom_type}>, "
                    f"and it has {POLLING_PROPERTY}",
                )
    found = _search(qmp, guest, qom_type)
    if found is not None and _is_balloon(qmp, guest, found):
        return QOMPath(
            found,
            qom_type,
            "search",
            f"found child<{qom_type}> by searching the QOM tree "
            f"(alias {device.alias!r} did not lead to it)",
        )
    raise QOMPathNotFound(
        f"no {qom_type} with {POLLING_PROPERTY} found in QOM (alias {device.alias!r}, "
        f"searched up to {MAX_LIST_CALLS} nodes)",
        domain=guest.name,
    )


class QOMPathCache:
    """Thread-safe cache of resolved paths, keyed by (UUID, id).

    Two threads may resolve the same domain at once; both get a right
    answer and one wins the store, which costs a few calls but never a lock
    held across a monitor round trip.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: Dict[Tuple[str, Optional[int]], QOMPath] = {}

    def get(self, guest: Guest) -> Optional[QOMPath]:
        """The cached path of this incarnation of the domain, if any."""
        with self._lock:
            return self._paths.get(guest.cache_key)

    def put(self, guest: Guest, path: QOMPath) -> None:
        """Remember ``path``; drops entries of earlier incarnations of the domain."""
        with self._lock:
            for key in [k for k in self._paths if k[0] == guest.uuid]:
                del self._paths[key]
            self._paths[guest.cache_key] = path

    def forget(self, guest: Guest) -> None:
        """Drop the domain's entry (e.g. after QEMU said the path is gone)."""
        with self._lock:
            for key in [k for k in self._paths if k[0] == guest.uuid]:
                del self._paths[key]

    def retain(self, guests: Iterable[Guest]) -> None:
        """Keep only the entries of these domains (the ones still running).

        A long-running collector calls this each cycle so that domains which
        went away do not accumulate.
        """
        keep = {g.cache_key for g in guests}
        with self._lock:
            for key in [k for k in self._paths if k not in keep]:
                del self._paths[key]

    def resolve(self, qmp: QMPClient, guest: Guest, device: BalloonDevice) -> QOMPath:
        """Return the cached path, or resolve and cache it."""
        cached = self.get(guest)
        if cached is not None:
            return cached
        path = resolve(qmp, guest, device)
        self.put(guest, path)
        return path

"""The guest-stats polling interval: validation, and what a change did.

QEMU asks the guest for fresh figures every ``guest-stats-polling-interval``
seconds; 0 turns the timer off. libvirt keeps its own copy in the domain XML
(``<memballoon><stats period='N'/>``) and sets QEMU's value from it at start
and on ``setMemoryStatsPeriod``. Setting QEMU's value with ``qom-set``
directly works too, but libvirt's XML then tells a stale story: we call that
*drift* and report it.

Two upper bounds: QEMU refuses more than 2^32-1 ("timer value is too big"),
and libvirt's API takes a C ``int``, so the libvirt route stops at 2^31-1.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional

from virt_balloon_stats.errors import InvalidArgument, short_repr

__all__ = ["ROUTES", "MAX_QEMU_INTERVAL", "MAX_LIBVIRT_PERIOD", "validate_interval", "PollingState"]

#: How a new interval reaches QEMU: ``libvirt`` (``setMemoryStatsPeriod``,
#: keeps libvirt's XML true; the default) or ``qmp`` (``qom-set``).
ROUTES = ("libvirt", "qmp")

MAX_QEMU_INTERVAL = 2**32 - 1
MAX_LIBVIRT_PERIOD = 2**31 - 1


def validate_interval(value: Any, *, via: str = "libvirt") -> int:
    """Accept an interval in whole seconds, or refuse it before anything is sent.

    Strings of digits are accepted (they come from a command line); bools,
    floats, negative numbers and anything else are not.

    :raise InvalidArgument: When ``value`` or ``via`` is not acceptable.
    """
    if via not in ROUTES:
        raise InvalidArgument(f"unknown route {via!r}; use one of: {', '.join(ROUTES)}")
    limit = MAX_LIBVIRT_PERIOD if via == "libvirt" else MAX_QEMU_INTERVAL
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        digits = value.strip()
        sign, number = ("-", digits[1:]) if digits.startswith("-") else ("", digits)
        number = number.lstrip("0") or "0"
        if len(number) > 20:  # far out of range (and int() refuses over 4300 digits)
            raise InvalidArgument(
                f"polling interval must be between 0 and {limit} seconds via {via}, not "
                f"{sign}{number[:20]}... ({len(number)} digits); 0 disables polling"
            )
        value = int(sign + number)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"polling interval must be a whole number of seconds, not {short_repr(value)}; "
            "0 disables polling"
        )
    if value < 0 or value > limit:
        raise InvalidArgument(
            f"polling interval must be between 0 and {limit} seconds via {via}, not {short_repr(value)}; "
            "0 disables polling"
        )
    return value


@dataclasses.dataclass(frozen=True)
class PollingState:
    """QEMU's live interval next to libvirt's idea of it.

    :ivar qemu_interval: ``qom-get guest-stats-polling-interval``, seconds;
        ``None`` when QEMU was not asked (libvirt-only source).
    :ivar libvirt_period: ``<stats period>`` from libvirt's live XML;
        ``None`` when the element is absent (libvirt never set it: 0).
    :ivar changed_from: The QEMU value before a set, when this is a result of one.
    """

    qemu_interval: Optional[int]
    libvirt_period: Optional[int]
    changed_from: Optional[int] = None

    @property
    def drift(self) -> bool:
        """Whether libvirt's XML disagrees with QEMU's live value."""
        if self.qemu_interval is None:
            return False
        return (self.libvirt_period or 0) != self.qemu_interval

    def describe(self) -> str:
        """One line for people."""
        if self.qemu_interval is None:
            return f"libvirt period {self.libvirt_period or 0} s (QEMU not asked)"
        text = f"QEMU polls every {self.qemu_interval} s" if self.qemu_interval else "QEMU polling disabled"
        if self.drift:
            text += (
                f"; drift: libvirt's XML says {self.libvirt_period or 0} s "
                "(the interval was set behind libvirt's back; set it via libvirt to re-align)"
            )
        return text

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "polling_interval": self.qemu_interval,
            "libvirt_period": self.libvirt_period,
            "drift": self.drift,
            "changed_from": self.changed_from,
            "message": self.describe(),
        }

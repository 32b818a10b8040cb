"""virt_balloon_stats.polling: validating a new interval, and QEMU's value beside libvirt's.

Bounds: QEMU refuses more than 2^32-1 ("timer value is too big"); libvirt's
setMemoryStatsPeriod takes a C int, so 2^31-1 on that route.
"""

from __future__ import annotations

import pytest

from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.polling import (
    MAX_LIBVIRT_PERIOD,
    MAX_QEMU_INTERVAL,
    ROUTES,
    PollingState,
    validate_interval,
)


def test_bounds():
    """The two limits, as documented."""
    assert MAX_QEMU_INTERVAL == 2**32 - 1
    assert MAX_LIBVIRT_PERIOD == 2**31 - 1
    assert ROUTES == ("libvirt", "qmp")


@pytest.mark.parametrize(
    "value, via, expected",
    [
        (0, "libvirt", 0),
        (0, "qmp", 0),
        (2, "libvirt", 2),
        (2**31 - 1, "libvirt", 2**31 - 1),
        (2**31, "qmp", 2**31),
        (2**32 - 1, "qmp", 2**32 - 1),
        ("0", "libvirt", 0),
        ("10", "qmp", 10),
        (" 10 ", "libvirt", 10),
        ("2147483647", "libvirt", 2**31 - 1),
        ("4294967295", "qmp", 2**32 - 1),
    ],
)
def test_accepted(value, via, expected):
    """Whole seconds in range, as ints or digit strings (from a command line)."""
    result = validate_interval(value, via=via)
    assert result == expected
    assert type(result) is int


def test_default_route_is_libvirt():
    """Without ``via`` the libvirt bound applies."""
    assert validate_interval(2**31 - 1) == 2**31 - 1
    with pytest.raises(InvalidArgument):
        validate_interval(2**31)


@pytest.mark.parametrize(
    "value",
    [True, False, 2.0, 2.5, None, [2], "two", "", "1.5", "0x10", "1e3", "²", "١٢", "5s"],
    ids=repr,
)
@pytest.mark.parametrize("via", ROUTES)
def test_refused_not_a_whole_number(value, via):
    """bools, floats and other strings are refused with a message that says what is wanted.

    ``²`` and ``١٢`` pass str.isdigit() but are not what a user means by seconds;
    they must be refused as InvalidArgument, never crash with ValueError.
    """
    with pytest.raises(InvalidArgument) as info:
        validate_interval(value, via=via)
    assert "whole number of seconds" in str(info.value)
    assert "0 disables polling" in str(info.value)


@pytest.mark.parametrize(
    "value, via, limit",
    [
        (-1, "libvirt", MAX_LIBVIRT_PERIOD),
        (-1, "qmp", MAX_QEMU_INTERVAL),
        ("-1", "libvirt", MAX_LIBVIRT_PERIOD),  # a command-line word: negative, not malformed
        (2**31, "libvirt", MAX_LIBVIRT_PERIOD),
        (2**32, "qmp", MAX_QEMU_INTERVAL),
        ("2147483648", "libvirt", MAX_LIBVIRT_PERIOD),
        ("4294967296", "qmp", MAX_QEMU_INTERVAL),
        (10**30, "qmp", MAX_QEMU_INTERVAL),
    ],
)
def test_refused_out_of_range_says_the_range(value, via, limit):
    """Negative or too big: the message gives the route's range."""
    with pytest.raises(InvalidArgument) as info:
        validate_interval(value, via=via)
    assert f"between 0 and {limit} seconds via {via}" in str(info.value)


@pytest.mark.parametrize("via", ["", "virsh", "QMP", None])
def test_refused_unknown_route(via):
    """Only libvirt and qmp; the message lists them."""
    with pytest.raises(InvalidArgument) as info:
        validate_interval(2, via=via)
    assert "libvirt, qmp" in str(info.value)


@pytest.mark.parametrize(
    "qemu, libvirt, drift",
    [
        (2, 2, False),
        (0, None, False),
        (0, 0, False),
        (3, 2, True),
        (0, 2, True),
        (2, None, True),
        (None, 2, False),
        (None, None, False),
    ],
)
def test_drift(qemu, libvirt, drift):
    """Drift: QEMU's live value differs from libvirt's XML (no <stats> means 0). Unknown QEMU: no drift."""
    assert PollingState(qemu, libvirt).drift is drift


@pytest.mark.parametrize(
    "state, words",
    [
        (PollingState(2, 2), ["QEMU polls every 2 s"]),
        (PollingState(0, None), ["QEMU polling disabled"]),
        (PollingState(3, 2), ["QEMU polls every 3 s", "drift", "libvirt's XML says 2 s", "via libvirt"]),
        (PollingState(None, 5), ["libvirt period 5 s", "QEMU not asked"]),
        (PollingState(None, None), ["libvirt period 0 s"]),
    ],
)
def test_describe(state, words):
    """One line for people; drift explains how to re-align."""
    text = state.describe()
    assert "\n" not in text
    for word in words:
        assert word in text
    if not state.drift:
        assert "drift" not in text


def test_to_dict():
    """JSON form carries both values, drift, the previous value and the message."""
    state = PollingState(0, 2, changed_from=2)
    assert state.to_dict() == {
        "polling_interval": 0,
        "libvirt_period": 2,
        "drift": True,
        "changed_from": 2,
        "message": state.describe(),
    }

"""What a test needs but cannot find: a failure under ``CI=true``, a skip elsewhere.

CI runs ``contrib/run-tests``, which installs and starts everything the tests
use, so under CI a missing tool or an unreachable testbed is a failure; on a
developer's machine it is a skip that says how to get it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as CI systems set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Fail the test under CI, else skip it, saying ``reason``."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)

"""Polling until something holds, for what no event announces (a file's effect, a pushed certificate)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    """Poll `condition` every 20 ms until it holds; fail the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {seconds}s")
        time.sleep(0.02)

"""Coroutines run on the loop a server process runs on (uvloop), for code the tests drive in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from synctoken_server.process.running import new_event_loop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on the server's loop: what runs in `synctoken serve` is what the test sees."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

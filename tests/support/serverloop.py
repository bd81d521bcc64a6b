"""Coroutines run on the loop a server process runs on (uvloop), for code the tests drive in-process."""

from __future__ import annotations

from synctoken_server.process.running import run_on_server_loop as run

__all__ = ["run"]
"""run(main): asyncio.run, on the server's loop: what runs in `synctoken serve` is what the test sees."""

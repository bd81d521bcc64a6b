"""A short window that holds the request path's Redis writes under load, so that one write carries several checks.

Why: each limit check written alone costs a write through the kernel's TCP
stack, a wake-up of Redis, and a read and wake-up for its reply, on both
sides; at 16 calls in flight on the benchmark's loopback that was most of the
check's cost to synctoken (about 90 µs of CPU per call, and about 60 µs of
Redis's), while the script itself is a few µs. Checks rarely overlap on their
own (a reply is back long before the next call reaches its check), so
nothing is ever batched unless someone waits: a check that opens the window
is written with whatever other checks arrive within it, in one write, and
Redis reads them in one read and answers them in one write.

Who waits, and for how long: at most the window (whole milliseconds: uvloop's
timers count no finer), and only while waiting pays. A window that closes
with one check in it (nobody came, as with a caller that sends one call at a
time) is lonely; after LONELY_LIMIT lonely windows in a row, checks are
written at once, and only every PROBE_EVERY-th one opens a window, to notice
when company comes back. Order is kept: a write while a window is open joins
it, whatever it is; one that may not wait closes the window at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LONELY_LIMIT = 8
"""Lonely windows in a row before checks stop waiting: under load most windows have company (about 2.3
checks each at 16 in flight), so eight lonely ones in a row mean nobody is coming."""
PROBE_EVERY = 128
"""While checks do not wait, one in this many still opens a window: under 1% of a lone caller's calls wait."""


class WriteBatcher:
    """Writes bytes to a transport at once, or holds them for a window that other writes join."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float, write: Callable[[bytes], None]) -> None:
        """`window_s` 0 writes everything at once; `write` is the transport's."""
        self._loop = loop
        self._window = window_s
        self._write = write
        self._held: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._lonely = 0
        self._since_probe = 0

    def write(self, data: bytes, *, may_wait: bool) -> None:
        """Write `data`, or hold it until the window closes; `may_wait` says whether its caller can afford to."""
        if self._held:
            self._held.append(data)
            if not may_wait:
                # Order keeps it behind what is held, but it cannot afford the window (a NOSCRIPT retry with
                # its deadline near): held, it could be unanswered at its deadline, and the connection, which
                # answered all it was sent, be closed as stalled. Written now, with what it joined.
                self.flush()
        elif may_wait and self._window and self._pays():
            self._held.append(data)
            self._timer = self._loop.call_later(self._window, self.flush)
        else:
            self._write(data)

    def fits(self, time_left: float) -> bool:
        """Whether a request with `time_left` seconds until its deadline may wait for a window.

        The window must close well before the deadline: a request still held at
        its deadline would make the connection look stalled (no reply since it
        was "written"), and be closed for it.
        """
        return time_left > 2 * self._window

    def flush(self) -> None:
        """Write what the window holds, in one write, and learn whether it had company."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        if not held:
            return
        self._lonely = self._lonely + 1 if len(held) == 1 else 0
        self._write(held[0] if len(held) == 1 else b"".join(held))

    def drop(self) -> None:
        """Forget what is held (the connection is gone: its requests fail with it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = []

    @property
    def waits(self) -> bool:
        """Whether a check would open a window now, without counting towards the next probe."""
        return bool(self._window) and self._lonely < LONELY_LIMIT

    def _pays(self) -> bool:
        if self._lonely < LONELY_LIMIT:
            return True
        self._since_probe += 1
        if self._since_probe < PROBE_EVERY:
            return False
        self._since_probe = 0
        return True

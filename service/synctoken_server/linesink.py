"""Where log lines go: whole lines or an error, never a stalled server, one writer at a time.

The audit log's fail-closed rule depends on knowing that every byte of a
record, newline included, reached the output. A pipe whose reader stopped
reading must not freeze the event loop (health checks and signals run there),
so a pipe is written without blocking, waiting at most WRITE_BUDGET_SECONDS
for room; once a write has failed, later ones do not wait at all until one
succeeds again. Workers sharing one output take a shared lock per line, so
their lines never interleave, whatever their length.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

WRITE_BUDGET_SECONDS = 1.0
"""The longest one line may wait for room (or for another process's line) while the output is healthy."""


class Lock(Protocol):
    """threading.Lock or a multiprocessing lock: all a sink needs of one."""

    def acquire(self, block: bool = ..., timeout: float = ...) -> bool: ...  # noqa: D102, FBT001 - the stdlib's signature
    def release(self) -> None: ...  # noqa: D102


class OutputStalled(BlockingIOError):
    """The output took no bytes (or the lock was held elsewhere) for the whole budget."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "log output stalled")


class LineSink:
    """Writes whole lines to one output, shared by every logger (and, with a shared lock, every process) there.

    A write that fails part-way leaves a torn line behind; the next line then
    starts with a newline of its own, so the fragment never merges with it.
    `writable` says whether the last write worked.
    """

    def __init__(self, write: Callable[[bytes], int], fd: int | None = None, lock: Lock | None = None) -> None:
        self._write = write
        self._fd = fd
        self.lock: Lock = lock or threading.Lock()
        self._torn = False
        self.writable = True

    @classmethod
    def for_fd(cls, fd: int) -> LineSink:
        """A sink on a file descriptor, written with os.write; pipes and sockets are made non-blocking."""
        if not stat.S_ISREG(os.fstat(fd).st_mode) and not os.isatty(fd):
            # A terminal stays blocking: switching it would also switch the
            # shell that shares it, and a paused terminal is a person's choice.
            os.set_blocking(fd, False)
        return cls(lambda data: os.write(fd, data), fd)

    def write_line(self, line: bytes) -> None:
        """Write `line` and a newline; raise OSError unless every byte was written."""
        budget = WRITE_BUDGET_SECONDS if self.writable else 0.0
        deadline = time.monotonic() + budget
        if not self.lock.acquire(True, budget):  # noqa: FBT003 - both lock kinds take it positionally
            self.writable = False
            raise OutputStalled
        try:
            self._write_all(b"\n" + line + b"\n" if self._torn else line + b"\n", deadline)
        except BaseException:
            self.writable = False
            raise
        finally:
            self.lock.release()
        self.writable = True

    def _write_all(self, data: bytes, deadline: float) -> None:
        written = 0
        try:
            while written < len(data):
                try:
                    written += self._write(data[written:])
                except BlockingIOError:
                    self._wait_for_room(deadline)
        except BaseException:
            self._torn = self._torn or written > 0
            raise
        self._torn = False

    def _wait_for_room(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if self._fd is None or remaining <= 0:
            raise OutputStalled
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        if not poller.poll(remaining * 1000):
            raise OutputStalled

    def check(self) -> bool:
        """Whether the output can be written, found without writing: a pipe nobody reads, a full disk."""
        if not self.writable or self._fd is None:
            return self.writable
        try:
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
                if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                    self.writable = False
            elif stat.S_ISREG(mode) and os.fstatvfs(self._fd).f_bfree == 0:
                self.writable = False
        except OSError:
            self.writable = False
        return self.writable

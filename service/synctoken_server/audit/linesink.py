"""Where log lines go: whole lines or an error, never a stalled server, one writer at a time.

The audit log's fail-closed rule depends on knowing that every byte of a
record, newline included, reached the output. A pipe whose reader stopped
reading must not freeze the event loop (health checks and signals run there),
so a pipe is written without blocking, waiting at most WRITE_BUDGET_SECONDS
for room; once a write has failed, later ones do not wait at all until one
succeeds again. Workers sharing one output take a shared lock per line, and
share whether the last line was torn, so their lines never interleave or merge.
"""

from __future__ import annotations

import os
import resource
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

WRITE_BUDGET_SECONDS = 1.0
"""The longest one line may wait for room (or for another process's line) while the output is healthy."""

MIN_ROOM_BYTES = 64 * 1024
"""Less room than this left in the log's file system or file size limit counts as full: health goes
NOT_SERVING before a record is cut, not after, and a short probe line cannot make it flap back."""


class Lock(Protocol):
    """threading.Lock or a multiprocessing lock: all a sink needs of one."""

    def acquire(self, block: bool = ..., timeout: float = ...) -> bool: ...  # noqa: D102, FBT001 - the stdlib's signature
    def release(self) -> None: ...  # noqa: D102


class Flag(Protocol):
    """A shared integer cell (multiprocessing.Value) or a local stand-in."""

    value: int


class _LocalFlag:
    def __init__(self) -> None:
        self.value = 0


class OutputStalled(BlockingIOError):
    """The output took no bytes (or the lock was held elsewhere) for the whole budget."""

    def __init__(self) -> None:
        super().__init__(11, "log output stalled")  # EAGAIN


def nonblocking_unless_terminal(fd: int) -> None:
    """Make a pipe or socket non-blocking; leave files (never blocking anyway) and terminals alone.

    A terminal stays blocking: switching it would also switch the shell that
    shares it, and a paused terminal is a person's choice.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode) and not os.isatty(fd):
        os.set_blocking(fd, False)


class LineSink:
    """Writes whole lines to one output, shared by every logger (and, with a shared lock, every process) there.

    A write that fails part-way leaves a torn line behind; the next line, from
    whichever process, then starts with a newline of its own, so the fragment
    never merges with it. `writable` says whether the last write worked.
    """

    def __init__(self, write: Callable[[bytes], int], fd: int | None = None) -> None:
        self._write = write
        self._fd = fd
        self.lock: Lock = threading.Lock()
        self.torn: Flag = _LocalFlag()
        self.writable = True
        self._full_since: float | None = None

    @classmethod
    def for_fd(cls, fd: int) -> LineSink:
        """A sink on a file descriptor, written with os.write; pipes and sockets are made non-blocking."""
        nonblocking_unless_terminal(fd)
        return cls(lambda data: os.write(fd, data), fd)

    def share(self, lock: Lock, torn: Flag) -> None:
        """Take `lock` around every line and keep the torn state in `torn`: for processes sharing one output."""
        self.lock = lock
        self.torn = torn

    def write_line(self, line: bytes) -> None:
        """Write `line` and a newline; raise OSError unless every byte was written."""
        budget = WRITE_BUDGET_SECONDS if self.writable else 0.0
        deadline = time.monotonic() + budget
        if not self.lock.acquire(True, budget):  # noqa: FBT003 - both lock kinds take it positionally
            self.writable = False
            raise OutputStalled
        try:
            self._write_all(b"\n" + line + b"\n" if self.torn.value else line + b"\n", deadline)
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
            if written > 0:
                self.torn.value = 1
            raise
        self.torn.value = 0

    def _wait_for_room(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if self._fd is None or remaining <= 0:
            raise OutputStalled
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        if not poller.poll(remaining * 1000):
            raise OutputStalled

    def check(self) -> bool:
        """Whether the output looks able to take a record, found without writing (`writable` is the last write's word).

        Not when: a pipe nobody reads, or one that has had no room for longer
        than the write budget; a file system or file size limit with less than
        MIN_ROOM_BYTES left.
        """
        if self._fd is None:
            return True
        try:
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                return self._pipe_ok()
            if stat.S_ISREG(mode):
                return self._room() >= MIN_ROOM_BYTES
        except OSError:
            return False
        return True

    def _pipe_ok(self) -> bool:
        assert self._fd is not None  # noqa: S101 - check() only asks with a descriptor
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        events = 0
        for _, happened in poller.poll(0):
            events |= happened
        if events & (select.POLLERR | select.POLLHUP):
            return False
        if events & select.POLLOUT:
            self._full_since = None
            return True
        now = time.monotonic()
        self._full_since = self._full_since or now
        return now - self._full_since < WRITE_BUDGET_SECONDS

    def _room(self) -> int:
        assert self._fd is not None  # noqa: S101 - check() only asks with a descriptor
        fs = os.fstatvfs(self._fd)
        # Blocks reserved for root count only for root.
        free_blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
        room = free_blocks * fs.f_frsize
        size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if size_limit != resource.RLIM_INFINITY:
            room = min(room, size_limit - os.fstat(self._fd).st_size)
        return room

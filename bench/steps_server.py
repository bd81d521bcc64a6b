"""synctoken's server with each stage of IssueToken timed: `python -m bench.steps_server serve --config ...`.

Wrappers are installed by attribute name before `synctoken_server.cli.main`
runs, each taking `*args, **kwargs`, so a changed signature does not break
them, and a stage whose name is gone is skipped and reported as missing:
the code measured here changes while the benchmark is used to judge it.
Functions are patched where they are looked up (`issuing.decide`, not
`policy.decide`): a module that imported the name keeps the original.

A wrapper adds its call's wall time (`perf_counter_ns`) to its stage, and to
the stage it was called within (its caller, as measured: nesting is not
assumed), so each stage's own time is its total less its timed callees.
A daemon thread writes the cumulative counters as JSON to the file named by
$SYNCTOKEN_BENCH_STEPS_FILE every 0.25 s, and once more at exit.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synctoken_server import cli

STEPS_FILE_ENV = "SYNCTOKEN_BENCH_STEPS_FILE"
WRITE_EVERY_S = 0.25


@dataclass(frozen=True)
class Stage:
    """One timed stage: where its name is looked up, and what it is."""

    module: str
    attribute: str
    """A function's name, or "Class.method"."""
    what: str


STAGES = (
    Stage("synctoken_server.rpc.servicer", "TokenServicer.IssueToken", "the whole handler"),
    Stage("synctoken_server.rpc.servicer", "TokenServicer._caller_id", "who is calling"),
    Stage("synctoken_server.rpc.servicer", "_parse", "request parsing"),
    Stage("synctoken_server.rpc.issuing", "TokenIssuer.issue", "policy, limits and the token"),
    Stage("synctoken_server.rpc.issuing", "decide", "policy"),
    Stage("synctoken_server.policy.limits", "RateLimiter.check", "rate limits"),
    Stage("synctoken_server.rpc.issuing", "plan_times", "issue, expiry and refresh times"),
    Stage("synctoken_server.tokens.minting", "Minter.mint", "the JWT"),
    Stage("synctoken_server.rpc.issuing", "token_id", "the token's fingerprint"),
    Stage("synctoken_server.audit.record", "AuditLog.record", "the audit line, fail-closed write"),
)


class _Counter:
    """One stage's cumulative figures. Updated on the event loop's thread only, read by the writer thread.

    No lock: one that every call takes would cost more than the stages it
    times, and a read that lands between two fields is off by one call.
    """

    __slots__ = ("callee_ns", "count", "cpu_ns", "parent", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.total_ns = 0
        self.callee_ns = 0
        self.cpu_ns = 0
        """Thread CPU time, for coroutines (the handler) only: see `timed`."""
        self.parent: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "total_ns": self.total_ns,
            "callee_ns": self.callee_ns,
            "cpu_ns": self.cpu_ns,
            "parent": self.parent,
        }


class _Call:
    """A timed call in progress: its stage, and the time its timed callees have taken so far."""

    __slots__ = ("callee_ns", "label")

    def __init__(self, label: str) -> None:
        self.label = label
        self.callee_ns = 0


# The timed calls in progress, innermost last. Each timed coroutine (an RPC's
# handler) gives its task a stack of its own, so that RPCs interleaving on the
# event loop do not nest in one another; a plain function only pushes and pops,
# as setting a context variable on every call would cost more than some stages.
# Calls outside any timed coroutine share the default stack (one event loop thread).
_SHARED: list[_Call] = []
_stack: contextvars.ContextVar[list[_Call]] = contextvars.ContextVar("bench_steps_stack", default=_SHARED)


def _done(counter: _Counter, call: _Call, caller: _Call | None, elapsed: int) -> None:
    if caller is not None:
        caller.callee_ns += elapsed
        if counter.parent is None:
            counter.parent = caller.label
    counter.count += 1
    counter.total_ns += elapsed
    counter.callee_ns += call.callee_ns


def timed(label: str, counter: _Counter, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func`, adding each call's time to `counter`; a coroutine function stays one (grpc.aio checks).

    A coroutine's thread CPU time is counted too: wall time also counts the
    moments the server waited for a core, so only CPU time can be set against
    the CPU per request the harness measures. Not for every stage: reading the
    thread's clock is a system call, slower than the smaller stages.
    """
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            outer = _stack.get()
            caller = outer[-1] if outer else None
            call = _Call(label)
            token = _stack.set([call])
            cpu_started = time.thread_time_ns()
            started = time.perf_counter_ns()
            try:
                return await func(*args, **kwargs)
            finally:
                elapsed = time.perf_counter_ns() - started
                counter.cpu_ns += time.thread_time_ns() - cpu_started
                _stack.reset(token)
                _done(counter, call, caller, elapsed)

        return timed_coroutine

    @functools.wraps(func)
    def timed_function(*args: Any, **kwargs: Any) -> Any:
        stack = _stack.get()
        call = _Call(label)
        stack.append(call)
        started = time.perf_counter_ns()
        try:
            return func(*args, **kwargs)
        finally:
            elapsed = time.perf_counter_ns() - started
            stack.pop()
            _done(counter, call, stack[-1] if stack else None, elapsed)

    return timed_function


def overhead_ns(calls: int = 100_000, repeats: int = 3) -> float:
    """What timing one call adds, measured in this process; in the server it counts in the enclosing stage."""

    def noop() -> None:
        pass

    def loop(func: Callable[[], None]) -> int:
        started = time.perf_counter_ns()
        for _ in range(calls):
            func()
        return time.perf_counter_ns() - started

    # The timed calls run inside a timed call, as stages do in the server, so that they pay for telling it.
    wrapped, within = timed("noop", _Counter(), noop), timed("loop", _Counter(), loop)
    return min(int(within(wrapped)) - loop(noop) for _ in range(repeats)) / calls


def _install(stage: Stage, counter: _Counter) -> bool:
    try:
        owner: Any = importlib.import_module(stage.module)
    except ImportError:
        return False
    *path, name = stage.attribute.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    # Static lookup: a staticmethod or classmethod must be rewrapped as one, not turned into a plain method.
    raw = inspect.getattr_static(owner, name, None) if owner is not None else None
    if isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(timed(stage.attribute, counter, raw.__func__)))
    elif isinstance(raw, classmethod):
        setattr(owner, name, classmethod(timed(stage.attribute, counter, raw.__func__)))
    elif callable(raw):
        setattr(owner, name, timed(stage.attribute, counter, raw))
    else:
        return False
    return True


def install(stages: tuple[Stage, ...] = STAGES) -> tuple[dict[str, _Counter], list[str]]:
    """Wrap every stage that exists; return the counters by label, and the labels of stages not found."""
    counters: dict[str, _Counter] = {}
    missing: list[str] = []
    for stage in stages:
        counter = _Counter()
        if _install(stage, counter):
            counters[stage.attribute] = counter
        else:
            missing.append(stage.attribute)
    return counters, missing


def _write(path: Path, counters: dict[str, _Counter], missing: list[str]) -> None:
    payload = {"missing": missing, "stages": {label: c.as_dict() for label, c in counters.items()}}
    # Replaced whole, so the reader never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload), encoding="utf-8")
    partial.replace(path)


def _keep_writing(path: Path, counters: dict[str, _Counter], missing: list[str], stop: threading.Event) -> None:
    while not stop.wait(WRITE_EVERY_S):
        _write(path, counters, missing)


def main() -> int:
    """Install the timers, then run `synctoken` with this process's arguments."""
    path = Path(os.environ[STEPS_FILE_ENV])
    counters, missing = install()
    _write(path, counters, missing)
    stop = threading.Event()
    writer = threading.Thread(
        target=_keep_writing, args=(path, counters, missing, stop), name="bench-steps-writer", daemon=True
    )
    writer.start()
    try:
        return cli.main(sys.argv[1:])
    finally:
        stop.set()
        writer.join()
        _write(path, counters, missing)


if __name__ == "__main__":
    sys.exit(main())

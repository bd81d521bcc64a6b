"""Running one server process in the foreground: start-up, signals, the drain, and the exit status.

Several workers sharing the port are supervised by workers.py; each of them
is one of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog
import uvloop

from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import Config, load_config
from synctoken_server.process import workloadcerts
from synctoken_server.process.reloading import ConfigReloader
from synctoken_server.process.server import TokenServer

T = TypeVar("T")

EXIT_CONFIG = 2
EXIT_START = 3
EXIT_WORKER_DIED = 4
EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Ctrl-C before a server's loop took SIGINT over: as a shell reports an interrupted command."""

PARENT_CHECK_SECONDS = 1.0
"""How often a worker checks that its parent is still alive."""

DUPLICATE_SIGNAL_SECONDS = 1.0
"""The same signal again within this is one signal delivered twice (to the process group, and
forwarded by the workers' parent), not an operator asking to stop at once."""


def load_or_report(path: Path) -> Config | None:
    """Load the config; on failure say why on stderr (file, key, problem) and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        report_config_error(exc)
        return None


def report_config_error(error: ConfigError) -> None:
    """Say on stderr what is wrong with the config, as every command says it: the file, the key, the problem."""
    print(f"synctoken: config error: {error}", file=sys.stderr)  # noqa: T201 - for the operator


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it.

    Every connection is a file descriptor; the usual soft limit of 1024 is
    far below what one server may hold, and far below what the kernel allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def ignore_sighup_until_ready() -> None:
    """Ignore SIGHUP until the server installs its reload handler: its default action would kill the process.

    A change that a SIGHUP ignored meanwhile was about is still seen: the
    file watcher compares against the files as they were when read.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run_one(
    config: Config,
    path: Path,
    *,
    workers: int = 1,
    on_ready: Callable[[int], None] | None = None,
    parent: int | None = None,
) -> int:
    """Serve `config` (loaded from `path`) until SIGTERM or SIGINT, reloading on SIGHUP; return the exit status.

    `workers` > 1: this is one of that many processes sharing the port, and
    `parent` is their parent's pid: if the parent dies (SIGKILL, the OOM
    killer), the worker drains and stops as on SIGTERM, instead of serving an
    old config on the shared port beside whatever replaces it.
    """
    return run_on_server_loop(_serve(config, path, workers=workers, on_ready=on_ready, parent=parent))


def run_on_server_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on the loop every server process runs on (new_event_loop)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop every server process runs on: uvloop's.

    Not asyncio's own: its selector loop is Python code that runs on every
    wake-up (each batch of gRPC completions, each Redis reply); uvloop's is C.
    Measured with bench.instructions: 894,000 -> 688,000 instructions per
    IssueToken, and the Redis check's extra 102,000 -> 60,000. grpc.aio binds
    its completion queue to whichever loop runs it.
    """
    return uvloop.new_event_loop()


async def _watch_parent(parent: int, signals: asyncio.Queue[signal.Signals]) -> None:
    # Polled: no event tells a process its parent died without prctl, which Python does not offer.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(PARENT_CHECK_SECONDS)
    structlog.get_logger("synctoken").warning("server.parent_gone", parent=parent)
    signals.put_nowait(signal.SIGTERM)


async def _serve(
    config: Config, path: Path, *, workers: int, on_ready: Callable[[int], None] | None, parent: int | None
) -> int:
    log = structlog.get_logger("synctoken")
    open_files = raise_open_file_limit()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # From the first moment: a stop while the first SVID is awaited (up to first_svid_timeout) or while
    # the port binds is still a clean stop, not a death by SIGTERM or a KeyboardInterrupt's traceback.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        # Before the port is bound: a server without a certificate must not take calls (or a balancer's probes).
        workload_api = await _unless_stopped(workloadcerts.connect(config.workload_api), signals)
    except workloadcerts.WorkloadApiUnavailable as exc:
        print(f"synctoken: cannot start: {exc}", file=sys.stderr)  # noqa: T201 - start-up failure, for the operator
        return EXIT_START
    if isinstance(workload_api, signal.Signals):
        log.info("server.stopped_before_start", signal=workload_api.name)
        return 0
    try:
        server = TokenServer(config, reuse_port=workers > 1, workers=workers, workload_api=workload_api)
    except OSError as exc:
        print(f"synctoken: {exc}", file=sys.stderr)  # noqa: T201 - start-up failure, for the operator
        return EXIT_START
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    await server.start()
    reloader = ConfigReloader(path, server, config)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    reloading = asyncio.create_task(reloader.run(), name="config-reload")
    # Every listener, as bound: an operator checks here what is reachable, the plaintext ones included.
    log.info(
        "server.started",
        listen=config.listen,
        port=server.port,
        mesh=list(server.mesh_addresses) or None,
        metrics=_metrics_address(config.metrics_listen, server.metrics_port),
        metrics_connections=server.metrics_connections,
        health=server.probes.address if server.probes is not None else None,
        identity_source=config.caller_id_source.value,
        callers=len(config.policy),
        open_file_limit=open_files,
        event_loop=type(loop).__module__.partition(".")[0],
    )
    if on_ready is not None:
        on_ready(server.port)
    watching = asyncio.create_task(_watch_parent(parent, signals)) if parent is not None else None
    received = await signals.get()
    first_at = time.monotonic()
    timeouts = server.snapshots.current.config.timeouts
    # SIGTERM is an orchestrator: drain. SIGINT is a person at a terminal: stop now.
    drain_delay = timeouts.drain_delay if received is signal.SIGTERM else 0
    stop = asyncio.create_task(server.stop(drain_delay=drain_delay))
    await asyncio.sleep(0)  # health says NOT_SERVING before anything else, a log line that may stall included
    log.info("server.stopping", signal=received.name, drain_delay=drain_delay, grace=timeouts.grace)
    # After the stop is under way: a reload during a stop would change nothing that matters any more.
    reloading.cancel()
    if watching is not None:
        watching.cancel()
    if await _second_signal(signals, received, first_at, stop):
        # A second signal while draining: the operator wants out now.
        log.info("server.stopping_now")
        stop.cancel()
        await server.stop(drain_delay=0, grace=0)
    log.info("server.stopped")
    return 0


async def _unless_stopped(
    starting: Coroutine[Any, Any, T], signals: asyncio.Queue[signal.Signals]
) -> T | signal.Signals:
    """What `starting` returns, or the stop signal that came first (`starting` is then cancelled)."""
    started = asyncio.ensure_future(starting)
    stop = asyncio.ensure_future(signals.get())
    try:
        await asyncio.wait((started, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Each still running is cancelled (a signal, or this task cancelled): nothing outlives the start.
        for waiting in (started, stop):
            waiting.cancel()
    signalled = stop.done() and not stop.cancelled()
    if signalled and not started.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await started  # its own clean-up, the Workload API stream's closing included
        return stop.result()
    if signalled:  # both at once: started, and the signal is the running server's to act on
        signals.put_nowait(stop.result())
    return started.result()


def _metrics_address(listen: str | None, port: int | None) -> str | None:
    """Where metrics are scraped: as configured, with the port bound (a configured :0 is no address).

    Without a port of its own, a worker's scrape is the workers' parent's, at the configured address.
    """
    if listen is None or port is None:
        return listen
    return f"{listen.rpartition(':')[0]}:{port}"


async def _second_signal(
    signals: asyncio.Queue[signal.Signals], first: signal.Signals, first_at: float, stop: asyncio.Task[None]
) -> bool:
    """Wait for `stop` to finish; True if a second, distinct stop signal came first."""
    while True:
        second = asyncio.create_task(signals.get())
        await asyncio.wait((stop, second), return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            second.cancel()
            return False
        if second.result() != first or time.monotonic() - first_at > DUPLICATE_SIGNAL_SECONDS:
            return True

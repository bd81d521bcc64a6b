"""Running the server as processes: one in the foreground, or several workers sharing the port.

Each worker is a whole server in its own process (spawned, not forked: gRPC's
core does not survive fork) bound to the same port with SO_REUSEPORT, so the
kernel spreads connections across them and no GIL is shared. Each one
reloads by itself (it watches the files too); the parent forwards SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from synctoken_server import logs, metrics
from synctoken_server.config import Config, load_config
from synctoken_server.configfile import ConfigError
from synctoken_server.linesink import Flag, Lock
from synctoken_server.reloading import ConfigReloader
from synctoken_server.server import TokenServer

EXIT_CONFIG = 2
EXIT_START = 3
EXIT_WORKER_DIED = 4

PARENT_CHECK_SECONDS = 1.0
"""How often a worker checks that its parent is still alive."""

DUPLICATE_SIGNAL_SECONDS = 1.0
"""The same signal again within this is one signal delivered twice (to the process group, and
forwarded by the workers' parent), not an operator asking to stop at once."""

_STOP_MARGIN_SECONDS = 5.0
"""A worker that has not stopped this long after its drain and grace is killed."""


def load_or_report(path: Path) -> Config | None:
    """Load the config; on failure say why on stderr (file, key, problem) and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"synctoken: config error: {exc}", file=sys.stderr)  # noqa: T201 - for the operator
        return None


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
    return asyncio.run(_serve(config, path, workers=workers, on_ready=on_ready, parent=parent))


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
    try:
        server = TokenServer(config, reuse_port=workers > 1, workers=workers)
    except OSError as exc:
        print(f"synctoken: {exc}", file=sys.stderr)  # noqa: T201 - start-up failure, for the operator
        return EXIT_START
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    await server.start()
    reloader = ConfigReloader(path, server, config)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    reloading = asyncio.create_task(reloader.run(), name="config-reload")
    log.info(
        "server.started",
        listen=config.listen,
        port=server.port,
        metrics_port=server.metrics_port,
        identity_source=config.identity_source.value,
        callers=len(config.policy),
        open_file_limit=open_files,
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


def run_workers(path: Path, config: Config, workers: int) -> int:
    """Run the workers; with metrics on, serve one scrape for all of them from this process (see metrics.py)."""
    if config.metrics_listen is None:
        return _run_workers(path, config, workers, None)
    with metrics.multiprocess_directory() as directory:
        try:
            listener = metrics.serve(config.metrics_listen, metrics.multiprocess_registry(directory))
        except OSError as exc:
            print(f"synctoken: cannot listen on {config.metrics_listen}: {exc.strerror or exc}", file=sys.stderr)  # noqa: T201 - start-up failure, for the operator
            return EXIT_START
        try:
            return _run_workers(path, config, workers, directory)
        finally:
            listener.close()


def _run_workers(path: Path, config: Config, workers: int, metrics_dir: Path | None) -> int:
    """Run `workers` server processes on the config's port; forward SIGHUP; stop them all on SIGTERM or SIGINT.

    SIGHUP must be ignored when this is called (see ignore_sighup_until_ready):
    workers inherit that, and so a SIGHUP forwarded before one can reload
    cannot kill it.
    """
    log = structlog.get_logger("synctoken")
    context = multiprocessing.get_context("spawn")
    # One writer at a time on the shared stdout: lines longer than a pipe's
    # atomic write size would otherwise interleave between workers.
    output_lock = context.Lock()
    torn = context.Value("b", 0, lock=False)  # guarded by output_lock
    logs.share_output(output_lock, torn)
    processes = [
        context.Process(
            target=_worker_main,
            args=(str(path), index, workers, output_lock, torn, os.getpid()),
            name=f"synctoken-worker-{index}",
            daemon=False,
        )
        for index in range(workers)
    ]
    received: list[int] = []
    hangups: list[int] = []
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # Nothing here can fail or block: a log line could (a closed pipe, a
        # full disk) and leave the workers running.
        received.append(signum)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    status = 0
    forwarded = 0
    try:
        for process in processes:
            process.start()
        signal.signal(signal.SIGHUP, lambda signum, _frame: hangups.append(signum))
        log.info("workers.started", workers=workers, pids=[p.pid for p in processes])
        while not stopping.wait(timeout=0.2):
            if forwarded < len(hangups):
                # Several SIGHUPs since the last look are one reload.
                forwarded = len(hangups)
                _signal_all(processes, signal.SIGHUP)
                log.info("workers.reload_forwarded", signal="SIGHUP")
            dead = [p for p in processes if p.exitcode is not None]
            if dead:
                # One worker gone means the port serves at reduced capacity, or not
                # at all if it never bound: stop everything and say so.
                status = dead[0].exitcode if dead[0].exitcode in (EXIT_CONFIG, EXIT_START) else EXIT_WORKER_DIED
                log.error("workers.worker_exited", worker=processes.index(dead[0]), exitcode=dead[0].exitcode)
                break
    finally:
        _stop_all(processes, received, _stop_timeout(path, config), log)
        if metrics_dir is not None:
            for process in processes:
                if process.pid is not None:
                    metrics.worker_exited(metrics_dir, process.pid)
    log.info("workers.stopped", status=status)
    return status


def _stop_timeout(path: Path, config: Config) -> float:
    # Workers may have reloaded a longer drain or grace than this process
    # started with: the longer of the two, so that none is killed mid-drain.
    try:
        latest = load_config(path).timeouts
    except ConfigError:
        latest = config.timeouts
    first = config.timeouts
    return max(first.drain_delay + first.grace, latest.drain_delay + latest.grace) + _STOP_MARGIN_SECONDS


def _signal_all(processes: Sequence[multiprocessing.process.BaseProcess], signum: int) -> None:
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def _stop_all(
    processes: Sequence[multiprocessing.process.BaseProcess],
    received: list[int],
    timeout: float,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Pass each signal received to every live worker (SIGTERM if none was); wait, then kill what is left.

    Each worker drains by itself; a later signal is passed on too, so that a
    second SIGTERM or a SIGINT stops the workers at once, as it does a single server.
    """
    if not received:  # a worker died: stop the others as SIGTERM would
        received.append(signal.SIGTERM)
    forwarded = 0
    deadline = time.monotonic() + timeout
    while True:
        new = received[forwarded:]
        forwarded += len(new)
        for signum in new:
            _signal_all(processes, signum)
            log.info("workers.stopping", signal=signal.Signals(signum).name)
        alive = [p for p in processes if p.pid is not None and p.exitcode is None]
        if not alive or time.monotonic() >= deadline:
            break
        alive[0].join(timeout=0.1)
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            process.kill()
            process.join()


def _worker_main(path: str, index: int, workers: int, output_lock: Lock, torn: Flag, parent: int) -> None:
    # A fresh interpreter: configure logging and load the config here, with
    # the same loader and the same environment as the parent.
    logs.configure(worker=index)
    logs.share_output(output_lock, torn)
    config = load_or_report(Path(path))
    sys.exit(EXIT_CONFIG if config is None else run_one(config, Path(path), workers=workers, parent=parent))

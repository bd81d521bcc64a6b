"""Running the server as processes: one in the foreground, or several workers sharing the port.

Each worker is a whole server in its own process (spawned, not forked: gRPC's
core does not survive fork) bound to the same port with SO_REUSEPORT, so the
kernel spreads connections across them and no GIL is shared.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from synctoken_server import logs
from synctoken_server.config import Config, ConfigError, load_config
from synctoken_server.server import TokenServer

EXIT_CONFIG = 2
EXIT_START = 3
EXIT_WORKER_DIED = 4

_STOP_TIMEOUT_SECONDS = 15.0


def load_or_report(path: Path) -> Config | None:
    """Load the config; on failure say why on stderr (file, key, problem) and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"synctoken: config error: {exc}", file=sys.stderr)  # noqa: T201 - for the operator
        return None


def run_one(
    config: Config,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    return asyncio.run(_serve(config, reuse_port=reuse_port, worker=worker, on_ready=on_ready))


async def _serve(
    config: Config, *, reuse_port: bool, worker: int | None, on_ready: Callable[[int], None] | None
) -> int:
    log = structlog.get_logger("synctoken")
    try:
        server = TokenServer(config, reuse_port=reuse_port)
    except OSError as exc:
        print(f"synctoken: {exc}", file=sys.stderr)  # noqa: T201 - start-up failure, for the operator
        return EXIT_START
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, log, "server.stopping", signum, stopping.set)
    await server.start()
    log.info(
        "server.started",
        listen=config.listen,
        port=server.port,
        worker=worker,
        identity_source=config.identity_source.value,
        callers=len(config.policy),
    )
    if on_ready is not None:
        on_ready(server.port)
    await stopping.wait()
    await server.stop()
    log.info("server.stopped", worker=worker)
    return 0


def _request_stop(
    log: structlog.typing.FilteringBoundLogger, event: str, signum: int, stop: Callable[[], None]
) -> None:
    log.info(event, signal=signal.Signals(signum).name)
    stop()


def run_workers(path: Path, workers: int) -> int:
    """Run `workers` server processes on the config's port; stop them all on SIGTERM or SIGINT."""
    log = structlog.get_logger("synctoken")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(str(path), index), name=f"synctoken-worker-{index}", daemon=False)
        for index in range(workers)
    ]
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: _request_stop(log, "workers.stopping", received, stopping.set))
    for process in processes:
        process.start()
    log.info("workers.started", workers=workers, pids=[p.pid for p in processes])
    status = 0
    while not stopping.wait(timeout=0.2):
        dead = [p for p in processes if p.exitcode is not None]
        if dead:
            # One worker gone means the port serves at reduced capacity, or not
            # at all if it never bound: stop everything and say so.
            status = dead[0].exitcode if dead[0].exitcode in (EXIT_CONFIG, EXIT_START) else EXIT_WORKER_DIED
            log.error("workers.worker_exited", worker=processes.index(dead[0]), exitcode=dead[0].exitcode)
            break
    _stop_all(processes)
    log.info("workers.stopped", status=status)
    return status


def _stop_all(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.exitcode is None:
            process.terminate()  # SIGTERM: each worker drains its own RPCs
    deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()


def _worker_main(path: str, index: int) -> None:
    # A fresh interpreter: configure logging and load the config here, with
    # the same loader and the same environment as the parent.
    logs.configure()
    config = load_or_report(Path(path))
    sys.exit(EXIT_CONFIG if config is None else run_one(config, reuse_port=True, worker=index))

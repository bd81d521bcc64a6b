"""Several server processes sharing one port, and the parent that supervises them.

Each worker is a whole server in its own process (spawned, not forked: gRPC's
core does not survive fork) bound to the same port with SO_REUSEPORT, so the
kernel spreads connections across them and no GIL is shared. Each one
reloads by itself (it watches the files too); the parent forwards SIGHUP and
stop signals, and serves the one metrics scrape for all of them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from synctoken_server import metrics
from synctoken_server.audit import logs
from synctoken_server.audit.linesink import Flag, Lock
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import Config, load_config
from synctoken_server.process.running import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_START,
    EXIT_WORKER_DIED,
    load_or_report,
    run_one,
)

_STOP_MARGIN_SECONDS = 5.0
"""A worker that has not stopped this long after its drain and grace is killed."""


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
            _start_with_sigint_blocked(process)
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
    exitcodes = [process.exitcode for process in processes]
    status = _interrupted_if_stopped_so(status, exitcodes)
    log.info("workers.stopped", status=status, exitcodes=exitcodes)
    return status


def _interrupted_if_stopped_so(status: int, exitcodes: Sequence[int | None]) -> int:
    """EXIT_INTERRUPTED for a clean stop in which a worker was interrupted: Ctrl-C came before it ran.

    As a single server says when Ctrl-C comes before it runs (cli.run); a failure's status stays.
    """
    return EXIT_INTERRUPTED if status == 0 and EXIT_INTERRUPTED in exitcodes else status


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


def _start_with_sigint_blocked(process: multiprocessing.process.BaseProcess) -> None:
    """Spawn `process` with SIGINT blocked: a Ctrl-C during its interpreter's start waits for _worker_main.

    A spawned child inherits this thread's signal mask through exec (CPython's
    resource tracker is started the same way, for the same reason). Without
    it, a terminal's Ctrl-C reaching the worker while Python imports `site`,
    multiprocessing or synctoken prints a traceback or a "Fatal Python error".
    Here the signal is only held back until start() returns: on_signal sees it then.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_main(path: str, index: int, workers: int, output_lock: Lock, torn: Flag, parent: int) -> None:
    # A fresh interpreter: configure logging and load the config here, with
    # the same loader and the same environment as the parent.
    try:
        try:
            # Spawned with SIGINT blocked (_start_with_sigint_blocked): a Ctrl-C held back
            # since then is raised here, where it ends the worker as one below.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            logs.configure(worker=index)
            logs.share_output(output_lock, torn)
            config = load_or_report(Path(path))
            status = EXIT_CONFIG if config is None else run_one(config, Path(path), workers=workers, parent=parent)
        finally:
            # The status is decided: a late Ctrl-C (the parent forwards the group's) changes nothing now.
            # Ignored, not blocked: a block holds back only this thread, and another (gRPC's) would take
            # the signal, with SIG_DFL's action once finalization resets the handler.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches every process of its group, workers included: one still starting
        # (its loop has not taken SIGINT over) ends as a single server does (cli.run), 130 and no traceback.
        status = EXIT_INTERRUPTED
    sys.exit(status)

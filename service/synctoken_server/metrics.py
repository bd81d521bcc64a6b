"""Prometheus metrics: what the server counts, and the plain-HTTP listener a scraper reads them from.

Label values come only from configuration: policy entry ids (never a caller
id taken from a certificate), Sync service SIDs a policy lists, API key
SIDs, ErrorInfo reasons. A stream of unknown callers therefore cannot grow
the number of series, and no identity or token can appear in a scrape.

With `--workers` the parent process serves the scrape and reads every
worker's values from the files prometheus-client's multiprocess mode keeps
in PROMETHEUS_MULTIPROC_DIR (see `multiprocess_registry`); each worker only
counts. That variable must be set before prometheus-client is first imported
in a worker, which is why the parent sets it before spawning them.

The listener is bounded (boundedhttp.py: a read deadline, a cap on
connections taken from the open-file limit), and a scrape is answered from a
render at most RENDER_REUSE_SECONDS old, so a flood of scrapes renders once a
second, not once per request under the GIL the gRPC handlers need.

Without a `[metrics]` listener nothing is counted at all: the server's
metrics are stand-ins that do nothing, and prometheus-client is not even
imported. Nobody could read the counts, and every IssueToken would pay for
them (a counter, a histogram observation) all the same.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

from synctoken_server.serveroptions import split_listen

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from synctoken_server.boundedhttp import BoundedHTTPServer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NO_POLICY = ""
"""The `caller` label of a refusal no policy entry matched (unknown or unauthenticated callers)."""

RELOAD_SUCCESS = "success"
RELOAD_FAILURE = "failure"

# Issuing takes well under a millisecond (see the benchmark); the upper
# buckets are for a stalled audit log or an overloaded event loop.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A loopback Redis answers in a fraction of a millisecond; timeouts are tens of milliseconds.
_BACKEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
RENDER_REUSE_SECONDS = 1.0
"""How old a render a scrape may be answered with.

Rendering walks every series under the GIL that IssueToken needs: a flood of
scrapes rendering once each slowed gRPC to about a third. Prometheus scrapes
every 15 s or so; a second-old render costs it nothing.
"""


class CounterLike(Protocol):
    """A prometheus-client Counter, or the stand-in counting nothing."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> CounterLike: ...  # noqa: D102 - prometheus-client's
    def inc(self, amount: float = 1) -> None: ...  # noqa: D102


class GaugeLike(Protocol):
    """A prometheus-client Gauge, or the stand-in."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> GaugeLike: ...  # noqa: D102 - prometheus-client's
    def set(self, value: float) -> None: ...  # noqa: D102


class HistogramLike(Protocol):
    """A prometheus-client Histogram without labels, or the stand-in."""

    def observe(self, amount: float) -> None: ...  # noqa: D102 - prometheus-client's


class _Uncounted:
    """A metric nobody can read (no listener): every method does nothing."""

    def labels(self, *_labelvalues: object, **_labelkwargs: object) -> Self:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


class Metrics:
    """The server's metrics, on their own registry (tests run several servers in one process).

    `enabled` False (no listener): `registry` is None and every metric is a stand-in counting nothing.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.registry: CollectorRegistry | None = None
        self.issued: CounterLike
        self.refused: CounterLike
        self.latency: HistogramLike
        self.rate_limited: CounterLike
        self.reloads: CounterLike
        self.signing_key: GaugeLike
        self.certificate_expiry: GaugeLike
        self.backend_errors: CounterLike
        self.backend_latency: HistogramLike
        self.backend_fallbacks: CounterLike
        self.workload_api_errors: CounterLike
        if not enabled:
            uncounted = _Uncounted()
            self.issued = self.refused = self.latency = self.rate_limited = uncounted
            self.reloads = self.signing_key = self.certificate_expiry = uncounted
            self.backend_errors = self.backend_latency = self.backend_fallbacks = uncounted
            self.workload_api_errors = uncounted
            return
        # Imported only here and where metrics are served: see the module's docstring.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector  # noqa: PLC0415

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The standard process_* series (open fds and their limit, memory, CPU, start time) of this process.
        # With --workers this registry is not scraped: the parent reports every process (multiprocess_registry).
        ProcessCollector(registry=r)
        self.issued = Counter(
            "synctoken_tokens_issued",
            "Tokens issued, by policy entry and Sync service.",
            ["caller", "service_sid"],
            registry=r,
        )
        self.refused = Counter(
            "synctoken_requests_refused",
            "Requests refused, by policy entry (empty: none matched) and ErrorInfo reason.",
            ["caller", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "synctoken_issue_latency_seconds",
            "IssueToken handling time in the server, whatever the outcome.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "synctoken_rate_limited",
            "Requests over a rate limit, by policy entry; shadow=true ones were let through.",
            ["caller", "shadow"],
            registry=r,
        )
        # The global rate limits' Redis; only ever moves with [limits] backend = "redis".
        self.backend_errors = Counter(
            "synctoken_ratelimit_backend_errors",
            "Calls to the rate limits' backend that failed, by kind (timeout, connection, auth, error).",
            ["kind"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "synctoken_ratelimit_backend_latency_seconds",
            "How long each call to the rate limits' backend took, failed ones included (at most its timeout).",
            buckets=_BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_fallbacks = Counter(
            "synctoken_ratelimit_backend_fallbacks",
            "Limit checks decided without the backend (failed call or open breaker), by on_backend_failure.",
            ["on_backend_failure"],
            registry=r,
        )
        # Only ever moves with [tls] source = "spiffe".
        self.workload_api_errors = Counter(
            "synctoken_workload_api_errors",
            "Problems on the SPIFFE Workload API's X509-SVID stream, by kind (unavailable, refused, ended, invalid).",
            ["kind"],
            registry=r,
        )
        self.reloads = Counter("synctoken_config_reloads", "Config reloads, by result.", ["result"], registry=r)
        # In multiprocess mode: the largest over live workers, so a worker still
        # signing with an old key shows it as in use.
        self.signing_key = Gauge(
            "synctoken_signing_key_info",
            "1 for the API key that signs, 0 for one that did before a reload.",
            ["key_sid"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.certificate_expiry = Gauge(
            "synctoken_server_certificate_expiry_timestamp_seconds",
            "When the server certificate in use expires (Unix time).",
            registry=r,
            multiprocess_mode="livemin",
        )

    def signing_with(self, key_sid: str, previous: str | None = None) -> None:
        """Say which API key signs now (and that `previous`, if another, no longer does)."""
        if previous is not None and previous != key_sid:
            self.signing_key.labels(previous).set(0)
        self.signing_key.labels(key_sid).set(1)


@dataclass(frozen=True)
class Listener:
    """A running metrics HTTP listener."""

    server: BoundedHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on (useful when configured as 0)."""
        return int(self.server.server_port)

    @property
    def connections(self) -> int:
        """How many scrape connections it serves at once (see boundedhttp.py)."""
        return self.server.connections

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Exposition:
    """The registry rendered for scrapes: one render per format (and compression) reused for RENDER_REUSE_SECONDS."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        # Imported only where metrics are served: see the module's docstring.
        from prometheus_client import exposition, openmetrics  # noqa: PLC0415

        self._registry = registry
        self._clock = clock
        self._choose = exposition.choose_encoder
        self._gzip_accepted = exposition.gzip_accepted
        # What prometheus-client answers a scraper that asks for nothing: the 0.0.4 text format in
        # every version the range allows (its constant for it is newer than the range's floor).
        self._text = exposition.choose_encoder("")
        self._openmetrics = (openmetrics.exposition.generate_latest, openmetrics.exposition.CONTENT_TYPE_LATEST)
        # Held while rendering: scrapes arriving meanwhile wait for that render instead of making their own.
        self._lock = threading.Lock()
        self._renders: dict[tuple[str, bool], tuple[float, bytes]] = {}

    def body(self, accept: str | None, accept_encoding: str | None) -> tuple[bytes, str, bool]:
        """The body for a scrape with these headers: its bytes, content type, and whether it is gzipped."""
        # Two formats only, whatever version or escaping the Accept header
        # names: every name here is a plain one, so escaping changes nothing,
        # and a scraper varying the header cannot make each scrape a new render.
        _, negotiated = self._choose(accept or "")
        encoder, content_type = self._openmetrics if negotiated.startswith("application/openmetrics") else self._text
        gzipped = self._gzip_accepted(accept_encoding or "")
        key = (content_type, gzipped)
        with self._lock:
            now = self._clock()
            render = self._renders.get(key)
            if render is None or now - render[0] >= RENDER_REUSE_SECONDS:
                output = encoder(self._registry)
                render = (now, gzip.compress(output) if gzipped else output)
                self._renders[key] = render
        return render[1], content_type, gzipped


def serve(listen: str, registry: CollectorRegistry) -> Listener:
    """Serve `registry` over HTTP at `listen` (any path) on a thread of its own; OSError if it cannot bind."""
    address = split_listen(listen)
    if address is None:  # the loader checked it; this is for callers that did not
        raise OSError(f"cannot listen on {listen}: not host:port")
    host, port = address
    from synctoken_server.boundedhttp import BoundedHTTPServer, BoundedRequestHandler  # noqa: PLC0415 - as prometheus

    exposition = Exposition(registry)

    class ScrapeHandler(BoundedRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body, content_type, gzipped = exposition.body(self.headers["Accept"], self.headers["Accept-Encoding"])
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = BoundedHTTPServer(host, port, ScrapeHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True)
    thread.start()
    return Listener(server, thread)


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """A registry that reads every worker's values from `directory` at scrape time, and every process's process_*."""
    from prometheus_client import CollectorRegistry, multiprocess  # noqa: PLC0415 - see the module's docstring

    registry = CollectorRegistry()
    # prometheus-client leaves its multiprocess module unannotated.
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(_EveryProcess(directory))
    return registry


_WORKER_FILE = re.compile(r"_(\d+)\.db\Z")
"""A worker's metric file in the multiprocess directory: `counter_<pid>.db`, `gauge_livemax_<pid>.db`..."""


class _EveryProcess:
    """The process_* series of the parent and of each live worker, told apart by a `pid` label.

    prometheus-client's ProcessCollector reads one process's /proc; its
    series carry no label, so one scrape of several processes labels them.
    Workers are found by the files they write in the multiprocess directory
    (each writes some at start); a dead worker's files stay (its counts did
    happen), so only pids still running are read.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _pids(self) -> list[int]:
        workers = {int(m.group(1)) for p in self._directory.iterdir() if (m := _WORKER_FILE.search(p.name))}
        return [os.getpid(), *sorted(pid for pid in workers if pid != os.getpid() and _running(pid))]

    def collect(self) -> Iterator[Metric]:
        """One family per process_* series, one sample per process."""
        from prometheus_client import ProcessCollector  # noqa: PLC0415 - see the module's docstring
        from prometheus_client.metrics_core import Metric  # noqa: PLC0415

        families: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from families.values()


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@contextmanager
def multiprocess_directory() -> Iterator[Path]:
    """A fresh directory for the workers' metric files, named in PROMETHEUS_MULTIPROC_DIR meanwhile.

    Fresh, because files left by an earlier run would be counted as this one's.
    """
    previous = os.environ.get(MULTIPROC_ENV)
    with tempfile.TemporaryDirectory(prefix="synctoken-metrics-") as directory:
        os.environ[MULTIPROC_ENV] = directory
        try:
            yield Path(directory)
        finally:
            if previous is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = previous


def worker_exited(directory: Path, pid: int) -> None:
    """Drop a dead worker's gauges (its counters stay: what it counted did happen)."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - see the module's docstring

    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]

"""Prometheus metrics over real HTTP scrapes, parsed with prometheus_client's own parser.

Counters are compared before and after a bounded number of calls; nothing
depends on timing. Every scrape is also checked for what must never be in
one: an identity, a token, a caller id from a certificate.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from support.calls import channel
from support.configs import POLICY_TOML, SECRET_ENV, WriteConfig, config_text
from support.constants import API_KEY_SID, BFF_ID, SERVICE_A, STRANGER_ID
from support.files import replace_file
from support.inprocess import ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port, serve
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.boundedhttp import CONNECTIONS_PER_SECOND
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.metrics import RENDER_REUSE_SECONDS, Exposition, Metrics

ALICE = pb.IssueTokenRequest(identity="alice-7c1f", sync=pb.SyncGrant())
"""A distinctive identity, so that finding it in a scrape means something."""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, watch: LeakWatch) -> Samples:
    """GET the metrics; every sample by name and labels. Fails if an identity, token or caller id is in the text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for forbidden in (ALICE.identity, STRANGER_ID, *watch.tokens, *watch.secrets):
        assert forbidden not in text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_until(port: int, watch: LeakWatch, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready` holds: the listener serves a render up to RENDER_REUSE_SECONDS old."""
    deadline = time.monotonic() + 30
    while not ready(samples := scrape(port, watch)):
        assert time.monotonic() < deadline, "the scrape never showed the calls made"
        time.sleep(0.1)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def with_metrics(text: str, listen: str = "127.0.0.1:0") -> str:
    """`text` with a [metrics] table."""
    return f'[metrics]\nlisten = "{listen}"\n{text}'


class TestInProcess:
    """One server, its listener on an ephemeral port."""

    def test_counters_move(self, harness: ServerHarness, pki: Pki, leak_watch: LeakWatch) -> None:
        """Issued, refused and latency move with the calls made; labels are policy entries and reasons."""
        server = harness.start(with_metrics(config_text(pki)))
        port = server._server.metrics_port
        assert port is not None
        before = scrape(port, leak_watch)
        bff, stranger = harness.client(server, "bff"), harness.client(server, "stranger")
        for _ in range(3):
            bff.issue(ALICE)
        with pytest.raises(grpc.RpcError):
            stranger.issue(ALICE)
        with pytest.raises(grpc.RpcError):
            bff.issue(pb.IssueTokenRequest(identity="", sync=pb.SyncGrant()))
        count = "synctoken_issue_latency_seconds_count"
        after = scrape_until(port, leak_watch, lambda s: value(s, count) - value(before, count) >= 5)
        issued = "synctoken_tokens_issued_total"
        assert (
            value(after, issued, caller=BFF_ID, service_sid=SERVICE_A)
            - value(before, issued, caller=BFF_ID, service_sid=SERVICE_A)
            == 3
        )
        refused = "synctoken_requests_refused_total"
        assert value(after, refused, caller="", reason="CALLER_NOT_ALLOWED") == 1
        assert value(after, refused, caller=BFF_ID, reason="INVALID_REQUEST") == 1
        assert value(after, count) - value(before, count) == 5
        assert value(after, "synctoken_signing_key_info", key_sid=API_KEY_SID) == 1
        assert value(after, "synctoken_server_certificate_expiry_timestamp_seconds") > time.time()

    def test_rate_limited_by_shadow(self, harness: ServerHarness, pki: Pki, leak_watch: LeakWatch) -> None:
        """Enforced and shadow refusals are counted apart, under the policy entry's id."""
        policy = POLICY_TOML.replace(f'id = "{BFF_ID}"', f'id = "{BFF_ID}"\nrate = 0.01\nburst = 1\nshadow = true', 1)
        server = harness.start(with_metrics(config_text(pki, policy=policy)))
        port = server._server.metrics_port
        bff = harness.client(server, "bff")
        for _ in range(4):
            bff.issue(ALICE)
        after = scrape(port, leak_watch)
        assert value(after, "synctoken_rate_limited_total", caller=BFF_ID, shadow="true") == 3
        assert value(after, "synctoken_rate_limited_total", caller=BFF_ID, shadow="false") == 0

    def test_openmetrics_gzipped(self, harness: ServerHarness, pki: Pki) -> None:
        """A scraper asking for OpenMetrics, gzipped (as Prometheus does), gets that, and it parses."""
        server = harness.start(with_metrics(config_text(pki)))
        request = urllib.request.Request(
            f"http://127.0.0.1:{server._server.metrics_port}/metrics",
            headers={
                "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;q=0.3",
                "Accept-Encoding": "gzip",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - an http URL built above
            assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            assert response.headers["Content-Encoding"] == "gzip"
            text = gzip.decompress(response.read()).decode()
        # prometheus-client leaves its OpenMetrics parser unannotated.
        names = {family.name for family in openmetrics_families(text)}  # type: ignore[no-untyped-call]
        assert "synctoken_tokens_issued" in names

    def test_off_by_default(self, harness: ServerHarness, pki: Pki) -> None:
        """Without a [metrics] table there is no listener."""
        server = harness.start(config_text(pki))
        assert server._server.metrics_port is None


class TestExposition:
    """The render a scrape is answered with."""

    def test_render_reused_for_a_while(self) -> None:
        """Within RENDER_REUSE_SECONDS a scrape gets the same render; after it, a new one with the latest counts."""
        metrics = Metrics()
        assert metrics.registry is not None
        now = [100.0]
        exposition = Exposition(metrics.registry, clock=lambda: now[0])
        first, _, _ = exposition.body(None, None)
        metrics.issued.labels(BFF_ID, SERVICE_A).inc()
        now[0] += RENDER_REUSE_SECONDS / 2
        assert exposition.body(None, None)[0] == first
        assert exposition.body("application/openmetrics-text", None)[0] != first  # another format, its own render
        now[0] += RENDER_REUSE_SECONDS
        later, _, _ = exposition.body(None, None)
        assert b"synctoken_tokens_issued_total" in later
        assert later != first


class TestConfig:
    """The [metrics] table."""

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ("[metrics]\n", "metrics.listen: missing"),
            ('[metrics]\nlisten = "9464"', "metrics.listen: '9464' is not host:port (e.g. 127.0.0.1:9464)"),
            ('[metrics]\nlisten = "127.0.0.1:9464"\npath = "/m"', "metrics.path: unknown key; expected one of listen"),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, table: str, message: str) -> None:
        """Each defect names the file and the key."""
        path = write_config(f"{table}\n{config_text(pki)}")
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={"TWILIO_API_SECRET": "x" * 32})
        assert str(caught.value) == f"{path}: {message}"


def issue_fresh(pki: Pki, port: int, watch: LeakWatch) -> None:
    """IssueToken on a new connection (with workers, the kernel picks a worker per connection)."""
    with channel(pki, port) as ch:
        watch.tokens.add(token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token)


class TestProcesses:
    """`synctoken serve` with metrics: reload counts, and one scrape for all workers."""

    def test_workers_share_one_scrape(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """With --workers 2 the parent's scrape adds up both workers' counts."""
        port, metrics_port = free_port(), free_port()
        text = with_metrics(config_text(pki, listen=f"127.0.0.1:{port}"), f"127.0.0.1:{metrics_port}")
        process = serve(text, tmp_path, leak_watch, processes, workers=2)
        calls = 24
        for _ in range(calls):
            issue_fresh(pki, port, leak_watch)
        workers = {r["worker"] for r in process.records() if r["event"] == "token.decision"}
        assert workers == {0, 1}, "the kernel sent every connection to one worker"
        samples = scrape(metrics_port, leak_watch)
        assert value(samples, "synctoken_tokens_issued_total", caller=BFF_ID, service_sid=SERVICE_A) == calls
        assert value(samples, "synctoken_signing_key_info", key_sid=API_KEY_SID) == 1

    def test_reloads_counted(self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """A good reload and a bad one are counted by result."""
        port, metrics_port = free_port(), free_port()
        text = with_metrics(config_text(pki, listen=f"127.0.0.1:{port}"), f"127.0.0.1:{metrics_port}")
        process = serve(text, tmp_path, leak_watch, processes)
        path = tmp_path / "synctoken.toml"
        replace_file(path, text.replace("[defaults]", "[defaults]\nbogus = 1").encode())
        process.wait_for_records("config.reload_failed")
        replace_file(path, text.replace('max_ttl = "4h"', 'max_ttl = "5h"').encode())
        process.wait_for_records("config.reloaded")
        samples = scrape(metrics_port, leak_watch)
        assert value(samples, "synctoken_config_reloads_total", result="failure") == 1
        assert value(samples, "synctoken_config_reloads_total", result="success") == 1
        issue_fresh(pki, port, leak_watch)


class TestOff:
    """Without a [metrics] listener nobody can read counts, so none are kept and prometheus-client is not loaded."""

    def test_nothing_counted_nothing_imported(self) -> None:
        """The server's modules and a disabled Metrics load no prometheus-client; its metrics take calls and keep nothing."""
        script = (
            "import sys; import synctoken_server.cli, synctoken_server.process.server, synctoken_server.process.workers; "
            "from synctoken_server.metrics import Metrics; m = Metrics(enabled=False); "
            "m.issued.labels('bff', 'IS1').inc(); m.latency.observe(0.1); m.certificate_expiry.set(1.0); "
            "print(m.registry, 'prometheus_client' in sys.modules)"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
        assert result.stdout.split() == ["None", "False"]


HALF_SENT_SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
"""A scrape whose headers never end: the server waits for the blank line."""
WHOLE_SCRAPE = b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def slow_scrapes() -> Iterator[list[socket.socket]]:
    """Scrape connections a test holds open; closed at teardown."""
    sockets: list[socket.socket] = []
    yield sockets
    for s in sockets:
        s.close()


def open_half_sent(port: int, count: int, into: list[socket.socket]) -> None:
    """Open up to `count` scrape connections that send HALF_SENT_SCRAPE; stop at the first the server does not take."""
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:  # its accept queue is full: the server has stopped accepting
            return
        into.append(s)
        with contextlib.suppress(OSError):  # closed by the server already: refused, which is the point
            s.sendall(HALF_SENT_SCRAPE)


def response_to_whole_scrape(port: int) -> bytes:
    """What the server sends back to one complete scrape on a new connection (b"" if it closed or reset it)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(WHOLE_SCRAPE)
            while chunk := s.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed `s` (it waits up to 30 s to see it)."""
    s.settimeout(30)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # closed with a reset: closed all the same
        return True
    except TimeoutError:
        return False


class TestBounded:
    """The scrape listener cannot starve the gRPC listener: a read deadline, and a cap on connections from the fd limit."""

    FILES = 128
    """The open-file limit (soft and hard) the server is started with."""

    def start(
        self, pki: Pki, write_config: WriteConfig, watch: LeakWatch, processes: list[Process]
    ) -> tuple[Process, int, int]:
        """`synctoken serve` with metrics and at most FILES file descriptors; its gRPC and metrics ports."""
        port, metrics_port = free_port(), free_port()
        text = with_metrics(config_text(pki, listen=f"127.0.0.1:{port}"), f"127.0.0.1:{metrics_port}")
        path = write_config(text)
        limits = {resource.RLIMIT_NOFILE: (self.FILES, self.FILES)}
        process = Process(["serve", "--config", str(path)], path.parent, watch, os.environ | SECRET_ENV, limits)
        processes.append(process)
        process.wait_for_records("server.started")
        return process, port, metrics_port

    @pytest.mark.slow
    def test_slow_scrapes_leave_files_for_grpc(
        self,
        pki: Pki,
        write_config: WriteConfig,
        leak_watch: LeakWatch,
        processes: list[Process],
        slow_scrapes: list[socket.socket],
    ) -> None:
        """With 128 files, 300 half-sent scrapes held open still leave room for a new mTLS IssueToken connection."""
        _, port, metrics_port = self.start(pki, write_config, leak_watch, processes)
        open_half_sent(metrics_port, 300, slow_scrapes)
        issue_fresh(pki, port, leak_watch)

    def test_connections_over_the_cap_refused(
        self,
        pki: Pki,
        write_config: WriteConfig,
        leak_watch: LeakWatch,
        processes: list[Process],
        slow_scrapes: list[socket.socket],
    ) -> None:
        """With 128 files, a scrape beyond 16 held ones is refused; once they leave, one works; the cap is logged."""
        process, _, metrics_port = self.start(pki, write_config, leak_watch, processes)
        most = self.FILES // 8  # what the listener may hold, at most, leaving the rest to gRPC
        open_half_sent(metrics_port, most, slow_scrapes)
        # Well within their read deadline, and long enough for the per-second
        # allowance to fill again: only the cap on connections can refuse the next.
        time.sleep(most / CONNECTIONS_PER_SECOND)
        refused = response_to_whole_scrape(metrics_port)
        assert refused == b"" or refused.startswith(b"HTTP/1.0 503 "), refused[:200]
        for s in slow_scrapes:
            s.close()
        deadline = time.monotonic() + 30
        while True:  # each held connection's slot frees once its handler sees the close
            served = response_to_whole_scrape(metrics_port)
            if served.startswith(b"HTTP/1.0 200 "):
                break
            assert time.monotonic() < deadline, "no scrape served after the held connections left"
            time.sleep(0.1)
        assert b"synctoken_tokens_issued_total" in served
        [started] = process.wait_for_records("server.started")
        assert 1 <= started["metrics_connections"] <= most

    def test_scrapes_beyond_the_rate_refused(self, harness: ServerHarness, pki: Pki) -> None:
        """Of 200 whole scrapes one after another (never two at once), those beyond the allowance are refused."""
        server = harness.start(with_metrics(config_text(pki)))
        port = server._server.metrics_port
        assert port is not None
        statuses = {response_to_whole_scrape(port)[:12] for _ in range(200)}
        assert b"HTTP/1.0 200" in statuses
        assert statuses <= {b"HTTP/1.0 200", b"HTTP/1.0 503", b""}
        assert statuses & {b"HTTP/1.0 503", b""}, "every scrape was served"

    def test_half_sent_request_dropped(self, harness: ServerHarness, pki: Pki) -> None:
        """A scrape whose headers never end is closed by the server."""
        server = harness.start(with_metrics(config_text(pki)))
        port = server._server.metrics_port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(HALF_SENT_SCRAPE)
            assert closed_by_server(s)

    def test_dribbled_request_dropped(self, harness: ServerHarness, pki: Pki) -> None:
        """A scrape sending a byte of its headers at a time, never pausing long, is closed all the same."""
        server = harness.start(with_metrics(config_text(pki)))
        port = server._server.metrics_port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(HALF_SENT_SCRAPE)
            s.settimeout(0.5)
            for _ in range(120):  # a minute of it, far past any read deadline
                try:
                    s.sendall(b"X")
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
            else:
                pytest.fail("the server kept a dribbling scrape open for a minute")

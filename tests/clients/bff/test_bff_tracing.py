"""One GET /token, one trace: the BFF's server span, the client's span under it, synctoken's server span under that."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from support.bff import BffProcess
from support.clients import env_for
from support.configs import config_text
from support.constants import API_SECRET
from support.logcapture import LeakWatch
from support.otlp import OtlpReceiver, ReceivedSpan, exporter_env
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, serve

ISSUE_SPAN = "/synctoken.v1.TokenService/IssueToken"
DEVICE = "tab-7f3e9c1d"
"""A distinctive device id (`?device=`), so that finding it in an export means something."""


@pytest.fixture
def traced_bff(
    pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process], otlp_receiver: OtlpReceiver
) -> Iterator[BffProcess]:
    """synctoken and synctoken-bff, each with tracing on and exporting to `otlp_receiver`."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    text = config_text(pki) + "\n[tracing]\nenabled = true\n"
    server = serve(text, server_dir, leak_watch, processes, env=exporter_env(otlp_receiver.endpoint, "synctoken"))
    [started] = server.wait_for_records("server.started")
    secret = tmp_path / "session.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    env = (
        env_for(pki, "bff", f"127.0.0.1:{started['port']}")
        | exporter_env(otlp_receiver.endpoint, "synctoken-bff")
        | {"BFF_SESSION_SECRET_FILE": str(secret), "BFF_TRACING": "true", "TWILIO_API_SECRET": API_SECRET}
    )
    bff = BffProcess(env, tmp_path, leak_watch)
    bff.wait_until_serving()
    yield bff
    if bff.proc.poll() is None:
        bff.proc.kill()
        bff.proc.wait()


def wait_for(otlp_receiver: OtlpReceiver, service: str, kind: int, trace_id: str | None = None) -> ReceivedSpan:
    """The one span of `service` of `kind` (in trace `trace_id`, if given) for IssueToken or GET /token, once arrived."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = [
            s
            for s in otlp_receiver.spans()
            if s.service == service and s.span.kind == kind and trace_id in (None, s.trace_id)
        ]
        if found:
            [span] = found
            return span
        time.sleep(0.05)
    raise AssertionError(
        f"no {service} span of kind {kind}: {[(s.service, s.span.name) for s in otlp_receiver.spans()]}"
    )


class TestOneTrace:
    """BFF -> client -> synctoken in one trace, each span the parent of the next."""

    def test_get_token_is_one_trace(
        self, traced_bff: BffProcess, otlp_receiver: OtlpReceiver, leak_watch: LeakWatch
    ) -> None:
        """The BFF's server span is the client span's parent, which is synctoken's span's parent; the log line names the trace."""
        response = httpx.get(f"{traced_bff.url}/token", params={"device": DEVICE}, timeout=10)
        assert response.status_code == httpx.codes.OK
        body = response.json()
        leak_watch.tokens.add(body["token"])
        # The app still saw the query: the token's Sync grant names the device as its endpoint.
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        assert claims["grants"]["data_sync"]["endpoint_id"] == DEVICE
        synctoken = wait_for(otlp_receiver, "synctoken", Span.SPAN_KIND_SERVER)
        client = wait_for(otlp_receiver, "synctoken-bff", Span.SPAN_KIND_CLIENT)
        # The server span ends after the response went out, so it may come in a later export than the client's.
        bff = [wait_for(otlp_receiver, "synctoken-bff", Span.SPAN_KIND_SERVER, synctoken.trace_id)]
        assert [s.span.name for s in bff] == ["GET /token"]
        assert client.span.name == ISSUE_SPAN
        assert synctoken.span.name == ISSUE_SPAN
        assert client.trace_id == synctoken.trace_id
        assert synctoken.span.parent_span_id == client.span.span_id
        assert client.span.parent_span_id == bff[0].span.span_id
        assert synctoken.attributes["synctoken.token_issued"] is True
        # No token, and no identity, anywhere in what either process exported.
        exported = otlp_receiver.exported_bytes()
        assert body["token"].encode() not in exported
        assert body["identity"].encode() not in exported
        # Nor the browser's device id (the query string), nor its address as a span attribute.
        assert DEVICE.encode() not in exported
        assert not {"net.peer.ip", "client.address", "http.client_ip"} & bff[0].attributes.keys()
        assert bff[0].attributes["http.target"] == "/token"
        traced_bff.proc.terminate()
        assert traced_bff.proc.wait(timeout=START_TIMEOUT) == 0
        log = traced_bff.stderr_path.read_text()
        assert f"token.served trace_id={synctoken.trace_id} token_id=" in log

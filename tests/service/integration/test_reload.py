"""Reloading the config of a running `synctoken serve`: on SIGHUP and on file change, good files and bad.

Real processes, real signals, real file swaps; every load is bounded in
calls and time. The snapshot's all-or-nothing rule is checked in process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest

from support.calls import channel, rpc_error
from support.configs import POLICY_TOML, config_text
from support.constants import API_SECRET, SERVICE_A, SERVICE_B, SERVICE_C
from support.files import replace_file, rewrite_in_place
from support.inprocess import ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port, serve
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.config.schema import load_config
from synctoken_server.rpc.snapshot import Snapshot

ASK_FOR_C = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(service_sid=SERVICE_C))
ASK_FOR_A = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(service_sid=SERVICE_A))
BFF_SERVICES = f'sync_services = ["{SERVICE_A}", "{SERVICE_B}"]'
GAINS_C = POLICY_TOML.replace(BFF_SERVICES, f'sync_services = ["{SERVICE_A}", "{SERVICE_B}", "{SERVICE_C}"]')
# Gains C too, but callers[2] is out of bounds: none of it may take effect.
BAD_POLICY = GAINS_C.replace('max_ttl = "24h"', 'max_ttl = "30h"')
NO_WATCH = 'watch_interval = "0s"'

Write = Callable[[Path, bytes], None]


@dataclass
class Reloadable:
    """A serving process and what a test needs to change its config."""

    pki: Pki
    process: Process
    port: int
    path: Path
    watch: LeakWatch

    def text(self, policy: str = POLICY_TOML, server: str = "", listen: int | None = None) -> str:
        """The suite's config on this port (or `listen`), with extra [server] lines and `policy`."""
        port = self.port if listen is None else listen
        return with_server_lines(config_text(self.pki, listen=f"127.0.0.1:{port}", policy=policy), server)

    def issue(self, request: pb.IssueTokenRequest) -> str:
        """IssueToken on a new connection; the token."""
        with channel(self.pki, self.port) as ch:
            token = token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(request, timeout=10).token
        self.watch.tokens.add(token)
        return token

    def refused(self, request: pb.IssueTokenRequest) -> str:
        """IssueToken on a new connection, which must fail; the ErrorInfo reason."""
        with channel(self.pki, self.port) as ch:
            _, info, _ = rpc_error(lambda: token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(request, timeout=10))
        return info.reason

    def hang_up(self) -> None:
        """Send SIGHUP, as `kill -HUP` or `systemctl reload` does."""
        self.process.proc.send_signal(signal.SIGHUP)


def with_server_lines(text: str, lines: str) -> str:
    """`text` with `lines` added to its [server] table."""
    return text.replace("[server]\n", f"[server]\n{lines}\n", 1)


@pytest.fixture
def start(pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> Callable[..., Reloadable]:
    """Start `synctoken serve` with extra [server] lines and `workers`; the config is tmp_path/synctoken.toml."""

    def start(server: str = "", workers: int = 1) -> Reloadable:
        port = free_port()
        text = with_server_lines(config_text(pki, listen=f"127.0.0.1:{port}"), server)
        process = serve(text, tmp_path, leak_watch, processes, workers)
        return Reloadable(pki, process, port, tmp_path / "synctoken.toml", leak_watch)

    return start


Start = Callable[..., Reloadable]


class TestGoodConfig:
    """A good file replaces the running config: the next call sees it."""

    @pytest.mark.parametrize("write", [replace_file, rewrite_in_place], ids=["os.replace", "in place"])
    def test_sighup(self, start: Start, write: Write) -> None:
        """With file watching off, a changed policy takes effect on SIGHUP, and the log says so."""
        server = start(NO_WATCH)
        assert server.refused(ASK_FOR_C) == "SERVICE_NOT_ALLOWED"
        write(server.path, server.text(GAINS_C, NO_WATCH).encode())
        server.hang_up()
        [reloaded] = server.process.wait_for_records("config.reloaded")
        assert (reloaded["trigger"], reloaded["callers"]) == ("SIGHUP", 3)
        assert server.issue(ASK_FOR_C)

    def test_a_sighup_flood(self, start: Start) -> None:
        """3000 SIGHUPs at once: the new policy is served, nothing on stderr, and SIGTERM still stops with status 0."""
        server = start(NO_WATCH)
        replace_file(server.path, server.text(GAINS_C, NO_WATCH).encode())
        for _ in range(3000):
            server.hang_up()
        server.process.wait_for_records("config.reloaded")
        assert server.issue(ASK_FOR_C)
        assert server.process.terminate() == 0
        assert server.process.stderr_path.read_text() == ""

    @pytest.mark.parametrize("write", [replace_file, rewrite_in_place], ids=["os.replace", "in place"])
    def test_file_change(self, start: Start, write: Write) -> None:
        """A changed config file is picked up by itself."""
        server = start()
        assert server.refused(ASK_FOR_C) == "SERVICE_NOT_ALLOWED"
        write(server.path, server.text(GAINS_C).encode())
        [reloaded] = server.process.wait_for_records("config.reloaded")
        assert reloaded["trigger"] == "file"
        assert server.issue(ASK_FOR_C)

    def test_named_file_change(self, start: Start, tmp_path: Path, leak_watch: LeakWatch) -> None:
        """A changed file the config names (here the API secret) is picked up too."""
        server = start()
        secret_file = tmp_path / "secret"
        secret_file.write_text(API_SECRET, encoding="utf-8")
        secret_file.chmod(0o600)
        text = server.text().replace("[twilio]\n", '[twilio]\napi_secret_file = "secret"\n')
        replace_file(server.path, text.encode())
        server.process.wait_for_records("config.reloaded")
        new_secret = "n3w-s3cr3t-" + "y" * 21
        leak_watch.secrets.add(new_secret)
        replace_file(secret_file, new_secret.encode())
        server.process.wait_for_records("config.reloaded", 2)
        assert jwt.decode(server.issue(ASK_FOR_A), new_secret, algorithms=["HS256"])["iss"]


class TestBadConfig:
    """A bad file changes nothing: the old policy keeps answering, and the log names the file and the key."""

    @pytest.mark.parametrize("trigger", ["SIGHUP", "file"])
    def test_bad_policy_keeps_the_old_one(self, start: Start, trigger: str) -> None:
        """The running policy answers as before; fixing the file then reloads it."""
        settings = NO_WATCH if trigger == "SIGHUP" else ""
        server = start(settings)
        replace_file(server.path, server.text(BAD_POLICY, settings).encode())
        if trigger == "SIGHUP":
            server.hang_up()
        [failed] = server.process.wait_for_records("config.reload_failed")
        assert (failed["trigger"], failed["file"], failed["key"], failed["problem"]) == (
            trigger,
            str(server.path),
            "callers[2].max_ttl",
            "30h is above the 24h limit",
        )
        assert server.issue(ASK_FOR_A)
        assert server.refused(ASK_FOR_C) == "SERVICE_NOT_ALLOWED"
        replace_file(server.path, server.text(GAINS_C, settings).encode())
        if trigger == "SIGHUP":
            server.hang_up()
        server.process.wait_for_records("config.reloaded")
        assert server.issue(ASK_FOR_C)

    def test_failed_reload_is_retried_when_a_named_file_appears(self, start: Start, tmp_path: Path) -> None:
        """A config naming a file that is not there yet fails, and loads once the file arrives."""
        server = start()
        text = server.text(GAINS_C).replace("[twilio]\n", '[twilio]\napi_secret_file = "secret"\n')
        replace_file(server.path, text.encode())
        [failed] = server.process.wait_for_records("config.reload_failed")
        assert (failed["key"], failed["problem"]) == (
            "twilio.api_secret_file",
            "cannot read the file it names: No such file or directory",
        )
        replace_file(tmp_path / "secret", API_SECRET.encode())
        server.process.wait_for_records("config.reloaded")
        assert server.issue(ASK_FOR_C)


class TestRestartOnly:
    """What only a restart can change."""

    def test_listen_change_is_refused_and_the_rest_applies(self, start: Start) -> None:
        """A new listen address is named as needing a restart; the policy change in the same file takes effect."""
        server = start()
        other = free_port()
        replace_file(server.path, server.text(GAINS_C, listen=other).encode())
        [pending] = server.process.wait_for_records("config.restart_required")
        assert (pending["key"], pending["running"], pending["configured"]) == (
            "server.listen",
            f"127.0.0.1:{server.port}",
            f"127.0.0.1:{other}",
        )
        server.process.wait_for_records("config.reloaded")
        assert server.issue(ASK_FOR_C)

    def test_mesh_socket_group_change_needs_a_restart(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """The socket's group is set when it is made: a new socket_group is named as needing a restart."""
        port = free_port()
        mesh = f'[mesh]\nlisten = "unix:{tmp_path}/m.sock"\ntrust_forwarded_client_cert = true\n'
        base = config_text(pki, listen=f"127.0.0.1:{port}")
        process = serve(mesh + base, tmp_path, leak_watch, processes, 1)
        replace_file(tmp_path / "synctoken.toml", (mesh + f"socket_group = {os.getegid()}\n" + base).encode())
        [pending] = process.wait_for_records("config.restart_required")
        assert (pending["key"], pending["running"], pending["configured"]) == (
            "mesh.socket_group",
            "(none)",
            str(os.getegid()),
        )
        process.wait_for_records("config.reloaded")

    def test_identity_source_change_is_refused_whole(self, start: Start, pki: Pki) -> None:
        """Switching to dns_san would make every caller id mean something else: nothing is reloaded."""
        server = start()
        dns_policy = f'[[callers]]\nid = "billing.internal.example.com"\nsync_services = ["{SERVICE_C}"]\n'
        text = config_text(
            pki, listen=f"127.0.0.1:{server.port}", identity='[identity]\nsource = "dns_san"\n', policy=dns_policy
        )
        replace_file(server.path, text.encode())
        [failed] = server.process.wait_for_records("config.reload_failed")
        assert failed["key"] == "identity.source"
        assert failed["problem"].startswith("changed from spiffe to dns_san, which needs a restart")
        assert server.issue(ASK_FOR_A)


class TestWorkers:
    """`serve --workers 2`: every worker reloads."""

    @pytest.mark.parametrize("trigger", ["SIGHUP", "file"])
    def test_every_worker_reloads(self, start: Start, trigger: str) -> None:
        """SIGHUP to the parent, or a changed file, reloads both workers; fresh connections all get the new policy."""
        settings = NO_WATCH if trigger == "SIGHUP" else ""
        server = start(settings, workers=2)
        replace_file(server.path, server.text(GAINS_C, settings).encode())
        if trigger == "SIGHUP":
            server.hang_up()
        reloaded = server.process.wait_for_records("config.reloaded", 2)
        assert sorted((r["worker"], r["trigger"]) for r in reloaded) == [(0, trigger), (1, trigger)]
        for _ in range(6):  # the kernel spreads new connections over both workers
            assert server.issue(ASK_FOR_C)


class TestSnapshot:
    """An RPC sees one snapshot from start to end, whatever a reload does meanwhile."""

    def test_swap_during_an_rpc(self, harness: ServerHarness, tmp_path: Path) -> None:
        """A swap after the caller is identified changes neither the policy nor the key that RPC uses."""
        old = load_config(harness.write_config(config_text(harness.pki)), environ={"TWILIO_API_SECRET": API_SECRET})
        path = tmp_path / "new.toml"
        path.write_text(config_text(harness.pki, policy=""), encoding="utf-8")
        new = load_config(path, environ={"TWILIO_API_SECRET": "an0ther-" + "z" * 24})
        running = harness.start_config(old)
        server = running._server
        first = Snapshot.of(old)

        @dataclasses.dataclass(frozen=True)
        class SwapWhileIdentifying:
            def caller_id(self, auth_context: object) -> str:
                server.snapshots.replace(Snapshot.of(new))
                return first.caller_rules.caller_id(auth_context)  # type: ignore[arg-type]

        server.snapshots.replace(dataclasses.replace(first, caller_rules=SwapWhileIdentifying()))  # type: ignore[arg-type]
        client = harness.client(running, "bff")
        response = client.issue(ASK_FOR_A)
        assert jwt.decode(response.token, API_SECRET, algorithms=["HS256"])["grants"]["data_sync"] == {
            "service_sid": SERVICE_A
        }
        error, info, _ = rpc_error(lambda: client.issue(ASK_FOR_A))
        assert (error.code(), info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")

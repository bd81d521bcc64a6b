"""Support for the client library's tests: certificate files to rotate, a clock to step, a scripted server, the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import grpc

from support.logcapture import LeakWatch
from support.pki import Pki
from synctoken.client import AsyncTokenClient, CallerIdentity, IssuedToken, TokenClient
from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.dev.pki import KeyPair

T = TypeVar("T")

ROTATED_ID = "spiffe://example.org/ns/chat/sa/rotated"
"""A second identity for rotation tests: the suite's policy allows it under spiffe://example.org/ns/chat/*."""


class SteppedClock:
    """A wall clock that moves only when told to: for stepping past refresh_after without sleeping."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, moment: dt.datetime) -> None:
        """Jump to `moment`."""
        self.now = moment


class AsyncDriver:
    """An AsyncTokenClient driven from test code on a private event loop that lives as long as the client.

    Lets one test body check both clients; the client is the real one.
    """

    def __init__(self, client: AsyncTokenClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop."""
        return self.loop.run_until_complete(coroutine)

    def issue_token(self, identity: str, **kwargs: Any) -> IssuedToken:
        return self.run(self.client.issue_token(identity, **kwargs))

    def get_token(self, identity: str, **kwargs: Any) -> IssuedToken:
        return self.run(self.client.get_token(identity, **kwargs))

    def whoami(self) -> CallerIdentity:
        return self.run(self.client.whoami())

    def close(self) -> None:
        """Close the client; the loop stays, for calls a test makes after closing."""
        self.run(self.client.close())

    def dispose(self) -> None:
        """Close the client, then its loop."""
        self.close()
        self.loop.close()


Driver = TokenClient | AsyncDriver


class ClientFiles(TypedDict):
    """The clients' three file arguments."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def client_kwargs(pki: Pki, cert: str) -> ClientFiles:
    """ca_file, cert_file and key_file for the suite's client certificate `cert`."""
    cert_file, key_file = pki.files(cert)
    return {"ca_file": pki.directory / "ca.pem", "cert_file": cert_file, "key_file": key_file}


def keep(watch: LeakWatch, *tokens: IssuedToken) -> None:
    """Add tokens to the session's leak check: none may ever show up in a log."""
    watch.tokens.update(t.token for t in tokens if t.token)


@dataclass
class RotatingFiles:
    """Client certificate files in a test's folder, replaced the ways rotation agents do it."""

    directory: Path
    ca_file: Path
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cert_file = self.directory / "tls.crt"
        self.key_file = self.directory / "tls.key"

    def kwargs(self) -> ClientFiles:
        """ca_file, cert_file and key_file, for a client's constructor."""
        return {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}

    def write_in_place(self, pair: KeyPair, pause: float = 0.0) -> None:
        """Rewrite both files in place (truncate and write), certificate first, `pause` seconds apart."""
        self.cert_file.write_bytes(pair.cert_pem)
        threading.Event().wait(pause)
        self.key_file.write_bytes(pair.key_pem)

    def write_by_rename(self, pair: KeyPair, pause: float = 0.0) -> None:
        """Write each file beside itself and rename it over the old one (a new inode), `pause` seconds apart."""
        for path, data in ((self.cert_file, pair.cert_pem), (self.key_file, pair.key_pem)):
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(data)
            temporary.replace(path)
            threading.Event().wait(pause)

    def swap_data_dir(self, pair: KeyPair, generation: int) -> None:
        """Kubernetes' atomic writer: files in a fresh folder, then one rename of the ..data symlink to it.

        The first call sets the layout up: tls.crt -> ..data/tls.crt, tls.key -> ..data/tls.key.
        """
        folder = self.directory / f"..gen-{generation}"
        folder.mkdir()
        (folder / "tls.crt").write_bytes(pair.cert_pem)
        (folder / "tls.key").write_bytes(pair.key_pem)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(folder.name)
        staged.replace(self.directory / "..data")
        for name in ("tls.crt", "tls.key"):
            link = self.directory / name
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to(Path("..data") / name)


def fresh_pair(pki: Pki, spiffe_id: str = ROTATED_ID) -> KeyPair:
    """A new client certificate and key from the suite's CA."""
    from synctoken_server.dev.pki import LeafSpec  # noqa: PLC0415 - test PKI, used here only

    return pki.ca.issue(LeafSpec("rotated", uris=(spiffe_id,)))


Handler = Callable[[bytes, grpc.ServicerContext], bytes]


class ScriptedServer:
    """A real gRPC server over the suite's mTLS whose TokenService methods do what a test says.

    For what synctoken cannot be made to do on cue: hold a call open, or
    answer with a status it does not send yet.
    """

    def __init__(self, pki: Pki, handlers: dict[str, Handler]) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=8)
        self._server = grpc.server(self._pool)
        methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("synctoken.v1.TokenService", methods),)
        )
        credentials = grpc.ssl_server_credentials(
            [(pki.server.key_pem, pki.server.cert_pem)], root_certificates=pki.ca.cert_pem, require_client_auth=True
        )
        self.port = self._server.add_secure_port("127.0.0.1:0", credentials)
        self._server.start()

    def close(self) -> None:
        """Stop at once, and wait for the threads."""
        self._server.stop(grace=None).wait(timeout=10)
        self._pool.shutdown(wait=True)


def peer_spiffe_id(context: grpc.ServicerContext) -> str:
    """The URI SAN of the client certificate this call came with."""
    auth: dict[str, list[bytes]] = context.auth_context()  # type: ignore[assignment]
    return auth["peer_spiffe_id"][0].decode()


def identity_response(caller_id: str) -> bytes:
    """A serialized GetCallerIdentityResponse naming `caller_id`."""
    return pb.GetCallerIdentityResponse(caller_id=caller_id).SerializeToString()


def env_for(pki: Pki, cert: str, target: str) -> dict[str, str]:
    """This process's environment plus SYNCTOKEN_* settings for `cert` against `target`."""
    paths = client_kwargs(pki, cert)
    return os.environ | {
        "SYNCTOKEN_TARGET": target,
        "SYNCTOKEN_CA_FILE": str(paths["ca_file"]),
        "SYNCTOKEN_CERT_FILE": str(paths["cert_file"]),
        "SYNCTOKEN_KEY_FILE": str(paths["key_file"]),
    }


CLIENT = str(Path(sys.executable).parent / "synctoken-client")


def run_client(
    *args: str, env: dict[str, str], watch: LeakWatch | None = None
) -> tuple[int, dict[str, object] | None, str]:
    """Run synctoken-client; return its exit code, stdout as JSON (None if empty), and stderr.

    A token printed on stdout is added to the session's leak check at once.
    """
    result = subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=60, check=False, env=env)
    out = json.loads(result.stdout) if result.stdout else None
    if watch is not None and out and out.get("token"):
        watch.tokens.add(str(out["token"]))
    return result.returncode, out, result.stderr


def client_flags(pki: Pki, cert: str, port: int) -> list[str]:
    """Connection flags for `cert` against localhost:`port`."""
    cert_file, key_file = pki.files(cert)
    return [
        "--target",
        f"localhost:{port}",
        "--ca",
        str(pki.directory / "ca.pem"),
        "--cert",
        str(cert_file),
        "--key",
        str(key_file),
    ]


def bare_env() -> dict[str, str]:
    """This process's environment without any SYNCTOKEN_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNCTOKEN_")}

"""Support for the BFF's tests: the app on a real uvicorn server on loopback in a thread, an HTTP client, and the command."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from support.clients import client_kwargs
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT as PROCESS_START_TIMEOUT
from support.processes import free_port
from synctoken.client import AsyncTokenClient
from synctoken_bff import Authenticate, Settings, create_app

START_TIMEOUT = 30
SESSION_SECRET = b"k" * 32


class RunningBff:
    """A BFF app served by uvicorn on 127.0.0.1, on its own event loop in a thread (as `synctoken-bff` would)."""

    def __init__(self, app: Starlette) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config=None: leave logging as the suite set it, so the leak check sees uvicorn's records too.
        config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="test-bff", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            assert self._thread.is_alive(), "the BFF stopped while starting"
            assert time.monotonic() < deadline, f"the BFF did not start within {START_TIMEOUT}s"
            time.sleep(0.02)

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def close(self) -> None:
        """Stop serving (the app's lifespan closes its client); a second call does nothing."""
        self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT)
        self._socket.close()


class Bff:
    """An HTTP client of a running BFF, with a cookie jar like a browser's, recording every token it receives."""

    def __init__(self, running: RunningBff, watch: LeakWatch) -> None:
        self.running = running
        self.http = httpx.Client(base_url=running.url, timeout=10)
        self._watch = watch

    def token(self, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
        """GET /token with these query parameters; the token goes to the session's leak check."""
        response = self.http.get("/token", params=params, headers=headers)
        if response.status_code == httpx.codes.OK:
            self._watch.tokens.add(response.json()["token"])
        return response

    def close(self) -> None:
        """Close the HTTP client and stop the BFF."""
        self.http.close()
        self.running.close()


class BffFactory:
    """Starts BFFs whose AsyncTokenClient calls synctoken at a port; `close` stops them all (a fixture's teardown)."""

    def __init__(self, pki: Pki, watch: LeakWatch) -> None:
        self._pki = pki
        self._watch = watch
        self._started: list[Bff] = []

    def __call__(
        self,
        port: int,
        cert: str = "bff",
        settings: Settings | None = None,
        authenticate: Authenticate | None = None,
        timeout: float = 5.0,
    ) -> Bff:
        """A BFF presenting `cert` to synctoken on `port`; settings default to a fixed session key."""
        client = AsyncTokenClient(f"localhost:{port}", **client_kwargs(self._pki, cert), timeout=timeout)
        app = create_app(client, settings or Settings(session_secret=SESSION_SECRET), authenticate)
        bff = Bff(RunningBff(app), self._watch)
        self._started.append(bff)
        return bff

    def close(self) -> None:
        """Stop every BFF started."""
        for bff in self._started:
            bff.close()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of an error response, after checking its shape (the Python BFF's, which the Express example shares) and that nothing is cached."""
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "reason", "message"}
    error: dict[str, Any] = body["error"]
    return error


SYNCTOKEN_BFF = str(Path(sys.executable).parent / "synctoken-bff")


class BffProcess:
    """synctoken-bff in a subprocess; its stdout and stderr go to files the leak check reads."""

    def __init__(self, env: dict[str, str], log_dir: Path, watch: LeakWatch) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / "bff-stderr.txt"
        stdout_path = log_dir / "bff-stdout.txt"
        watch.log_files += [stdout_path, self.stderr_path]
        with stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [SYNCTOKEN_BFF, "--host", "127.0.0.1", "--port", str(self.port)], stdout=out, stderr=err, env=env
            )

    def wait_until_serving(self) -> None:
        """Wait until /healthz answers."""
        deadline = time.monotonic() + PROCESS_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"synctoken-bff exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == httpx.codes.OK:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail(f"synctoken-bff did not serve within {PROCESS_START_TIMEOUT}s")

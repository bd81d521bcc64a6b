"""The guide's Express app ported to synctoken (clients/node), against a real server over mTLS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from client_support import env_for
from support import API_SECRET, SERVICE_A, START_TIMEOUT, LeakWatch, Pki, RunningServer, free_port

APP = Path(__file__).parent.parent / "clients/node/examples/express-bff/app.js"


class ExpressApp:
    """node app.js on a free loopback port; its stdout and stderr go to files the leak check reads."""

    def __init__(self, env: dict[str, str], log_dir: Path, watch: LeakWatch) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.stdout_path = log_dir / "express-stdout.txt"
        self.stderr_path = log_dir / "express-stderr.txt"
        watch.log_files += [self.stdout_path, self.stderr_path]
        env = env | {"PORT": self.url.rsplit(":", 1)[1]}
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(["node", str(APP)], stdout=out, stderr=err, env=env)  # noqa: S607 - node from PATH, as users run it
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in self.stdout_path.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"node exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            assert time.monotonic() < deadline, f"the Express app did not listen within {START_TIMEOUT}s"
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the app if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def express(pki: Pki, tmp_path: Path, leak_watch: LeakWatch) -> Iterator[Callable[[int, str], ExpressApp]]:
    """Start the Express app with `cert`'s certificate against a synctoken port; stopped at teardown."""
    started: list[ExpressApp] = []

    def start(port: int, cert: str = "bff") -> ExpressApp:
        app = ExpressApp(env_for(pki, cert, f"localhost:{port}"), tmp_path, leak_watch)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


class TestExpressBff:
    """GET /token as in the guide, the token now from synctoken."""

    def test_token_verifies(
        self, express: Callable[..., ExpressApp], shared_server: RunningServer, leak_watch: LeakWatch
    ) -> None:
        """The guide's response shape; the token verifies with the secret only synctoken holds, device included."""
        app = express(shared_server.port)
        response = httpx.get(f"{app.url}/token", params={"identity": "alice", "device": "tab-1"}, timeout=10)
        assert response.status_code == 200
        body = response.json()
        leak_watch.tokens.add(body["token"])
        assert set(body) == {"identity", "token"}
        assert body["identity"] == "alice"
        claims = jwt.decode(body["token"], API_SECRET, algorithms=["HS256"])
        assert claims["grants"] == {
            "identity": "alice",
            "data_sync": {"service_sid": SERVICE_A, "endpoint_id": "tab-1"},
        }

    @pytest.mark.parametrize(
        ("cert", "identity", "status", "code"),
        [
            ("bff", "", 400, "InvalidArgument"),
            ("stranger", "alice", 403, "PermissionDenied"),
            ("foreign_trust_domain", "alice", 502, "Unauthenticated"),
        ],
    )
    def test_refusals(
        self,
        express: Callable[..., ExpressApp],
        shared_server: RunningServer,
        cert: str,
        identity: str,
        status: int,
        code: str,
    ) -> None:
        """synctoken's refusals become HTTP statuses, as in the Python BFF."""
        app = express(shared_server.port, cert)
        response = httpx.get(f"{app.url}/token", params={"identity": identity}, timeout=10)
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


class TestReadme:
    """The example's README shows the route as it is."""

    def test_diff_matches_the_app(self) -> None:
        """Every added and context line of the before/after diff is a line of app.js."""
        readme = (APP.parent / "README.md").read_text(encoding="utf-8")
        diff = readme.split("```diff\n", 1)[1].split("```", 1)[0]
        app_lines = {line.strip() for line in APP.read_text(encoding="utf-8").splitlines()}
        kept = [line[1:].strip() for line in diff.splitlines() if line[:1] in {"+", " "}]
        assert kept
        assert [line for line in kept if line not in app_lines] == []

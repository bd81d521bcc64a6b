"""The guide's Express app ported to synctoken (clients/node), against a real server over mTLS."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from support.bff import error_of
from support.browser import PAGE, PROVIDER_DIST, chromium
from support.clients import env_for
from support.configs import POLICY_TOML, config_text
from support.constants import API_SECRET, BFF_ID, ROOT, SERVICE_A, SERVICE_C
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, free_port

APP = ROOT / "clients/node/examples/express-bff/app.js"
COOKIE_NAME = "synctoken_bff_identity"

# An app whose login is a header an auth proxy sets: the `authenticate` seam, filled in as a real app would.
HEADER_LOGIN_APP = f"""
import {{ createApp }} from "{APP.as_uri()}";
import {{ clientFromEnv }} from "{APP.parent.parent.parent.joinpath("src/client.js").as_uri()}";
const authenticate = (req) => req.get("x-authenticated-user") ?? null;
const server = createApp(clientFromEnv(), authenticate).listen(Number(process.env.PORT), "127.0.0.1", () => {{
  process.stdout.write(`listening on ${{server.address().port}}\\n`);
}});
"""


# The example app with the browser token provider's test page beside /token: the provider against the real route.
PROVIDER_PAGE_APP = f"""
import {{ createApp }} from "{APP.as_uri()}";
import {{ clientFromEnv }} from "{APP.parent.parent.parent.joinpath("src/client.js").as_uri()}";
import {{ anonymousSessions, sessionSecret }} from "{APP.parent.joinpath("session.js").as_uri()}";
const app = createApp(clientFromEnv(), anonymousSessions(sessionSecret()));
app.get("/", (req, res) => res.type("html").send({json.dumps(PAGE)}));
app.get("/provider.js", (req, res) => res.sendFile({json.dumps(str(PROVIDER_DIST))}));
const server = app.listen(Number(process.env.PORT), "127.0.0.1", () => {{
  process.stdout.write(`listening on ${{server.address().port}}\\n`);
}});
"""


class ExpressApp:
    """node running `script` on a free loopback port; its stdout and stderr go to files the leak check reads."""

    def __init__(self, script: Path, env: dict[str, str], log_dir: Path, watch: LeakWatch) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.stdout_path = log_dir / f"express-stdout-{id(self)}.txt"
        self.stderr_path = log_dir / f"express-stderr-{id(self)}.txt"
        watch.log_files += [self.stdout_path, self.stderr_path]
        self.watch = watch
        env = env | {"PORT": self.url.rsplit(":", 1)[1]}
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(["node", str(script)], stdout=out, stderr=err, env=env)  # noqa: S607 - node from PATH, as users run it
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in self.stdout_path.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"node exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            assert time.monotonic() < deadline, f"the Express app did not listen within {START_TIMEOUT}s"
            time.sleep(0.05)

    def get(self, client: httpx.Client | None = None, **params: str) -> httpx.Response:
        """GET /token (with `client`'s cookies, if given); any token in the answer joins the leak check."""
        url = f"{self.url}/token"
        response = client.get(url, params=params) if client else httpx.get(url, params=params, timeout=10)
        if response.status_code == 200:
            self.watch.tokens.add(response.json()["token"])
        return response

    def stop(self) -> None:
        """Kill the app if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


StartApp = Callable[..., ExpressApp]


@pytest.fixture
def express(pki: Pki, tmp_path: Path, leak_watch: LeakWatch) -> Iterator[StartApp]:
    """`express(port, cert="bff", script=APP, **env)`: the app against a synctoken port; stopped at teardown."""
    started: list[ExpressApp] = []

    def start(port: int, cert: str = "bff", script: Path = APP, **env: str) -> ExpressApp:
        app = ExpressApp(script, env_for(pki, cert, f"localhost:{port}") | env, tmp_path, leak_watch)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def rfc3339(seconds: int) -> str:
    """A JWT time claim as the Python BFF writes times."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def claims(token: str) -> dict[str, Any]:
    """The token's payload, its signature verified with the secret only synctoken holds."""
    return jwt.decode(token, API_SECRET, algorithms=["HS256"])


class TestIdentity:
    """The server decides the identity; the browser cannot name one."""

    def test_token_without_a_query(self, express: StartApp, shared_server: RunningServer) -> None:
        """GET /token alone: the guide's response shape, not cached, for the cookie's anonymous identity."""
        app = express(shared_server.port)
        response = app.get()
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert set(body) == {"identity", "token", "expires_at", "refresh_after"}
        assert body["identity"].startswith("anon-")
        # The Python BFF's times, which the browser's token provider reads: exp, and a refresh_after before it.
        issued = claims(body["token"])
        assert body["expires_at"] == rfc3339(issued["exp"])
        refresh_after = dt.datetime.fromisoformat(body["refresh_after"]).timestamp()
        assert issued["nbf"] < refresh_after < issued["exp"]
        assert body["refresh_after"].endswith("Z")
        assert claims(body["token"])["grants"] == {
            "identity": body["identity"],
            "data_sync": {"service_sid": SERVICE_A},
        }
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE_NAME}={body['identity']}.")
        assert "HttpOnly" in cookie
        assert "SameSite=Lax" in cookie

    def test_identity_in_the_query_is_refused(self, express: StartApp, shared_server: RunningServer) -> None:
        """?identity=alice gets no token, for alice or anyone, with or without a session."""
        app = express(shared_server.port)
        with httpx.Client(timeout=10) as browser:
            assert app.get(browser).status_code == 200
            for params in ({"identity": "alice"}, {"identity": ""}, {"identity": "alice", "device": "tab-1"}):
                response = app.get(browser, **params)
                assert response.status_code == 400
                error = error_of(response)
                assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "IDENTITY_NOT_ACCEPTED")
                assert "token" not in response.json()

    def test_each_browser_gets_its_own_identity(self, express: StartApp, shared_server: RunningServer) -> None:
        """Two requests without a cookie are two users."""
        app = express(shared_server.port)
        first, second = app.get().json()["identity"], app.get().json()["identity"]
        assert first != second

    def test_cookie_keeps_the_identity(self, express: StartApp, shared_server: RunningServer) -> None:
        """A browser that keeps its cookie keeps its identity, and a device becomes the endpoint id."""
        app = express(shared_server.port)
        with httpx.Client(timeout=10) as browser:
            identity = app.get(browser).json()["identity"]
            response = app.get(browser, device="tab-1")
        assert response.json()["identity"] == identity
        assert "set-cookie" not in response.headers
        assert claims(response.json()["token"])["grants"]["data_sync"]["endpoint_id"] == "tab-1"

    def test_forged_cookie_gets_a_new_identity(self, express: StartApp, shared_server: RunningServer) -> None:
        """A cookie naming alice without the server's signature is ignored: the browser becomes someone new."""
        app = express(shared_server.port)
        with httpx.Client(timeout=10) as browser:
            signed = app.get(browser).json()["identity"]
            value = browser.cookies[COOKIE_NAME]
            forged = "alice." + value.rsplit(".", 1)[1]
            response = httpx.get(f"{app.url}/token", cookies={COOKIE_NAME: forged}, timeout=10)
        app.watch.tokens.add(response.json()["token"])
        assert response.json()["identity"] not in {"alice", signed}

    def test_the_app_fills_in_authenticate(
        self, express: StartApp, shared_server: RunningServer, tmp_path: Path
    ) -> None:
        """createApp with the app's own login: its user gets the token, and no user is 401."""
        script = tmp_path / "header-login.mjs"
        script.write_text(HEADER_LOGIN_APP, encoding="utf-8")
        app = express(shared_server.port, script=script)
        response = httpx.get(f"{app.url}/token", headers={"x-authenticated-user": "user-7"}, timeout=10)
        app.watch.tokens.add(response.json()["token"])
        assert claims(response.json()["token"])["grants"]["identity"] == "user-7"
        assert "set-cookie" not in response.headers
        anonymous = app.get()
        assert anonymous.status_code == 401
        assert error_of(anonymous) == {"code": "UNAUTHENTICATED", "reason": "NO_USER", "message": "sign in first"}


# The Python BFF's fixed messages (clients/bff/src/synctoken_bff/_errors.py), word for word.
DENIED = "the token service does not allow this token"
BAD_SETTINGS = "the token service refused this server's settings"
REFUSED_CREDENTIALS = "the token service refused this server's credentials"
UNAVAILABLE = "the token service is unavailable; try again later"
RATE_LIMITED = "too many requests; try again later"


class TestRefusals:
    """synctoken's refusals become the Python BFF's statuses and fixed messages; only INVALID_ARGUMENT explains."""

    @pytest.mark.parametrize(
        ("cert", "env", "expected"),
        [
            ("stranger", {}, (403, "PERMISSION_DENIED", "CALLER_NOT_ALLOWED", DENIED)),
            ("bff", {"TWILIO_SYNC_SERVICE_SID": SERVICE_C}, (403, "PERMISSION_DENIED", "SERVICE_NOT_ALLOWED", DENIED)),
            ("bff", {"TWILIO_SYNC_SERVICE_SID": "IS123"}, (502, "INVALID_ARGUMENT", "INVALID_REQUEST", BAD_SETTINGS)),
            ("foreign_trust_domain", {}, (502, "UNAUTHENTICATED", "CALLER_UNAUTHENTICATED", REFUSED_CREDENTIALS)),
        ],
        ids=["caller not allowed", "service not allowed", "malformed service setting", "certificate refused"],
    )
    def test_fixed_messages(
        self,
        express: StartApp,
        shared_server: RunningServer,
        cert: str,
        env: dict[str, str],
        expected: tuple[int, str, str, str],
    ) -> None:
        """The status, code and reason are synctoken's; the message is the BFF's own, never synctoken's text."""
        status, code, reason, message = expected
        response = express(shared_server.port, cert, **env).get()
        assert response.status_code == status
        assert error_of(response) == {"code": code, "reason": reason, "message": message}

    def test_bad_settings_are_an_operator_error(self, express: StartApp, shared_server: RunningServer) -> None:
        """A setting synctoken refuses is logged as the operator's error, with synctoken's words."""
        app = express(shared_server.port, TWILIO_SYNC_SERVICE_SID="IS123")
        assert app.get().status_code == 502
        log = app.stderr_path.read_text()
        assert "ERROR token.refused status=502 code=INVALID_ARGUMENT" in log
        assert "service_sid" in log

    def test_browser_input_explains_itself(self, express: StartApp, shared_server: RunningServer) -> None:
        """A device synctoken refuses is the browser's own mistake: 400 with synctoken's message."""
        app = express(shared_server.port)
        response = app.get(device="tab\u00a01")
        assert response.status_code == 400
        error = error_of(response)
        assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "INVALID_REQUEST")
        assert "U+00A0 NO-BREAK SPACE" in error["message"]

    def test_device_twice_is_refused(self, express: StartApp, shared_server: RunningServer) -> None:
        """?device= given twice is refused before synctoken is asked."""
        app = express(shared_server.port)
        response = httpx.get(f"{app.url}/token?device=a&device=b", timeout=10)
        assert response.status_code == 400
        assert error_of(response)["message"] == "device is given more than once"

    def test_no_server_is_503(self, express: StartApp) -> None:
        """With nothing listening, the browser gets 503 and the fixed message."""
        app = express(free_port(), SYNCTOKEN_TIMEOUT="1")
        response = app.get()
        assert response.status_code == 503
        error = error_of(response)
        assert error["code"] in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
        assert error["message"] == UNAVAILABLE

    def test_rate_limit_is_429_with_retry_after(self, express: StartApp, harness: ServerHarness, pki: Pki) -> None:
        """synctoken's rate limit is 429 with the fixed message and Retry-After from its RetryInfo."""
        policy = POLICY_TOML.replace(f'id = "{BFF_ID}"', f'id = "{BFF_ID}"\nrate = 0.01\nburst = 1', 1)
        server = harness.start(config_text(pki, policy=policy))
        app = express(server.port)
        assert app.get().status_code == 200
        response = app.get()
        assert response.status_code == 429
        assert error_of(response) == {"code": "RESOURCE_EXHAUSTED", "reason": "RATE_LIMITED", "message": RATE_LIMITED}
        assert int(response.headers["retry-after"]) >= 1


class TestBrowserProvider:
    """The browser's token provider (clients/browser) runs on the example's /token as on the Python BFF's."""

    @pytest.mark.slow
    def test_provider_fetches_and_refreshes(
        self, express: StartApp, shared_server: RunningServer, tmp_path: Path, leak_watch: LeakWatch
    ) -> None:
        """In Chromium the provider gets a token, is fresh, and fetches the next one past refresh_after."""
        script = tmp_path / "provider-page.mjs"
        script.write_text(PROVIDER_PAGE_APP, encoding="utf-8")
        app = express(shared_server.port, script=script)
        with chromium(tmp_path / "profile") as context:
            page = context.new_page()
            page.clock.install()
            with page.expect_response(lambda r: r.url.endswith("/token")) as answered:
                page.goto(app.url)
            first = answered.value.json()
            leak_watch.tokens.add(first["token"])
            page.wait_for_function("window.seen !== undefined && window.seen.tokens.length === 1")
            assert page.evaluate("window.provider.state") == "fresh"
            assert page.evaluate("window.seen.tokens[0]") == first["token"]
            due = dt.datetime.fromisoformat(first["refresh_after"]).timestamp() * 1000
            with page.expect_response(lambda r: r.url.endswith("/token")) as refreshed:
                page.clock.run_for(int(due - page.evaluate("Date.now()")) + 2000)
            leak_watch.tokens.add(refreshed.value.json()["token"])
            page.wait_for_function("window.seen.tokens.length === 2 && window.provider.state === 'fresh'")
            assert claims(page.evaluate("window.seen.tokens[1]"))["grants"]["identity"] == first["identity"]


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

    def test_readme_does_not_take_the_identity_from_the_query(self) -> None:
        """Neither README says the identity comes from the query string, and the example's command sends none."""
        root = APP.parents[4]
        for readme in (APP.parent / "README.md", root / "README.md"):
            assert "identity comes from the query string" not in readme.read_text(encoding="utf-8")
        example = (APP.parent / "README.md").read_text(encoding="utf-8")
        command = example.split("```sh\n", 1)[1].split("```", 1)[0]
        assert "identity=" not in command

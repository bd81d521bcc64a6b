"""The Starlette BFF against a real synctoken server over mTLS: GET /token, its cookie, its errors, its settings."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.requests import Request

from support.bff import SESSION_SECRET, Bff, BffFactory, RunningBff, error_of
from support.constants import API_SECRET, SERVICE_A, SERVICE_B, SERVICE_C
from support.inprocess import RunningServer
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from support.processes import free_port
from synctoken.client import IssuedToken, RateLimited, SynctokenError, Unavailable
from synctoken_bff import Settings, create_app
from synctoken_bff._durations import parse_duration
from synctoken_bff._session import COOKIE_NAME

MakeBff = Callable[..., Bff]


@pytest.fixture
def make_bff(pki: Pki, leak_watch: LeakWatch) -> Iterator[MakeBff]:
    """Start BFFs: `make_bff(port, cert="bff", settings=None, authenticate=None, timeout=5.0)`; stopped at teardown."""
    factory = BffFactory(pki, leak_watch)
    yield factory
    factory.close()


def claims(token: str) -> dict[str, Any]:
    """The token's payload, its signature verified with the suite's API secret."""
    return jwt.decode(token, API_SECRET, algorithms=["HS256"])


def rfc3339(seconds: int) -> str:
    """A JWT time claim as the BFF writes times."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def audit_records(sink: LogSink, identity: str) -> list[dict[str, Any]]:
    """The server's IssueToken audit records for `identity`: one per RPC that reached it."""
    return [r for r in sink.records() if r["event"] == "token.decision" and r.get("identity") == identity]


class TestToken:
    """GET /token: a verifying token for the browser's identity, kept in a signed cookie."""

    def test_token_verifies_for_the_cookies_identity(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """The token is signed with the secret, names the identity, and the body's times are its claims."""
        response = make_bff(shared_server.port).token()
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert "access-control-allow-origin" not in response.headers
        body = response.json()
        assert set(body) == {"identity", "token", "expires_at", "refresh_after"}
        payload = claims(body["token"])
        assert payload["grants"] == {"identity": body["identity"], "data_sync": {"service_sid": SERVICE_A}}
        assert body["identity"].startswith("anon-")
        assert response.cookies[COOKIE_NAME].startswith(body["identity"] + ".")
        assert body["expires_at"] == rfc3339(payload["exp"])
        assert rfc3339(payload["nbf"]) <= body["refresh_after"] <= rfc3339(payload["exp"] - 180)

    def test_cookie_is_http_only_and_same_site_lax(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """The identity cookie is out of scripts' reach, not sent on cross-site subrequests, and not Secure over http."""
        cookie = make_bff(shared_server.port).token().headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
        assert "secure" not in cookie

    def test_cookie_is_secure_over_https(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """Behind a TLS proxy on loopback (X-Forwarded-Proto: https), the cookie is Secure."""
        response = make_bff(shared_server.port).token(headers={"x-forwarded-proto": "https"})
        assert "secure" in response.headers["set-cookie"].lower()

    def test_identity_is_stable_with_the_cookie(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """A browser keeps its identity across requests; one without the cookie gets another identity."""
        bff = make_bff(shared_server.port)
        first = bff.token().json()["identity"]
        again = bff.token()
        assert again.json()["identity"] == first
        assert "set-cookie" not in again.headers
        bff.http.cookies.clear()
        assert bff.token().json()["identity"] != first

    @pytest.mark.parametrize(
        "tamper",
        [
            lambda _identity, signature: f"anon-someone-else.{signature}",
            lambda identity, signature: f"{identity}.{signature[:-2]}AA",
            lambda identity, _signature: identity,
            lambda identity, _signature: f"{identity}.!!!",
        ],
        ids=["other identity", "other signature", "no signature", "signature not base64"],
    )
    def test_tampered_cookie_is_refused(
        self, make_bff: MakeBff, shared_server: RunningServer, tamper: Callable[[str, str], str]
    ) -> None:
        """A cookie whose signature does not hold is ignored: the browser gets a new identity and cookie."""
        bff = make_bff(shared_server.port)
        first = bff.token().json()["identity"]
        identity, _, signature = bff.http.cookies[COOKIE_NAME].rpartition(".")
        bff.http.cookies.clear()
        forged = tamper(identity, signature)
        bff.http.cookies.set(COOKIE_NAME, forged, domain="127.0.0.1")
        response = bff.token()
        assert response.json()["identity"] not in {first, "anon-someone-else"}
        assert COOKIE_NAME in response.headers["set-cookie"]

    def test_device_becomes_endpoint_id(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """?device=ID reaches the Sync grant's endpoint_id, as in Twilio's guide."""
        body = make_bff(shared_server.port).token(device="browser-7").json()
        assert claims(body["token"])["grants"]["data_sync"]["endpoint_id"] == "browser-7"

    def test_second_request_reuses_the_token(
        self, make_bff: MakeBff, shared_server: RunningServer, log_sink: LogSink
    ) -> None:
        """Within refresh_after a reload gets the cached token: one RPC, one audit record."""
        bff = make_bff(shared_server.port)
        first = bff.token().json()
        assert bff.token().json() == first
        assert len(audit_records(log_sink, first["identity"])) == 1

    def test_service_and_ttl_settings(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """BFF_SYNC_SERVICE_SID and BFF_TOKEN_TTL replace the caller's defaults."""
        settings = Settings(SESSION_SECRET, sync_service_sid=SERVICE_B, token_ttl=dt.timedelta(seconds=200))
        payload = claims(make_bff(shared_server.port, settings=settings).token().json()["token"])
        assert payload["grants"]["data_sync"]["service_sid"] == SERVICE_B
        assert payload["exp"] - payload["nbf"] == 200

    def test_custom_authenticator(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """An authenticate function decides the identity, may be async, and no demo cookie is set."""

        async def login(request: Request) -> str | None:
            return request.headers.get("x-user")

        bff = make_bff(shared_server.port, authenticate=login)
        response = bff.token(headers={"x-user": "carol@example.com"})
        body = response.json()
        assert body["identity"] == "carol@example.com"
        assert "set-cookie" not in response.headers
        claims(body["token"])


class TestErrors:
    """Each refusal becomes its HTTP status, with synctoken's code and reason in the body."""

    def test_no_user_is_401(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """An authenticator that finds no user gets 401, and synctoken is not asked."""
        response = make_bff(shared_server.port, authenticate=lambda _: None).token()
        assert response.status_code == 401
        assert error_of(response)["reason"] == "NO_USER"

    @pytest.mark.parametrize(
        ("identity", "settings", "status", "reason"),
        [
            (" alice", Settings(SESSION_SECRET), 400, "INVALID_REQUEST"),
            ("alice", Settings(SESSION_SECRET, sync_service_sid=SERVICE_C), 403, "SERVICE_NOT_ALLOWED"),
        ],
        ids=["identity with a leading space", "service not allowed"],
    )
    def test_policy_refusals(
        self,
        make_bff: MakeBff,
        shared_server: RunningServer,
        identity: str,
        settings: Settings,
        status: int,
        reason: str,
    ) -> None:
        """synctoken's INVALID_ARGUMENT is 400 and PERMISSION_DENIED 403; only the former explains itself."""
        response = make_bff(shared_server.port, settings=settings, authenticate=lambda _: identity).token()
        assert response.status_code == status
        error = error_of(response)
        assert error["reason"] == reason
        if status == 400:
            assert error["code"] == "INVALID_ARGUMENT"
            assert error["message"] != ""
        else:
            assert error["code"] == "PERMISSION_DENIED"
            assert error["message"] == "the token service does not allow this token"

    def test_identity_pattern_is_403(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """An anonymous identity from a caller whose policy wants user-N is refused with 403."""
        settings = Settings(SESSION_SECRET, sync_service_sid=SERVICE_B)
        response = make_bff(shared_server.port, cert="chat_worker", settings=settings).token()
        assert response.status_code == 403
        assert error_of(response)["reason"] == "IDENTITY_NOT_ALLOWED"

    def test_no_server_is_503(self, make_bff: MakeBff) -> None:
        """With nothing listening, the call fails within its timeout and the browser gets 503."""
        started = time.monotonic()
        response = make_bff(free_port(), timeout=1.0).token()
        assert time.monotonic() - started < 5
        assert response.status_code == 503
        assert error_of(response)["code"] in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}

    def test_refused_certificate_is_502(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """synctoken refusing the BFF's own certificate is the BFF's fault upstream: 502."""
        response = make_bff(shared_server.port, cert="foreign_trust_domain").token()
        assert response.status_code == 502
        error = error_of(response)
        assert (error["code"], error["reason"]) == ("UNAUTHENTICATED", "CALLER_UNAUTHENTICATED")
        assert "evil.example" not in error["message"]


class _Refusing:
    """A token source that always raises one error: for the Retry-After rules, which no real policy triggers."""

    def __init__(self, error: SynctokenError) -> None:
        self._error = error

    async def get_token(
        self,
        identity: str,  # noqa: ARG002 - TokenSource's signature; every call fails alike
        *,
        service_sid: str = "",  # noqa: ARG002
        endpoint_id: str = "",  # noqa: ARG002
        ttl: dt.timedelta | None = None,  # noqa: ARG002
    ) -> IssuedToken:
        raise self._error

    async def close(self) -> None:
        pass


class TestRetryAfter:
    """429 and 503 carry Retry-After when synctoken's RetryInfo says when, rounded up to whole seconds; others never."""

    @pytest.mark.parametrize(
        ("error", "status", "retry_after"),
        [
            (
                RateLimited(
                    RateLimited.codes[0], "slow down", reason="RATE_LIMITED", retry_after=dt.timedelta(seconds=2.5)
                ),
                429,
                "3",
            ),
            # Without synctoken's RATE_LIMITED reason it is gRPC refusing a size: no point in waiting.
            (RateLimited(RateLimited.codes[0], "too big", retry_after=dt.timedelta(seconds=2)), 502, None),
            (Unavailable(Unavailable.codes[0], "down", retry_after=dt.timedelta(seconds=10)), 503, "10"),
            (Unavailable(Unavailable.codes[0], "down", retry_after=dt.timedelta(milliseconds=1)), 503, "1"),
            (Unavailable(Unavailable.codes[0], "down"), 503, None),
        ],
        ids=["429 rounded up", "resource exhausted but not rate limited", "503", "at least one second", "no RetryInfo"],
    )
    def test_retry_after(
        self, leak_watch: LeakWatch, error: SynctokenError, status: int, retry_after: str | None
    ) -> None:
        """The header is there exactly when RetryInfo was."""
        bff = Bff(RunningBff(create_app(_Refusing(error), Settings(SESSION_SECRET))), leak_watch)
        try:
            response = bff.token()
        finally:
            bff.close()
        assert response.status_code == status
        assert response.headers.get("retry-after") == retry_after


class TestServing:
    """The routes beside /token: health, the page, and CORS only when configured."""

    def test_healthz(self, make_bff: MakeBff) -> None:
        """/healthz answers 200 without asking synctoken (here, there is none)."""
        response = make_bff(free_port()).http.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    def test_page_and_bundle_are_served(self, make_bff: MakeBff) -> None:
        """/ is the demo page, and the bundle it loads (with the Sync SDK inside) is served beside it."""
        bff = make_bff(free_port())
        page = bff.http.get("/")
        assert page.status_code == 200
        assert '<script type="module" src="page.js">' in page.text
        bundle = bff.http.get("/page.js")
        assert bundle.status_code == 200
        assert "javascript" in bundle.headers["content-type"]
        assert "tokenAboutToExpire" in bundle.text


class TestSettings:
    """BFF_* variables: durations as in the server's config, a session key of at least 32 bytes."""

    @pytest.mark.parametrize(
        ("text", "seconds"), [("200s", 200), ("30m", 1800), ("1h30m", 5400), ("2h", 7200), ("1h0m5s", 3605)]
    )
    def test_durations(self, text: str, seconds: int) -> None:
        """Whole units, largest first."""
        assert parse_duration(text, "BFF_TOKEN_TTL") == dt.timedelta(seconds=seconds)

    @pytest.mark.parametrize("text", ["", "200", "1.5m", "30m1h", "5m5m", "0s", "-5s", "5 m", "1d"])
    def test_bad_durations(self, text: str) -> None:
        """Anything else names the variable."""
        with pytest.raises(ValueError, match="BFF_TOKEN_TTL"):
            parse_duration(text, "BFF_TOKEN_TTL")

    def test_durations_take_ascii_digits_only(self) -> None:
        """A full-width digit is refused, as the server's config and synctoken-client --ttl refuse it."""
        with pytest.raises(ValueError, match="BFF_TOKEN_TTL must be a duration like"):
            parse_duration("\uff15m", "BFF_TOKEN_TTL")

    def test_from_env(self, tmp_path: Path) -> None:
        """Every variable read, the secret from its file without the final newline."""
        secret = tmp_path / "session.key"
        secret.write_bytes(b"s" * 40 + b"\n")
        settings = Settings.from_env(
            {
                "BFF_SESSION_SECRET_FILE": str(secret),
                "BFF_SYNC_SERVICE_SID": SERVICE_B,
                "BFF_TOKEN_TTL": "30m",
                "BFF_ALLOWED_ORIGINS": "https://a.example.com, https://b.example.com",
            }
        )
        assert settings == Settings(
            b"s" * 40, SERVICE_B, dt.timedelta(minutes=30), ("https://a.example.com", "https://b.example.com")
        )
        assert "sss" not in repr(settings)

    def test_short_secret_is_refused(self, tmp_path: Path) -> None:
        """A session key under 32 bytes could be guessed from one cookie."""
        secret = tmp_path / "session.key"
        secret.write_bytes(b"short")
        with pytest.raises(ValueError, match="holds 5 bytes; at least 32 are needed"):
            Settings.from_env({"BFF_SESSION_SECRET_FILE": str(secret)})

    def test_random_secret_warns_only_for_the_demo_authenticator(self, caplog: pytest.LogCaptureFixture) -> None:
        """Without a secret file the demo's cookies are signed with a per-process key, said when the app is made."""
        with caplog.at_level(logging.WARNING, logger="synctoken_bff"):
            settings = Settings.from_env({})
            assert settings.session_secret is None
            assert caplog.text == ""
            create_app(_Refusing(Unavailable(Unavailable.codes[0], "down")), settings, authenticate=lambda _: "alice")
            assert caplog.text == ""
            create_app(_Refusing(Unavailable(Unavailable.codes[0], "down")), settings)
        assert "BFF_SESSION_SECRET_FILE is not set" in caplog.text

"""The BFF's defences: exact-origin CORS, no plain identities in its log, bounded anonymous identities, input limits.

Against real synctoken servers over mTLS and real uvicorn on loopback, as test_bff.py.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bff import SESSION_SECRET, Bff, BffFactory
from support.configs import POLICY_TOML, config_text
from support.constants import BFF_ID, SERVICE_C
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from synctoken.audithash import IdentityHasher
from synctoken_bff import NewIdentityLimit, Settings
from synctoken_bff._addresslimit import AddressLimiter
from synctoken_bff._identityhash import key_from_file
from synctoken_bff._session import COOKIE_NAME
from synctoken_server.config.audit import hasher_from_key_file

MakeBff = Callable[..., Bff]
HASH_KEY = b"audit-key-" + b"x" * 30


@pytest.fixture
def make_bff(pki: Pki, leak_watch: LeakWatch) -> Iterator[MakeBff]:
    """Start BFFs: `make_bff(port, cert="bff", settings=None, authenticate=None, timeout=5.0)`; stopped at teardown."""
    factory = BffFactory(pki, leak_watch)
    yield factory
    factory.close()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of an error response, after checking its shape and that nothing is cached."""
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    return error


def audit_count(sink: LogSink, identity: str) -> int:
    """How many IssueToken decisions the in-process servers logged for `identity`."""
    return sum(1 for r in sink.records() if r["event"] == "token.decision" and r.get("identity") == identity)


def vary(response: httpx.Response) -> set[str]:
    """The header names in Vary, lower case."""
    return {v.strip().lower() for v in response.headers.get("vary", "").split(",") if v.strip()}


ALLOWED = ("https://app.example.com", "http://localhost:3000")
LOOKALIKES = [
    "https://app.example.com.evil.example",  # allowed one as a prefix
    "https://evilapp.example.com",  # allowed host as a suffix
    "https://evil.app.example.com",  # a subdomain of it
    "https://app.example.co",  # a prefix of it
    "http://app.example.com",  # other scheme
    "https://app.example.com:8443",  # other port
    "http://localhost:3001",
    "https://localhost:3000",
    "null",  # sandboxed iframes, file: pages
    "https://app.example.com/",  # not what a browser sends
    "*",
]


class TestCors:
    """Credentialed CORS only for exactly the configured origins; Vary: Origin on every answer that depends on it."""

    @pytest.fixture
    def bff(self, make_bff: MakeBff, shared_server: RunningServer) -> Bff:
        """A BFF allowing ALLOWED, whose client already holds its identity cookie (so requests are credentialed)."""
        bff = make_bff(shared_server.port, settings=Settings(SESSION_SECRET, allowed_origins=ALLOWED))
        assert bff.token().status_code == httpx.codes.OK
        assert COOKIE_NAME in bff.http.cookies
        return bff

    @pytest.mark.parametrize("origin", ALLOWED)
    def test_allowed_origin_gets_credentialed_cors(self, bff: Bff, origin: str) -> None:
        """An allowed origin is echoed with credentials, and sees Date and Retry-After, on a token and a refusal alike."""
        for response in (
            bff.token(headers={"origin": origin}),
            bff.token(headers={"origin": origin}, device="x" * 300),
        ):
            assert response.headers["access-control-allow-origin"] == origin
            assert response.headers["access-control-allow-credentials"] == "true"
            assert response.headers["access-control-expose-headers"] == "Date, Retry-After"
            assert "origin" in vary(response)

    @pytest.mark.parametrize("origin", LOOKALIKES)
    def test_other_origin_gets_no_cors(self, bff: Bff, origin: str) -> None:
        """A lookalike or null origin, sending the cookie, gets no CORS header at all, but Vary: Origin."""
        response = bff.token(headers={"origin": origin})
        assert response.status_code == httpx.codes.OK  # served, but the browser will not show it to that page
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-credentials" not in response.headers
        assert "access-control-expose-headers" not in response.headers
        assert "origin" in vary(response)

    def test_no_origin_still_varies(self, bff: Bff) -> None:
        """A same-origin request: no CORS headers, and Vary: Origin so that no cache hands it to another origin."""
        response = bff.token()
        assert "access-control-allow-origin" not in response.headers
        assert "origin" in vary(response)

    @pytest.mark.parametrize("origin", ALLOWED)
    def test_preflight_from_allowed_origin(self, bff: Bff, origin: str) -> None:
        """OPTIONS with a GET from an allowed origin: 204 with the credentialed go-ahead."""
        response = bff.http.options("/token", headers={"origin": origin, "access-control-request-method": "GET"})
        assert response.status_code == httpx.codes.NO_CONTENT
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert response.headers["access-control-allow-methods"] == "GET"
        assert "origin" in vary(response)

    @pytest.mark.parametrize("origin", LOOKALIKES)
    def test_preflight_from_other_origin(self, bff: Bff, origin: str) -> None:
        """A preflight from anyone else is refused, without a CORS header."""
        response = bff.http.options("/token", headers={"origin": origin, "access-control-request-method": "GET"})
        assert response.status_code == httpx.codes.FORBIDDEN
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-credentials" not in response.headers
        assert "origin" in vary(response)

    @pytest.mark.parametrize(
        "headers",
        [
            {"access-control-request-method": "POST"},
            {"access-control-request-method": "DELETE"},
            {"access-control-request-method": "GET", "access-control-request-headers": "x-user"},
            {},
        ],
        ids=["POST", "DELETE", "extra header", "no method"],
    )
    def test_preflight_for_more_than_a_plain_get(self, bff: Bff, headers: dict[str, str]) -> None:
        """Even an allowed origin gets no go-ahead for another method or for extra request headers."""
        response = bff.http.options("/token", headers={"origin": ALLOWED[0], **headers})
        assert response.status_code == httpx.codes.FORBIDDEN
        assert "access-control-allow-origin" not in response.headers

    def test_without_origins_no_cors(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """No BFF_ALLOWED_ORIGINS: no CORS header for any origin, and no preflight answered."""
        bff = make_bff(shared_server.port)
        for origin in (*ALLOWED, "null"):
            response = bff.token(headers={"origin": origin})
            assert "access-control-allow-origin" not in response.headers
            assert "access-control-allow-credentials" not in response.headers
        preflight = bff.http.options("/token", headers={"origin": ALLOWED[0], "access-control-request-method": "GET"})
        assert preflight.status_code == httpx.codes.METHOD_NOT_ALLOWED
        assert "access-control-allow-origin" not in preflight.headers

    @pytest.mark.parametrize(
        ("given", "origin"),
        [
            ("HTTPS://App.Example.COM", "https://app.example.com"),
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://app.example.com:80", "http://app.example.com"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("https://app.example.com:80", "https://app.example.com:80"),
            ("http://[2001:DB8:0:0:0:0:0:1]:8080", "http://[2001:db8::1]:8080"),
            ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
            ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        ],
    )
    def test_origins_are_normalised_as_browsers_send_them(self, given: str, origin: str) -> None:
        """Scheme and host in lower case, no default port, IPv6 compressed: the Origin header's own form."""
        assert Settings.from_env({"BFF_ALLOWED_ORIGINS": given}).allowed_origins == (origin,)

    def test_normalised_origin_is_matched(self, make_bff: MakeBff, shared_server: RunningServer) -> None:
        """An origin configured with its default port and capitals matches the browser's serialisation."""
        settings = Settings.from_env({"BFF_ALLOWED_ORIGINS": "HTTPS://App.Example.com:443"})
        response = make_bff(shared_server.port, settings=settings).token(headers={"origin": "https://app.example.com"})
        assert response.headers["access-control-allow-origin"] == "https://app.example.com"

    @pytest.mark.parametrize(
        ("given", "why"),
        [
            ("*", "wildcard"),
            ("https://*.example.com", "wildcard"),
            ("https://app.example.*", "wildcard"),
            ("null", "sandboxed"),
            ("NULL", "sandboxed"),
            ("https://app.example.com/", "trailing slash"),
            ("https://app.example.com/app", "path"),
            ("https://user@app.example.com", "user name"),
            ("https://user:pw@app.example.com", "user name"),
            ("https://app.example.com?x=1", "query"),
            ("https://app.example.com#top", "fragment"),
            ("app.example.com", "no scheme"),
            ("ftp://app.example.com", "not an http or https origin"),
            ("https://bücher.example", "non-ASCII"),
            ("https://app.example.com:99999", "port outside"),
            ("https://app.example.com:0", "port outside"),
            ("https://app_example.com", "not an origin"),
            ("https://", "not an origin"),
            ("https://app.example.com:", "not an origin"),
            ("https://[::g]", "not an origin"),
            ("https://[1:2]", "not an IPv6 address"),
            (".example.com", "no scheme"),
        ],
    )
    def test_inexact_origins_are_refused(self, given: str, why: str) -> None:
        """Anything that is not one exact origin is refused when the settings are read, and made."""
        with pytest.raises(ValueError, match=f"BFF_ALLOWED_ORIGINS: .*{why}"):
            Settings.from_env({"BFF_ALLOWED_ORIGINS": f"https://ok.example.com,{given}"})
        with pytest.raises(ValueError, match="BFF_ALLOWED_ORIGINS"):
            Settings(SESSION_SECRET, allowed_origins=(given,))


class TestPrivateLog:
    """The BFF's log names an end user only by synctoken's private-audit hash, and not at all without a key."""

    def test_hash_is_hmac_sha256_cut_to_128_bits(self) -> None:
        """The one formula the BFF and the audit share, pinned by RFC 4231's first HMAC-SHA-256 test vector."""
        assert IdentityHasher(b"\x0b" * 20)("Hi There") == "h:b0344c61d8db38535ca8afceaf0bf12b"
        assert "0b0b" not in repr(IdentityHasher(b"\x0b" * 20))

    @pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"  "], ids=["none", "newline", "crlf", "spaces"])
    def test_key_file_is_read_as_the_server_reads_it(self, tmp_path: Path, ending: bytes) -> None:
        """One key file serves both: the BFF takes the same bytes from it as `synctoken audit-hash --key-file`."""
        path = tmp_path / "audit.key"
        path.write_bytes(HASH_KEY + ending)
        servers = hasher_from_key_file(path)
        assert IdentityHasher(key_from_file(str(path), "BFF_IDENTITY_HASH_KEY_FILE"))("alice") == servers("alice")
        key = Settings.from_env({"BFF_IDENTITY_HASH_KEY_FILE": str(path)}).identity_hash_key
        assert key is not None
        assert IdentityHasher(key)("alice") == servers("alice")

    def test_short_or_missing_key_file_is_refused(self, tmp_path: Path) -> None:
        """A key under 32 bytes, or a file that cannot be read, names the variable."""
        short = tmp_path / "short.key"
        short.write_bytes(b"k" * 31 + b"\n")
        with pytest.raises(ValueError, match=r"BFF_IDENTITY_HASH_KEY_FILE: .* 31 bytes; use at least 32"):
            Settings.from_env({"BFF_IDENTITY_HASH_KEY_FILE": str(short)})
        with pytest.raises(ValueError, match="BFF_IDENTITY_HASH_KEY_FILE: cannot read"):
            Settings.from_env({"BFF_IDENTITY_HASH_KEY_FILE": str(tmp_path / "missing.key")})
        assert "kkk" not in repr(Settings(identity_hash_key=b"k" * 32))

    @pytest.mark.parametrize("identity", ["carol@example.com", "dave-4711"])
    def test_served_and_refused_lines_hash_the_identity(
        self, make_bff: MakeBff, shared_server: RunningServer, caplog: pytest.LogCaptureFixture, identity: str
    ) -> None:
        """token.served and token.refused carry `identity=h:...`, the value synctoken's audit-hash prints."""
        expected = IdentityHasher(HASH_KEY)(identity)
        served = make_bff(
            shared_server.port, settings=Settings(identity_hash_key=HASH_KEY), authenticate=lambda _: identity
        )
        refused = make_bff(
            shared_server.port,
            settings=Settings(identity_hash_key=HASH_KEY, sync_service_sid=SERVICE_C),
            authenticate=lambda _: identity,
        )
        with caplog.at_level(logging.INFO, logger="synctoken_bff"):
            assert served.token().status_code == httpx.codes.OK
            assert refused.token().status_code == httpx.codes.FORBIDDEN
        lines = [r.getMessage() for r in caplog.records if r.name == "synctoken_bff"]
        assert any(line.startswith(f"token.served identity={expected} token_id=") for line in lines), lines
        assert any(line.startswith(f"token.refused identity={expected} status=403 error=") for line in lines), lines
        assert identity not in caplog.text

    def test_without_a_key_no_identity_is_logged(
        self, make_bff: MakeBff, shared_server: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No BFF_IDENTITY_HASH_KEY_FILE: the lines leave the identity out, anonymous ones included."""
        bff = make_bff(shared_server.port)
        refused = make_bff(shared_server.port, settings=Settings(SESSION_SECRET, sync_service_sid=SERVICE_C))
        with caplog.at_level(logging.INFO, logger="synctoken_bff"):
            identity = bff.token().json()["identity"]
            assert refused.token().status_code == httpx.codes.FORBIDDEN
        lines = [r.getMessage() for r in caplog.records if r.name == "synctoken_bff"]
        assert any(line.startswith("token.served token_id=") for line in lines), lines
        assert any(line.startswith("token.refused status=403 error=") for line in lines), lines
        assert "identity=" not in "\n".join(lines)
        assert identity not in caplog.text
        assert "anon-" not in caplog.text


class TestNewIdentities:
    """The demo authenticator gives one client address a few identities, then one per interval: 429 in between."""

    LIMIT = NewIdentityLimit(burst=3, every=dt.timedelta(hours=1))

    def test_cookieless_client_is_limited(
        self, make_bff: MakeBff, shared_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """After `burst` new identities a client without cookies gets 429 with Retry-After, and synctoken is not asked."""
        bff = make_bff(shared_server.port, settings=Settings(SESSION_SECRET, new_identity_limit=self.LIMIT))
        keeper = Bff(bff.running, leak_watch)  # a second browser on the same address, keeping its cookie
        try:
            kept = keeper.token().json()["identity"]
            identities = set()
            for _ in range(2):
                bff.http.cookies.clear()
                identities.add(bff.token().json()["identity"])
            assert len(identities) == 2
            audited = sum(1 for r in log_sink.records() if r["event"] == "token.decision")
            for _ in range(3):
                bff.http.cookies.clear()
                response = bff.token()
                assert response.status_code == httpx.codes.TOO_MANY_REQUESTS
                assert error_of(response)["reason"] == "TOO_MANY_NEW_SESSIONS"
                assert 3000 < int(response.headers["retry-after"]) <= 3600
                assert "set-cookie" not in response.headers
            assert sum(1 for r in log_sink.records() if r["event"] == "token.decision") == audited
            # The browser that kept its cookie goes on as before.
            again = keeper.token()
            assert again.status_code == httpx.codes.OK
            assert again.json()["identity"] == kept
        finally:
            keeper.http.close()

    @pytest.mark.parametrize(
        ("first", "second", "shared"),
        [
            ("203.0.113.5", "203.0.113.6", False),
            ("2001:db8::1", "2001:db8::2", True),
            ("2001:db8::1", "2001:db8:0:1::1", False),
            ("::ffff:203.0.113.5", "203.0.113.5", True),
        ],
        ids=["two IPv4 addresses", "one IPv6 /64", "two IPv6 /64s", "IPv4-mapped"],
    )
    def test_buckets_are_per_client(
        self, make_bff: MakeBff, shared_server: RunningServer, first: str, second: str, *, shared: bool
    ) -> None:
        """Each address (each IPv6 /64) has its own bucket; behind a proxy on loopback, X-Forwarded-For says which."""
        limit = NewIdentityLimit(burst=1, every=dt.timedelta(hours=1))
        bff = make_bff(shared_server.port, settings=Settings(SESSION_SECRET, new_identity_limit=limit))
        assert bff.token(headers={"x-forwarded-for": first}).status_code == httpx.codes.OK
        bff.http.cookies.clear()
        assert bff.token(headers={"x-forwarded-for": first}).status_code == httpx.codes.TOO_MANY_REQUESTS
        expected = httpx.codes.TOO_MANY_REQUESTS if shared else httpx.codes.OK
        assert bff.token(headers={"x-forwarded-for": second}).status_code == expected

    def test_bucket_refills(self) -> None:
        """One more identity per interval; the wait given is until the next one."""
        now = [0.0]
        limiter = AddressLimiter(NewIdentityLimit(burst=2, every=dt.timedelta(seconds=10)), clock=lambda: now[0])
        assert limiter.take("192.0.2.1") is None
        assert limiter.take("192.0.2.1") is None
        assert limiter.take("192.0.2.1") == pytest.approx(10)
        now[0] = 4.0
        assert limiter.take("192.0.2.1") == pytest.approx(6)
        now[0] = 10.0
        assert limiter.take("192.0.2.1") is None
        assert limiter.take("192.0.2.1") is not None

    def test_memory_is_bounded(self) -> None:
        """A flood of addresses keeps at most max_addresses buckets, and refilled ones are dropped."""
        now = [0.0]
        limit = NewIdentityLimit(burst=2, every=dt.timedelta(seconds=1), max_addresses=50)
        limiter = AddressLimiter(limit, clock=lambda: now[0])
        for n in range(5000):
            limiter.take(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
            assert len(limiter) <= 50
        now[0] = 100.0
        for _ in range(20):
            limiter.take("192.0.2.1")
        assert len(limiter) < 50

    @pytest.mark.parametrize(
        "limit",
        [{"burst": 0}, {"every": dt.timedelta(0)}, {"max_addresses": 0}],
    )
    def test_limit_must_allow_something(self, limit: dict[str, Any]) -> None:
        """A limit that could never give an identity is a mistake, refused."""
        with pytest.raises(ValueError, match="burst and max_addresses must be at least 1"):
            NewIdentityLimit(**limit)


class TestInputLimits:
    """Input that synctoken could never take is refused by the BFF (400/414), before synctoken is asked."""

    @pytest.mark.parametrize(
        ("params", "status", "reason"),
        [
            ({"device": "d" * 257}, 400, "INVALID_REQUEST"),
            ({"device": "é" * 257}, 400, "INVALID_REQUEST"),
            ({"device": "d" * 5000}, 414, "URI_TOO_LONG"),
            ({"device": "ok", "pad": "x" * 4100}, 414, "URI_TOO_LONG"),
            ({"device": ["a", "b"]}, 400, "INVALID_REQUEST"),
        ],
        ids=["257 characters", "257 non-ASCII characters", "5000 characters", "long query", "device twice"],
    )
    def test_refused_before_synctoken(
        self,
        make_bff: MakeBff,
        shared_server: RunningServer,
        log_sink: LogSink,
        params: dict[str, Any],
        status: int,
        reason: str,
    ) -> None:
        """No RPC, no identity minted; the code is INVALID_ARGUMENT and the message says what is wrong."""
        bff = make_bff(shared_server.port)
        response = bff.http.get("/token", params=params)
        assert response.status_code == status
        error = error_of(response)
        assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", reason)
        assert "set-cookie" not in response.headers
        custom = make_bff(shared_server.port, authenticate=lambda _: "erin-limits")
        assert custom.http.get("/token", params=params).status_code == status
        assert audit_count(log_sink, "erin-limits") == 0

    @pytest.mark.parametrize("device", ["d" * 256, "é" * 256, "端" * 256])
    def test_longest_device_is_served(self, make_bff: MakeBff, shared_server: RunningServer, device: str) -> None:
        """256 characters, even of three UTF-8 bytes each and percent-encoded, is within every limit."""
        response = make_bff(shared_server.port).token(device=device)
        assert response.status_code == httpx.codes.OK

    def test_transport_size_refusal_is_502(
        self, make_bff: MakeBff, shared_server: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A request over synctoken's 4 KiB (an authenticator's huge identity) is RESOURCE_EXHAUSTED without
        RATE_LIMITED: not "too many requests" but a 502 with a fixed message, and no Retry-After."""
        with caplog.at_level(logging.WARNING, logger="synctoken_bff"):
            response = make_bff(shared_server.port, authenticate=lambda _: "u" * 5000).token()
        assert response.status_code == httpx.codes.BAD_GATEWAY
        error = error_of(response)
        assert (error["code"], error["reason"]) == ("RESOURCE_EXHAUSTED", None)
        assert error["message"] == "the token service could not take this request"
        assert "retry-after" not in response.headers
        assert "token.refused status=502 error=RESOURCE_EXHAUSTED" in caplog.text

    def test_rate_limit_is_429(self, make_bff: MakeBff, harness: ServerHarness, pki: Pki) -> None:
        """synctoken's RATE_LIMITED (here its per-identity limit) is 429 with Retry-After."""
        policy = POLICY_TOML.replace(
            f'id = "{BFF_ID}"', f'id = "{BFF_ID}"\nidentity_rate = 0.01\nidentity_burst = 1', 1
        )
        server = harness.start(config_text(pki, policy=policy))
        bff = make_bff(server.port, authenticate=lambda _: "frank")
        assert bff.token(device="one").status_code == httpx.codes.OK
        response = bff.token(device="two")
        assert response.status_code == httpx.codes.TOO_MANY_REQUESTS
        assert (error_of(response)["code"], error_of(response)["reason"]) == ("RESOURCE_EXHAUSTED", "RATE_LIMITED")
        assert int(response.headers["retry-after"]) >= 1


class TestTtlSetting:
    """BFF_TOKEN_TTL outside what synctoken ever issues is refused at start; over the caller's max_ttl, on the call."""

    @pytest.mark.parametrize("text", ["179s", "2m", "2m59s", "24h1s", "25h", "48h"])
    def test_out_of_range_is_refused(self, text: str) -> None:
        """Under 3 minutes or over 24 hours no caller's policy can help: a ValueError naming the variable."""
        with pytest.raises(
            ValueError, match=r"BFF_TOKEN_TTL: [0-9hms]+ is outside what synctoken ever issues, 3m to 24h"
        ):
            Settings.from_env({"BFF_TOKEN_TTL": text})

    @pytest.mark.parametrize("text", ["3m", "180s", "24h", "23h59m59s"])
    def test_bounds_are_accepted(self, text: str) -> None:
        """The bounds themselves are fine."""
        assert Settings.from_env({"BFF_TOKEN_TTL": text}).token_ttl is not None

    @pytest.mark.parametrize("ttl", [dt.timedelta(seconds=200.5), dt.timedelta(minutes=5, microseconds=1)])
    def test_fractions_are_refused(self, ttl: dt.timedelta) -> None:
        """Settings made in code are held to whole seconds, as synctoken's Duration check is."""
        with pytest.raises(ValueError, match=r"BFF_TOKEN_TTL: .* is not a whole number of seconds"):
            Settings(token_ttl=ttl)

    @pytest.mark.parametrize("sid", ["IS123", "is" + "a" * 32, "IS" + "A" * 32, "IS" + "a" * 33, " IS" + "a" * 32])
    def test_malformed_service_sid_is_refused(self, sid: str) -> None:
        """BFF_SYNC_SERVICE_SID the BFF can tell is no Sync service SID is refused at start too."""
        with pytest.raises(ValueError, match=r"BFF_SYNC_SERVICE_SID: .* is not IS followed by 32 lower-case hex"):
            Settings.from_env({"BFF_SYNC_SERVICE_SID": sid})

    @pytest.mark.parametrize("ttl", [dt.timedelta(hours=5), dt.timedelta(hours=24)])
    def test_over_max_ttl_is_an_operator_error(
        self, make_bff: MakeBff, shared_server: RunningServer, caplog: pytest.LogCaptureFixture, ttl: dt.timedelta
    ) -> None:
        """Over the caller's max_ttl (4h here): the operator's log gets an error, the browser a fixed 502."""
        bff = make_bff(shared_server.port, settings=Settings(SESSION_SECRET, token_ttl=ttl))
        with caplog.at_level(logging.INFO, logger="synctoken_bff"):
            response = bff.token()
        assert response.status_code == httpx.codes.BAD_GATEWAY
        error = error_of(response)
        assert error["message"] == "the token service refused this server's settings"
        assert "max_ttl" not in response.text
        errors = [r for r in caplog.records if r.name == "synctoken_bff" and r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "max_ttl" in errors[0].getMessage()
        assert "BFF_TOKEN_TTL" in errors[0].getMessage()

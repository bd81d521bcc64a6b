"""IssueToken end to end: a real server on loopback, real mTLS, real tokens checked with PyJWT."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import SyncGrant

from support.calls import rpc_error
from support.configs import POLICY_TOML, config_text
from support.constants import (
    ACCOUNT_SID,
    API_KEY_SID,
    API_SECRET,
    BFF_ID,
    CHAT_WORKER_ID,
    SERVICE_A,
    SERVICE_B,
    SERVICE_C,
    STRANGER_ID,
)
from support.inprocess import Client, ServerHarness
from support.pki import Pki
from synctoken.v1 import token_service_pb2 as pb

Connect = Callable[[str | None], Client]


def request(identity: str = "alice", service: str = "", **kwargs: object) -> pb.IssueTokenRequest:
    """An IssueTokenRequest with a Sync grant."""
    return pb.IssueTokenRequest(identity=identity, sync=pb.SyncGrant(service_sid=service), **kwargs)  # type: ignore[arg-type]


def decode(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """Verify the token's HS256 signature with the API secret; return header and payload."""
    payload = jwt.decode(token, API_SECRET, algorithms=["HS256"], options={"verify_aud": False})
    return jwt.get_unverified_header(token), payload


class TestIssued:
    """Tokens that policy allows."""

    def test_token_fields(self, connect: Connect) -> None:
        """A default request yields an HS256 Twilio token with every field as Twilio's libraries write it."""
        before = int(time.time())
        response = connect("bff").issue(request("alice"))
        header, payload = decode(response.token)
        assert header == {"alg": "HS256", "typ": "JWT", "cty": "twilio-fpa;v=1"}
        issued = response.issued_at.seconds
        assert before <= issued <= int(time.time())
        assert payload["iss"] == API_KEY_SID
        assert payload["sub"] == ACCOUNT_SID
        assert payload["nbf"] == issued
        assert payload["exp"] == response.expires_at.seconds == issued + 3600
        jti_key, _, jti_time = str(payload["jti"]).rpartition("-")
        assert jti_key == API_KEY_SID
        assert int(jti_time) == issued  # stamped from the token's own issue second, not a second clock read
        assert payload["grants"] == {"identity": "alice", "data_sync": {"service_sid": SERVICE_A}}
        assert set(payload) == {"jti", "iss", "sub", "nbf", "exp", "grants"}
        assert response.identity == "alice"

    def test_same_as_twilio_helper(self, connect: Connect) -> None:
        """The token decodes to exactly what twilio's AccessToken makes for the same inputs."""
        response = connect("bff").issue(
            pb.IssueTokenRequest(
                identity="bob@example.com",
                sync=pb.SyncGrant(service_sid=SERVICE_B, endpoint_id="device-1"),
                region="ie1",
                ttl=duration_pb2.Duration(seconds=900),
            )
        )
        expected = AccessToken(
            ACCOUNT_SID,
            API_KEY_SID,
            API_SECRET,
            identity="bob@example.com",
            nbf=response.issued_at.seconds,
            valid_until=response.expires_at.seconds,
            region="ie1",
            grants=[SyncGrant(service_sid=SERVICE_B, endpoint_id="device-1")],
        )
        header, payload = decode(response.token)
        want_header, want_payload = decode(expected.to_jwt())
        assert header == want_header == {"alg": "HS256", "typ": "JWT", "cty": "twilio-fpa;v=1", "twr": "ie1"}
        del payload["jti"], want_payload["jti"]  # seconds-resolution clock, read separately
        assert payload == want_payload
        assert payload["exp"] == payload["nbf"] + 900  # type: ignore[operator]

    def test_refresh_after(self, connect: Connect) -> None:
        """refresh_after lies after issue, at least 3 minutes before expiry, and varies between tokens."""
        client = connect("bff")
        refresh_offsets = set()
        for _ in range(8):
            response = client.issue(request("alice", ttl=duration_pb2.Duration(seconds=3600)))
            issued, expires, refresh = (
                response.issued_at.seconds,
                response.expires_at.seconds,
                response.refresh_after.seconds,
            )
            assert issued <= refresh <= expires - 180
            assert refresh >= expires - 180 - 360  # jitter is at most 10% of the TTL
            refresh_offsets.add(refresh - issued)
        assert len(refresh_offsets) > 1, "refresh times are not spread"

    def test_minimum_ttl_refreshes_at_issue(self, connect: Connect) -> None:
        """A 3-minute token (the minimum) is due for refresh at once, never before it was issued."""
        response = connect("bff").issue(request("alice", ttl=duration_pb2.Duration(seconds=180)))
        assert response.refresh_after.seconds == response.issued_at.seconds

    def test_token_id_fingerprints_the_token(self, connect: Connect) -> None:
        """token_id is the first 32 hex digits of the token's SHA-256."""
        import hashlib  # noqa: PLC0415 - used by this test only

        response = connect("bff").issue(request("alice"))
        assert response.token_id == hashlib.sha256(response.token.encode()).hexdigest()[:32]

    def test_prefix_rule_with_pattern(self, connect: Connect) -> None:
        """A caller under a /* prefix gets that rule's service and default TTL."""
        response = connect("chat_worker").issue(request("user-42", SERVICE_B))
        _, payload = decode(response.token)
        assert payload["grants"] == {"identity": "user-42", "data_sync": {"service_sid": SERVICE_B}}
        assert response.expires_at.seconds - response.issued_at.seconds == 600

    def test_exact_rule_beats_prefix(self, connect: Connect) -> None:
        """An exact caller entry wins over a matching prefix entry."""
        response = connect("chat_admin").issue(request("anyone", ttl=duration_pb2.Duration(seconds=20 * 3600)))
        _, payload = decode(response.token)
        assert payload["grants"] == {"identity": "anyone", "data_sync": {"service_sid": SERVICE_C}}

    def test_allowed_reserved_character(self, connect: Connect) -> None:
        """A caller allowed '@' may issue e-mail identities."""
        response = connect("bff").issue(request("carol@example.com"))
        assert decode(response.token)[1]["grants"] == {
            "identity": "carol@example.com",
            "data_sync": {"service_sid": SERVICE_A},
        }

    def test_validate_only_signs_nothing(self, connect: Connect) -> None:
        """validate_only returns the decision and times, but no token and no token_id."""
        response = connect("bff").issue(request("alice", validate_only=True))
        assert response.token == ""
        assert response.token_id == ""
        assert response.identity == "alice"
        assert response.expires_at.seconds - response.issued_at.seconds == 3600
        assert response.issued_at.seconds <= response.refresh_after.seconds <= response.expires_at.seconds - 180

    def test_validate_only_still_checks(self, connect: Connect) -> None:
        """validate_only runs every check: a denied request is denied."""
        _, info, _ = rpc_error(lambda: connect("bff").issue(request("alice", SERVICE_C, validate_only=True)))
        assert info.reason == "SERVICE_NOT_ALLOWED"


class TestInvalidArgument:
    """Bad requests: INVALID_ARGUMENT with one BadRequest violation per broken rule."""

    @pytest.mark.parametrize(
        ("req", "field", "description"),
        [
            (request(""), "identity", "must not be empty"),
            (request("a" * 257), "identity", "is 257 characters; the limit is 256"),
            (request("al\nice"), "identity", "must not contain U+000A (a control character)"),
            (request("al\u202eice"), "identity", "must not contain U+202E RIGHT-TO-LEFT OVERRIDE (a format character)"),
            (request("al\u00a0ice"), "identity", "must not contain U+00A0 NO-BREAK SPACE (a space other than U+0020)"),
            (request("\u3164"), "identity", "must not contain U+3164 HANGUL FILLER (an invisible character)"),
            (request("alice\U000f0000"), "identity", "must not contain U+F0000 (a private-use character)"),
            (request("alice "), "identity", "must not begin or end with a space"),
            (
                request("jose\u0301"),
                "identity",
                "must be in Unicode normalization form NFC; U+0301 COMBINING ACUTE ACCENT is not",
            ),
            (
                pb.IssueTokenRequest(identity="a", sync=pb.SyncGrant(endpoint_id="dev\u2800")),
                "sync.endpoint_id",
                "must not contain U+2800 BRAILLE PATTERN BLANK (renders as blank space)",
            ),
            (
                request("a/b?c"),
                "identity",
                "must not contain the URI-reserved characters '/?' unless the caller's policy allows them",
            ),
            (pb.IssueTokenRequest(identity="alice"), "sync", "is required: it is the only grant this version issues"),
            (request("alice", "IS123"), "sync.service_sid", "must be IS followed by 32 lower-case hex digits"),
            (request("alice", "IS" + "A" * 32), "sync.service_sid", "must be IS followed by 32 lower-case hex digits"),
            (
                pb.IssueTokenRequest(identity="a", sync=pb.SyncGrant(endpoint_id="e" * 300)),
                "sync.endpoint_id",
                "is 300 characters; the limit is 256",
            ),
            (request("alice", ttl=duration_pb2.Duration(seconds=179)), "ttl", "2m59s is below the 3m minimum"),
            (request("alice", ttl=duration_pb2.Duration(seconds=86401)), "ttl", "24h1s is above the 24h limit"),
            (
                request("alice", ttl=duration_pb2.Duration(seconds=5 * 3600)),
                "ttl",
                "5h is above this caller's max_ttl of 4h",
            ),
            (
                request("alice", ttl=duration_pb2.Duration(seconds=600, nanos=5)),
                "ttl",
                "must be a positive whole number of seconds",
            ),
            (
                request("alice", ttl=duration_pb2.Duration(seconds=-600)),
                "ttl",
                "must be a positive whole number of seconds",
            ),
            (request("alice", region="IE1"), "region", "must be a Twilio region such as us1, ie1 or au1"),
            (request("alice", region="ie1; x"), "region", "must be a Twilio region such as us1, ie1 or au1"),
        ],
    )
    def test_single_violation(self, connect: Connect, req: pb.IssueTokenRequest, field: str, description: str) -> None:
        """Each broken rule is reported on its field with a message naming the limit."""
        error, info, bad_request = rpc_error(lambda: connect("bff").issue(req))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.reason == "INVALID_REQUEST"
        assert bad_request is not None
        assert [(v.field, v.description) for v in bad_request.field_violations] == [(field, description)]
        assert error.details() == f"invalid request: {field}: {description}"

    def test_all_violations_at_once(self, connect: Connect) -> None:
        """Several broken rules are all reported in one answer."""
        req = request("", "bad", ttl=duration_pb2.Duration(seconds=1), region="x")
        _, _, bad_request = rpc_error(lambda: connect("bff").issue(req))
        assert bad_request is not None
        assert [v.field for v in bad_request.field_violations] == ["identity", "sync.service_sid", "ttl", "region"]

    def test_missing_service_without_default(self, connect: Connect) -> None:
        """A caller with no default Sync service must name one."""
        _, _, bad_request = rpc_error(lambda: connect("chat_worker").issue(request("user-1")))
        assert bad_request is not None
        assert [(v.field, v.description) for v in bad_request.field_violations] == [
            ("sync.service_sid", "is required: this caller has no default Sync service")
        ]

    def test_malformed_bytes(self, connect: Connect) -> None:
        """Bytes that are not an IssueTokenRequest (here: a string that is not UTF-8) get MALFORMED_REQUEST."""
        client = connect("bff")
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = client.channel.unary_unary(
            "/synctoken.v1.TokenService/IssueToken"
        )
        error, info, bad_request = rpc_error(lambda: raw(b"\x0a\x02\xff\xfe", timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.reason == "MALFORMED_REQUEST"
        assert bad_request is None
        assert "Traceback" not in (error.details() or "")
        assert "DecodeError" not in (error.details() or "")

    def test_oversized_request(self, connect: Connect) -> None:
        """A request over 4 KiB is refused by gRPC before it is parsed."""
        client = connect("bff")
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = client.channel.unary_unary(
            "/synctoken.v1.TokenService/IssueToken"
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(request("a" * 5000).SerializeToString(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class TestPermissionDenied:
    """Requests policy does not allow: PERMISSION_DENIED with an ErrorInfo reason."""

    def test_unknown_caller(self, connect: Connect) -> None:
        """An authenticated caller with no policy entry is denied, whatever it asks."""
        error, info, bad_request = rpc_error(lambda: connect("stranger").issue(request("alice")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.reason == "CALLER_NOT_ALLOWED"
        assert dict(info.metadata) == {"callerId": STRANGER_ID}
        assert bad_request is None

    def test_unknown_caller_learns_no_rules(self, connect: Connect) -> None:
        """An unknown caller's invalid request is still just CALLER_NOT_ALLOWED."""
        _, info, _ = rpc_error(lambda: connect("stranger").issue(request("")))
        assert info.reason == "CALLER_NOT_ALLOWED"

    def test_service_outside_list(self, connect: Connect) -> None:
        """A Sync service not in the caller's list is denied."""
        error, info, _ = rpc_error(lambda: connect("bff").issue(request("alice", SERVICE_C)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.reason == "SERVICE_NOT_ALLOWED"
        assert dict(info.metadata) == {"callerId": BFF_ID, "serviceSid": SERVICE_C}

    @pytest.mark.parametrize("identity", ["admin", "user-", "user-12x", "xuser-12"])
    def test_identity_outside_pattern(self, connect: Connect, identity: str) -> None:
        """An identity that does not wholly match the caller's pattern is denied."""
        error, info, _ = rpc_error(lambda: connect("chat_worker").issue(request(identity, SERVICE_B)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.reason == "IDENTITY_NOT_ALLOWED"
        assert dict(info.metadata) == {"callerId": CHAT_WORKER_ID}


class TestIdentityPatternTime:
    """An identity pattern cannot stall the server: RE2 runs in time linear in the identity."""

    def test_backtracking_pattern_answers_within_deadline(self, harness: ServerHarness, pki: Pki) -> None:
        """A pattern Python's re spent 36 s on for one 29-character identity is decided inside a 2 s deadline."""
        pattern = r"identity_pattern = '([a-z0-9]+\.?)+@corp\.example'" + '\nallowed_identity_characters = "@"'
        server = harness.start(
            config_text(pki, policy=POLICY_TOML.replace('identity_pattern = "user-[0-9]+"', pattern))
        )
        client = harness.client(server, "chat_worker")
        # A hang shows as DEADLINE_EXCEEDED here, with no ErrorInfo: the test fails, it does not wait.
        error, info, _ = rpc_error(lambda: client.stub.IssueToken(request("a" * 28 + "-", SERVICE_B), timeout=2))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.reason == "IDENTITY_NOT_ALLOWED"
        allowed = client.issue(request("first.last@corp.example", SERVICE_B, validate_only=True))
        assert allowed.identity == "first.last@corp.example"


class TestGetCallerIdentity:
    """GetCallerIdentity tells a caller who it is and what it may do."""

    def test_known_caller(self, connect: Connect) -> None:
        """A caller in the policy sees its id and its effective rule."""
        response = connect("chat_worker").whoami()
        assert response.caller_id == CHAT_WORKER_ID
        assert response.policy == pb.CallerPolicy(
            matched_caller="spiffe://example.org/ns/chat/*",
            sync_service_sids=[SERVICE_B],
            identity_pattern="user-[0-9]+",
            default_ttl=duration_pb2.Duration(seconds=600),
            max_ttl=duration_pb2.Duration(seconds=1800),
        )

    def test_inherited_defaults(self, connect: Connect) -> None:
        """A caller without its own TTLs shows the [defaults] ones."""
        response = connect("bff").whoami()
        assert response.policy.default_ttl.seconds == 3600
        assert response.policy.max_ttl.seconds == 4 * 3600
        assert response.policy.default_sync_service_sid == SERVICE_A
        assert response.policy.allowed_identity_characters == "@"

    def test_unknown_caller(self, connect: Connect) -> None:
        """An authenticated caller outside the policy gets its id and no policy, not an error."""
        response = connect("stranger").whoami()
        assert response.caller_id == STRANGER_ID
        assert not response.HasField("policy")

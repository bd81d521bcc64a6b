"""Minting: a Grant becomes a signed Twilio Access Token, byte for byte what the `twilio` library makes."""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import json
import random
from dataclasses import dataclass, field
from typing import Protocol

from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import SyncGrant

from synctoken_server.durations import MIN_TTL_SECONDS
from synctoken_server.policy.rules import Grant

REFRESH_LEAD_SECONDS = MIN_TTL_SECONDS
"""The Sync SDK fires tokenAboutToExpire this long before `exp`."""

REFRESH_JITTER_FRACTION = 0.1
"""Refresh times spread over up to this fraction of the TTL, so a fleet that
logged in together does not come back together."""

TOKEN_ID_HEX_DIGITS = 32


@dataclass(frozen=True)
class TwilioCredentials:
    """The Account SID and the API key that signs tokens; the secret never prints."""

    account_sid: str
    api_key_sid: str
    api_secret: str = field(repr=False)


@dataclass(frozen=True)
class TokenTimes:
    """When a token starts, ends and should be replaced, in Unix seconds."""

    issued_at: int
    expires_at: int
    refresh_after: int


def plan_times(now: int, ttl: int, rng: random.Random) -> TokenTimes:
    """Times for a token issued at `now`: refresh at least REFRESH_LEAD_SECONDS before expiry, minus jitter."""
    latest_refresh = now + ttl - REFRESH_LEAD_SECONDS
    jitter = rng.uniform(0, min(ttl * REFRESH_JITTER_FRACTION, latest_refresh - now))
    return TokenTimes(issued_at=now, expires_at=now + ttl, refresh_after=int(latest_refresh - jitter))


def token_id(token: str) -> str:
    """A fingerprint of a token for audit records; it cannot be turned back into the token."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()[:TOKEN_ID_HEX_DIGITS]


class TokenMinter(Protocol):
    """What the issuing path needs of a minter; the benchmark swaps in the twilio-library one to compare."""

    key_sid: str

    def mint(self, grant: Grant, times: TokenTimes) -> str:
        """A signed JWT for `grant`, valid from times.issued_at to times.expires_at."""
        ...


class Minter:
    """Signs Access Tokens with one Twilio API key, building the JWT itself.

    The bytes are those of the `twilio` library (through PyJWT), which stays the
    reference: tests/service/unit/test_mint_parity.py compares the two on hundreds of inputs.
    Building it here skips what PyJWT redoes on every call, above all its checks
    that the secret is not a PEM, SSH, DER or JWK key; `check_secret` runs those
    once, when the config loads.
    """

    def __init__(self, credentials: TwilioCredentials) -> None:
        # The loader refuses such a secret already; this holds for credentials built any other way.
        problem = check_secret(credentials.api_secret)
        if problem is not None:
            raise ValueError(f"the API key secret cannot sign HS256 tokens: {problem}")
        self.key_sid = credentials.api_key_sid
        """The API key this minter signs with."""
        self._account_sid = credentials.account_sid
        # Keyed once: each token copies this state instead of hashing the key again.
        self._hmac = hmac.new(credentials.api_secret.encode("utf-8"), digestmod=hashlib.sha256)

    def mint(self, grant: Grant, times: TokenTimes) -> str:
        """A signed JWT for `grant`, valid from times.issued_at to times.expires_at."""
        # Claims in the order twilio's Jwt.payload builds them: its _generate_payload
        # (jti, grants), then iss, exp, nbf, sub. The jti's time is the token's own
        # issued_at, where twilio reads the clock a second time.
        sync: dict[str, str] = {}
        if grant.service_sid:
            sync["service_sid"] = grant.service_sid
        if grant.endpoint_id:
            sync["endpoint_id"] = grant.endpoint_id
        grants: dict[str, object] = {"data_sync": sync}
        if grant.identity:
            grants["identity"] = grant.identity
        payload = {
            "jti": f"{self.key_sid}-{times.issued_at}",
            "grants": grants,
            "iss": self.key_sid,
            "exp": times.expires_at,
            "nbf": times.issued_at,
            "sub": self._account_sid,
        }
        # PyJWT's own serialisation: json.dumps with compact separators and ensure_ascii left on.
        signing_input = _header_segment(grant.region) + b"." + _b64(_COMPACT_JSON.encode(payload).encode())
        mac = self._hmac.copy()
        mac.update(signing_input)
        return (signing_input + b"." + _b64(mac.digest())).decode("ascii")


def check_secret(secret: str) -> str | None:
    """Why PyJWT would refuse `secret` as an HS256 key (empty, or a PEM, SSH, DER or JWK key), or None.

    PyJWT's own check, run once at load time rather than on every token.
    """
    try:
        _HS256.prepare_key(secret)
    except InvalidKeyError as exc:
        return str(exc)
    return None


_HS256 = HMACAlgorithm(HMACAlgorithm.SHA256)

# What json.dumps(..., separators=(",", ":")) builds on every call, built once.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> bytes:
    # base64url without padding, as JWS (RFC 7515 section 2) and PyJWT write it:
    # base64.urlsafe_b64encode's own steps, without its two Python-level calls.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


@functools.lru_cache(maxsize=64)
def _header_segment(region: str) -> bytes:
    """The encoded JOSE header twilio writes for `region` ("" for none), built once per region seen.

    Bounded: requests choose the region, and the policy only checks its shape.
    """
    header = {"cty": "twilio-fpa;v=1", "typ": "JWT", "alg": "HS256"}
    if region:
        header["twr"] = region
    # PyJWT sorts the header's keys by default.
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


class TwilioLibraryMinter:
    """Signs Access Tokens through the `twilio` library: the reference for parity tests and the benchmark."""

    def __init__(self, credentials: TwilioCredentials) -> None:
        self._credentials = credentials
        self.key_sid = credentials.api_key_sid
        """The API key this minter signs with."""

    def mint(self, grant: Grant, times: TokenTimes) -> str:
        """A signed JWT for `grant`, valid from times.issued_at to times.expires_at."""
        creds = self._credentials
        token = AccessToken(
            creds.account_sid,
            creds.api_key_sid,
            creds.api_secret,
            identity=grant.identity,
            nbf=times.issued_at,
            valid_until=times.expires_at,
            region=grant.region or None,
            grants=[SyncGrant(service_sid=grant.service_sid, endpoint_id=grant.endpoint_id or None)],
        )
        jwt: str = token.to_jwt()
        return jwt

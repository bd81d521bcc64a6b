"""Minting: a Grant becomes a signed Twilio Access Token, by the `twilio` library and nothing else."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import SyncGrant

from synctoken_server.durations import MIN_TTL_SECONDS
from synctoken_server.policy import Grant

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


class Minter:
    """Signs Access Tokens with one Twilio API key."""

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

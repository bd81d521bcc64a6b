"""What the calls return: frozen dataclasses with aware UTC datetimes, made from the response messages."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from google.protobuf import duration_pb2, timestamp_pb2

from synctoken.v1 import token_service_pb2 as pb


@dataclass(frozen=True)
class IssuedToken:
    """A Twilio Access Token and when to replace it.

    `token` is left out of the repr, so that logging or printing an
    IssuedToken never writes the token itself. With validate_only, `token` and
    `token_id` are empty.
    """

    token: str = field(repr=False)
    identity: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    refresh_after: dt.datetime
    token_id: str

    @classmethod
    def from_response(cls, response: pb.IssueTokenResponse) -> IssuedToken:
        """The IssuedToken an IssueTokenResponse describes."""
        return cls(
            token=response.token,
            identity=response.identity,
            issued_at=_utc(response.issued_at),
            expires_at=_utc(response.expires_at),
            refresh_after=_utc(response.refresh_after),
            token_id=response.token_id,
        )


@dataclass(frozen=True)
class CallerPolicy:
    """The server's policy entry for the caller: what it may mint tokens for."""

    matched_caller: str
    sync_service_sids: tuple[str, ...]
    default_sync_service_sid: str | None
    identity_pattern: str | None
    allowed_identity_characters: str
    default_ttl: dt.timedelta
    max_ttl: dt.timedelta


@dataclass(frozen=True)
class CallerIdentity:
    """Who the server believes the caller is, and its policy (None when no entry matches)."""

    caller_id: str
    policy: CallerPolicy | None

    @classmethod
    def from_response(cls, response: pb.GetCallerIdentityResponse) -> CallerIdentity:
        """The CallerIdentity a GetCallerIdentityResponse describes."""
        if not response.HasField("policy"):
            return cls(caller_id=response.caller_id, policy=None)
        policy = response.policy
        return cls(
            caller_id=response.caller_id,
            policy=CallerPolicy(
                matched_caller=policy.matched_caller,
                sync_service_sids=tuple(policy.sync_service_sids),
                default_sync_service_sid=policy.default_sync_service_sid or None,
                identity_pattern=policy.identity_pattern or None,
                allowed_identity_characters=policy.allowed_identity_characters,
                default_ttl=policy.default_ttl.ToTimedelta(),
                max_ttl=policy.max_ttl.ToTimedelta(),
            ),
        )


def issue_request(
    identity: str,
    *,
    service_sid: str,
    endpoint_id: str,
    ttl: dt.timedelta | None,
    region: str,
    validate_only: bool,
) -> pb.IssueTokenRequest:
    """The IssueTokenRequest for these arguments; an unset ttl means the caller's default."""
    request = pb.IssueTokenRequest(
        identity=identity,
        sync=pb.SyncGrant(service_sid=service_sid, endpoint_id=endpoint_id),
        region=region,
        validate_only=validate_only,
    )
    if ttl is not None:
        # Sent as given, fractions included: the server's field violation says what is wrong with it.
        duration = duration_pb2.Duration()
        duration.FromTimedelta(ttl)
        request.ttl.CopyFrom(duration)
    return request


def _utc(timestamp: timestamp_pb2.Timestamp) -> dt.datetime:
    return timestamp.ToDatetime(tzinfo=dt.UTC)

"""The per-caller policy as compiled data, and `decide`: a pure function from request to grant.

Nothing here does I/O or logs, so every rule can be tested with plain unit tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from synctoken.v1 import token_service_pb2
from synctoken_server.durations import MAX_TTL_SECONDS, MIN_TTL_SECONDS, format_duration
from synctoken_server.errors import (
    CallerNotAllowed,
    FieldViolation,
    IdentityNotAllowed,
    InvalidRequest,
    ServiceNotAllowed,
)
from synctoken_server.policy.characters import text_violations
from synctoken_server.policy.limits import CallerLimits
from synctoken_server.policy.patterns import IdentityPattern

RESERVED_IDENTITY_CHARACTERS = "!*'();:@&=+$,/?%#[]"
"""Twilio advises identities avoid these URI-reserved characters."""

MAX_IDENTITY_LENGTH = 256
MAX_ENDPOINT_ID_LENGTH = 256

_SERVICE_SID = re.compile(r"IS[0-9a-f]{32}")
_RESERVED = re.compile("[" + re.escape(RESERVED_IDENTITY_CHARACTERS) + "]")
_REGION = re.compile(r"[a-z]{2}[0-9]{1,2}")


def is_service_sid(text: str) -> bool:
    """True for a Twilio Sync service SID: IS followed by 32 lower-case hex digits."""
    return _SERVICE_SID.fullmatch(text) is not None


@dataclass(frozen=True)
class CallerRule:
    """What one caller (or family of callers, for a prefix ending in /*) may do."""

    caller: str
    sync_services: tuple[str, ...]
    default_sync_service: str | None
    identity_pattern: IdentityPattern | None
    allowed_identity_characters: frozenset[str]
    default_ttl: int
    max_ttl: int
    limits: CallerLimits | None = None
    """Rate limits, as configured (for all workers together); None: unlimited."""

    def matches(self, caller_id: str) -> bool:
        """True if this rule applies to `caller_id`."""
        if self.caller.endswith("/*"):
            prefix = self.caller[:-1]
            return caller_id.startswith(prefix) and len(caller_id) > len(prefix)
        return caller_id == self.caller


class Policy:
    """All caller rules; an exact id wins over a prefix, and a longer prefix over a shorter one."""

    def __init__(self, rules: Iterable[CallerRule]) -> None:
        self._rules = tuple(rules)
        self._exact = {r.caller: r for r in self._rules if not r.caller.endswith("/*")}
        self._prefixes = sorted(
            (r for r in self._rules if r.caller.endswith("/*")), key=lambda r: len(r.caller), reverse=True
        )
        self.longest_ttl = max((r.max_ttl for r in self._rules), default=0)
        """No token this policy allows lives longer than this (0 when it allows none)."""

    def __iter__(self) -> Iterator[CallerRule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def rule_for(self, caller_id: str) -> CallerRule | None:
        """The rule that applies to `caller_id`, or None: deny by default."""
        exact = self._exact.get(caller_id)
        if exact is not None:
            return exact
        return next((r for r in self._prefixes if r.matches(caller_id)), None)


@dataclass(frozen=True)
class Grant:
    """A decision to mint: everything the token will say, all checked."""

    rule: str
    """The policy entry that allowed it (its `id`): a name from config, safe as a metric label."""
    identity: str
    service_sid: str
    endpoint_id: str
    ttl: int
    region: str


def decide(policy: Policy, caller_id: str, request: token_service_pb2.IssueTokenRequest) -> Grant:
    """Check `request` from `caller_id` against `policy`; return the grant or raise why not.

    An unknown caller learns nothing about request rules: it is refused first.
    Request errors come next, all at once; permission checks last.
    """
    rule = policy.rule_for(caller_id)
    if rule is None:
        raise CallerNotAllowed(caller_id)
    violations = list(_identity_violations(request.identity, rule))
    service_sid = request.sync.service_sid or rule.default_sync_service or ""
    if not request.HasField("sync"):
        violations.append(FieldViolation("sync", "is required: it is the only grant this version issues"))
    elif not request.sync.service_sid and rule.default_sync_service is None:
        violations.append(FieldViolation("sync.service_sid", "is required: this caller has no default Sync service"))
    elif not is_service_sid(service_sid):
        violations.append(FieldViolation("sync.service_sid", "must be IS followed by 32 lower-case hex digits"))
    # The endpoint id goes into the token beside the identity, so it obeys the same character rules.
    violations += text_violations("sync.endpoint_id", request.sync.endpoint_id, MAX_ENDPOINT_ID_LENGTH)
    ttl = rule.default_ttl
    if request.HasField("ttl"):
        ttl = request.ttl.seconds
        violations += _ttl_violations(request.ttl.seconds, request.ttl.nanos, rule)
    if request.region and not _REGION.fullmatch(request.region):
        violations.append(FieldViolation("region", "must be a Twilio region such as us1, ie1 or au1"))
    if violations:
        raise InvalidRequest(violations)
    if service_sid not in rule.sync_services:
        raise ServiceNotAllowed(caller_id, service_sid)
    if rule.identity_pattern is not None and not rule.identity_pattern.matches(request.identity):
        raise IdentityNotAllowed(caller_id)
    return Grant(
        rule=rule.caller,
        identity=request.identity,
        service_sid=service_sid,
        endpoint_id=request.sync.endpoint_id,
        ttl=ttl,
        region=request.region,
    )


def _identity_violations(identity: str, rule: CallerRule) -> Iterator[FieldViolation]:
    if not identity:
        yield FieldViolation("identity", "must not be empty")
        return
    yield from text_violations("identity", identity, MAX_IDENTITY_LENGTH)
    if _RESERVED.search(identity) is None:  # the common case, at C speed
        return
    reserved = sorted({c for c in identity if c in RESERVED_IDENTITY_CHARACTERS} - rule.allowed_identity_characters)
    if reserved:
        yield FieldViolation(
            "identity",
            f"must not contain the URI-reserved character{'s' if len(reserved) > 1 else ''} {''.join(reserved)!r} "
            "unless the caller's policy allows them",
        )


def _ttl_violations(seconds: int, nanos: int, rule: CallerRule) -> Iterator[FieldViolation]:
    if nanos != 0 or seconds < 0:
        yield FieldViolation("ttl", "must be a positive whole number of seconds")
    elif seconds < MIN_TTL_SECONDS:
        yield FieldViolation(
            "ttl", f"{format_duration(seconds)} is below the {format_duration(MIN_TTL_SECONDS)} minimum"
        )
    elif seconds > MAX_TTL_SECONDS:
        yield FieldViolation("ttl", f"{format_duration(seconds)} is above the {format_duration(MAX_TTL_SECONDS)} limit")
    elif seconds > rule.max_ttl:
        yield FieldViolation(
            "ttl", f"{format_duration(seconds)} is above this caller's max_ttl of {format_duration(rule.max_ttl)}"
        )

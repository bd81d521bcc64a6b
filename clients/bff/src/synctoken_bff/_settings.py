"""The BFF's own settings, from BFF_* environment variables (synctoken's are the client library's SYNCTOKEN_*).

Everything the BFF can tell is wrong by itself is refused here, at start,
with a ValueError naming the variable; only what depends on synctoken's
policy (a TTL over the caller's max_ttl) waits for the first call.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from synctoken.audithash import MIN_KEY_BYTES
from synctoken_bff._addresslimit import NewIdentityLimit
from synctoken_bff._durations import parse_duration
from synctoken_bff._identityhash import key_from_file
from synctoken_bff._origins import exact_origin

ENV_SESSION_SECRET_FILE = "BFF_SESSION_SECRET_FILE"  # noqa: S105 - a variable's name, not a secret
ENV_SYNC_SERVICE_SID = "BFF_SYNC_SERVICE_SID"
ENV_TOKEN_TTL = "BFF_TOKEN_TTL"  # noqa: S105 - ditto
ENV_ALLOWED_ORIGINS = "BFF_ALLOWED_ORIGINS"
ENV_IDENTITY_HASH_KEY_FILE = "BFF_IDENTITY_HASH_KEY_FILE"

# HMAC-SHA256 keys shorter than this are guessable offline from one signed cookie.
_MIN_SECRET_BYTES = 32
# synctoken's own bounds on any token's lifetime (server durations.py): outside them no caller's policy helps.
MIN_TTL = dt.timedelta(minutes=3)
MAX_TTL = dt.timedelta(hours=24)
_SERVICE_SID = re.compile(r"IS[0-9a-f]{32}")


@dataclass(frozen=True)
class Settings:
    """How the BFF asks for tokens, signs its session cookies and writes its log; checked when made."""

    session_secret: bytes | None = field(default=None, repr=False)
    """None: the demo authenticator signs with a random key for this process only (and warns)."""
    sync_service_sid: str = ""
    """Empty: the caller's default Sync service, from synctoken's policy."""
    token_ttl: dt.timedelta | None = None
    """None: the caller's default TTL, from synctoken's policy."""
    allowed_origins: tuple[str, ...] = ()
    """Exact origins that may call /token from other sites, normalised; empty: no CORS headers at all."""
    identity_hash_key: bytes | None = field(default=None, repr=False)
    """The key that hashes identities in the log lines; None: the log names no identity."""
    new_identity_limit: NewIdentityLimit = field(default_factory=NewIdentityLimit)
    """How many identities the demo authenticator gives one client address."""

    def __post_init__(self) -> None:
        if self.session_secret is not None and len(self.session_secret) < _MIN_SECRET_BYTES:
            msg = f"{ENV_SESSION_SECRET_FILE}: the key is {len(self.session_secret)} bytes; use at least 32"
            raise ValueError(msg)
        if self.identity_hash_key is not None and len(self.identity_hash_key) < MIN_KEY_BYTES:
            msg = f"{ENV_IDENTITY_HASH_KEY_FILE}: the key is {len(self.identity_hash_key)} bytes; use at least 32"
            raise ValueError(msg)
        if self.sync_service_sid and _SERVICE_SID.fullmatch(self.sync_service_sid) is None:
            msg = f"{ENV_SYNC_SERVICE_SID}: {self.sync_service_sid!r} is not IS followed by 32 lower-case hex digits"
            raise ValueError(msg)
        if self.token_ttl is not None:
            _check_ttl(self.token_ttl)
        # Normalised here, so that a Settings made in code is held to the same rule as one from the environment.
        origins = tuple(dict.fromkeys(exact_origin(o, ENV_ALLOWED_ORIGINS) for o in self.allowed_origins))
        object.__setattr__(self, "allowed_origins", origins)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from BFF_* variables; raise ValueError naming the variable that is wrong."""
        ttl = environ.get(ENV_TOKEN_TTL, "")
        origins = environ.get(ENV_ALLOWED_ORIGINS, "")
        hash_key_file = environ.get(ENV_IDENTITY_HASH_KEY_FILE, "")
        return cls(
            session_secret=_session_secret(environ.get(ENV_SESSION_SECRET_FILE, "")),
            sync_service_sid=environ.get(ENV_SYNC_SERVICE_SID, ""),
            token_ttl=parse_duration(ttl, ENV_TOKEN_TTL) if ttl else None,
            allowed_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
            identity_hash_key=key_from_file(hash_key_file, ENV_IDENTITY_HASH_KEY_FILE) if hash_key_file else None,
        )


def _check_ttl(ttl: dt.timedelta) -> None:
    if ttl % dt.timedelta(seconds=1):
        msg = f"{ENV_TOKEN_TTL}: {ttl.total_seconds()}s is not a whole number of seconds"
        raise ValueError(msg)
    if not MIN_TTL <= ttl <= MAX_TTL:
        msg = (
            f"{ENV_TOKEN_TTL}: {_format(ttl)} is outside what synctoken ever issues, "
            f"3m to 24h (the Sync SDK asks for a new token 3 minutes before expiry; Twilio refuses over 24 hours)"
        )
        raise ValueError(msg)


def _format(ttl: dt.timedelta) -> str:
    # As the variable is written: 90000 seconds is "25h", 150 is "2m30s".
    seconds = int(ttl.total_seconds())
    if seconds <= 0:
        return f"{seconds}s"
    parts = [(seconds // 3600, "h"), (seconds // 60 % 60, "m"), (seconds % 60, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)


def _session_secret(path: str) -> bytes | None:
    if not path:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{ENV_SESSION_SECRET_FILE}: cannot read {path}: {exc.strerror}") from None
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"{ENV_SESSION_SECRET_FILE}: {path} holds {len(secret)} bytes; at least {_MIN_SECRET_BYTES} are needed"
        )
    return secret

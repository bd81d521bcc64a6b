"""The BFF's own settings, from BFF_* environment variables (synctoken's are the client library's SYNCTOKEN_*)."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from synctoken_bff._durations import parse_duration

ENV_SESSION_SECRET_FILE = "BFF_SESSION_SECRET_FILE"  # noqa: S105 - a variable's name, not a secret
ENV_SYNC_SERVICE_SID = "BFF_SYNC_SERVICE_SID"
ENV_TOKEN_TTL = "BFF_TOKEN_TTL"  # noqa: S105 - ditto
ENV_ALLOWED_ORIGINS = "BFF_ALLOWED_ORIGINS"

# HMAC-SHA256 keys shorter than this are guessable offline from one signed cookie.
_MIN_SECRET_BYTES = 32

_log = logging.getLogger("synctoken_bff")


@dataclass(frozen=True)
class Settings:
    """How the BFF asks for tokens and signs its session cookies."""

    session_secret: bytes = field(repr=False)
    sync_service_sid: str = ""
    """Empty: the caller's default Sync service, from synctoken's policy."""
    token_ttl: dt.timedelta | None = None
    """None: the caller's default TTL, from synctoken's policy."""
    allowed_origins: tuple[str, ...] = ()
    """Origins that may call /token from other sites; empty: no CORS headers at all."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from BFF_* variables; raise ValueError naming the variable that is wrong."""
        ttl = environ.get(ENV_TOKEN_TTL, "")
        origins = environ.get(ENV_ALLOWED_ORIGINS, "")
        return cls(
            session_secret=_session_secret(environ.get(ENV_SESSION_SECRET_FILE, "")),
            sync_service_sid=environ.get(ENV_SYNC_SERVICE_SID, ""),
            token_ttl=parse_duration(ttl, ENV_TOKEN_TTL) if ttl else None,
            allowed_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
        )


def _session_secret(path: str) -> bytes:
    if not path:
        # Fine for a demo; behind a balancer every process would sign differently, and a restart logs everyone out.
        _log.warning(
            "%s is not set: signing session cookies with a random key for this process only", ENV_SESSION_SECRET_FILE
        )
        return secrets.token_bytes(_MIN_SECRET_BYTES)
    secret = Path(path).read_bytes().strip()
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"{ENV_SESSION_SECRET_FILE}: {path} holds {len(secret)} bytes; at least {_MIN_SECRET_BYTES} are needed"
        )
    return secret

"""Connection settings from the SYNCTOKEN_* environment variables, for from_env() and the command line."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

_DURATION = re.compile(r"(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?")

DEFAULT_TIMEOUT = 5.0
"""Seconds for a whole call, gRPC's retries and the wait for a connection included."""

ENV_TARGET = "SYNCTOKEN_TARGET"
ENV_CA_FILE = "SYNCTOKEN_CA_FILE"
ENV_CERT_FILE = "SYNCTOKEN_CERT_FILE"
ENV_KEY_FILE = "SYNCTOKEN_KEY_FILE"
ENV_SERVER_NAME = "SYNCTOKEN_SERVER_NAME"
ENV_TIMEOUT = "SYNCTOKEN_TIMEOUT"


class MissingSettingError(ValueError):
    """A required setting is neither given nor in the environment."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"{variable} is not set")
        self.variable = variable


class ClientFiles(TypedDict):
    """The clients' keyword arguments a Connection settles: `TokenClient(target, **connection.client_files())`."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    server_name: str | None
    timeout: float


@dataclass(frozen=True)
class Connection:
    """Where synctoken is and how to prove who we are: the clients' constructor arguments."""

    target: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    server_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def client_files(self) -> ClientFiles:
        """Everything but the target, as the clients' keyword arguments."""
        return ClientFiles(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            server_name=self.server_name,
            timeout=self.timeout,
        )

    @classmethod
    def resolve(  # noqa: PLR0913 - each setting may be given, or else comes from its variable
        cls,
        environ: Mapping[str, str],
        *,
        target: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
    ) -> Connection:
        """Each setting as given, else from its SYNCTOKEN_* variable; raise ValueError for a missing or bad one."""

        def required(given: str | None, variable: str) -> str:
            value = given or environ.get(variable, "")
            if not value:
                raise MissingSettingError(variable)
            return value

        if timeout is None:
            timeout = parse_timeout(environ[ENV_TIMEOUT], ENV_TIMEOUT) if environ.get(ENV_TIMEOUT) else DEFAULT_TIMEOUT
        return cls(
            target=required(target, ENV_TARGET),
            ca_file=Path(required(ca_file, ENV_CA_FILE)),
            cert_file=Path(required(cert_file, ENV_CERT_FILE)),
            key_file=Path(required(key_file, ENV_KEY_FILE)),
            server_name=server_name or environ.get(ENV_SERVER_NAME) or None,
            timeout=timeout,
        )


def parse_duration(text: str) -> dt.timedelta:
    """A duration in the server's config grammar ("90s", "15m", "1h", "1h30m"); raise ValueError otherwise.

    The one parser of it on the client side: `synctoken-client issue --ttl` and the BFF's BFF_TOKEN_TTL.
    """
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 1h or 1h30m")
    hours, minutes, seconds = (int(match.group(g) or 0) for g in ("h", "m", "s"))
    return dt.timedelta(hours=hours, minutes=minutes, seconds=seconds)


def parse_timeout(text: str, what: str) -> float:
    """Seconds, a finite number above 0; raise ValueError naming `what` otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a number of seconds above 0, not {text!r}")
    return seconds

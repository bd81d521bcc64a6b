"""Connection settings from the SYNCTOKEN_* environment variables, for from_env() and the command line."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_DURATION = re.compile(r"(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?")

DEFAULT_TIMEOUT = 5.0
"""Seconds for a whole call, gRPC's retries and the wait for a connection included."""

ENV_TARGET = "SYNCTOKEN_TARGET"
ENV_CA_FILE = "SYNCTOKEN_CA_FILE"
ENV_CERT_FILE = "SYNCTOKEN_CERT_FILE"
ENV_KEY_FILE = "SYNCTOKEN_KEY_FILE"
ENV_SERVER_NAME = "SYNCTOKEN_SERVER_NAME"
ENV_TIMEOUT = "SYNCTOKEN_TIMEOUT"
ENV_SPIFFE_ENDPOINT_SOCKET = "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET"
"""The Workload API's socket: set, the client's certificate comes from it instead of the three files."""
ENV_SERVER_SPIFFE_ID = "SYNCTOKEN_SERVER_SPIFFE_ID"
SPIFFE_ENDPOINT_SOCKET = "SPIFFE_ENDPOINT_SOCKET"
"""The SPIFFE standard's variable: from_spiffe's socket when none is given."""

_FILE_VARIABLES = (ENV_CA_FILE, ENV_CERT_FILE, ENV_KEY_FILE)
# The standard's shape of a SPIFFE ID: a lower-case trust domain, then path segments of letters, digits, . - _
_SPIFFE_ID = re.compile(r"spiffe://(?P<trust_domain>[a-z0-9._-]+)(?P<path>(?:/[A-Za-z0-9._-]+)+)")


class MissingSettingError(ValueError):
    """A required setting is neither given nor in the environment."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"{variable} is not set")
        self.variable = variable


@dataclass(frozen=True)
class CertificateFiles:
    """The client's certificate from files: `TokenClient(target, ca_file=..., cert_file=..., key_file=...)`."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class WorkloadApi:
    """The client's certificate from the SPIFFE Workload API: `TokenClient.from_spiffe(target, endpoint_socket=...)`."""

    endpoint_socket: str


@dataclass(frozen=True)
class Connection:
    """Where synctoken is and how to prove who we are: the clients' constructor arguments."""

    target: str
    certificates: CertificateFiles | WorkloadApi
    server_name: str | None = None
    server_spiffe_id: str | None = None
    timeout: float = DEFAULT_TIMEOUT

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
        """Each setting as given, else from its SYNCTOKEN_* variable; raise ValueError for a missing or bad one.

        The certificate comes from the Workload API when SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET is set and no file
        is given, else from the three files.
        """

        def required(given: str | None, variable: str) -> str:
            value = given or environ.get(variable, "")
            if not value:
                raise MissingSettingError(variable)
            return value

        target = required(target, ENV_TARGET)
        if timeout is None:
            timeout = parse_timeout(environ[ENV_TIMEOUT], ENV_TIMEOUT) if environ.get(ENV_TIMEOUT) else DEFAULT_TIMEOUT
        certificates: CertificateFiles | WorkloadApi
        socket = environ.get(ENV_SPIFFE_ENDPOINT_SOCKET, "")
        if socket and not (ca_file or cert_file or key_file):
            both = [v for v in _FILE_VARIABLES if environ.get(v)]
            if both:
                # Which one wins would be a guess: say so rather than pick.
                raise ValueError(f"{ENV_SPIFFE_ENDPOINT_SOCKET} and {', '.join(both)} are both set: unset one")
            socket_path(socket, ENV_SPIFFE_ENDPOINT_SOCKET)
            certificates = WorkloadApi(socket)
        else:
            certificates = CertificateFiles(
                ca_file=Path(required(ca_file, ENV_CA_FILE)),
                cert_file=Path(required(cert_file, ENV_CERT_FILE)),
                key_file=Path(required(key_file, ENV_KEY_FILE)),
            )
        server_spiffe_id = environ.get(ENV_SERVER_SPIFFE_ID) or None
        if server_spiffe_id is not None:
            spiffe_trust_domain(server_spiffe_id, ENV_SERVER_SPIFFE_ID)
        return cls(
            target=target,
            certificates=certificates,
            server_name=server_name or environ.get(ENV_SERVER_NAME) or None,
            server_spiffe_id=server_spiffe_id,
            timeout=timeout,
        )


def socket_path(endpoint: str, what: str) -> str:
    """The file of a Workload API socket named as the standard says (`unix:///run/spire/agent.sock`).

    Raise ValueError naming `what` otherwise: py-spiffe speaks to Unix sockets only.
    """
    scheme, _, rest = endpoint.partition(":")
    # unix:///path and unix:/path name the same file; unix://host/path names a host, which a Unix socket has not,
    # and unix:path is relative, which the standard does not allow (and which the server refuses too).
    if (
        scheme != "unix"
        or not rest.startswith("/")
        or (rest.startswith("//") and not rest.startswith("///"))
        or not rest.strip("/")
    ):
        raise ValueError(f"{what} must name a Unix socket as unix:///path/to/agent.sock, not {endpoint!r}")
    return "/" + rest.lstrip("/")


def spiffe_trust_domain(spiffe_id: str, what: str) -> str:
    """The trust domain of a workload's SPIFFE ID (spiffe://example.org/ns/x); raise ValueError naming `what`."""
    match = _SPIFFE_ID.fullmatch(spiffe_id)
    if match is None or any(segment in {".", ".."} for segment in match["path"].split("/")):
        raise ValueError(
            f"{what} must be a workload's SPIFFE ID such as spiffe://example.org/ns/prod/sa/synctoken, "
            f"not {spiffe_id!r}"
        )
    return match["trust_domain"]


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

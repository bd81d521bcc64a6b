"""`[tls] source = "spiffe"`: the server's certificate and client CAs from the SPIFFE Workload API, not from files.

The keys live in [tls] beside the file keys; one source or the other, never both: a file key under
spiffe (or a Workload API key under files) is an error, not ignored, so that nobody believes a file
is served when it is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from synctoken_server.config.reader import TomlReader

SOURCE_FILES = "files"
SOURCE_SPIFFE = "spiffe"
FILE_KEYS = ("cert_file", "key_file", "client_ca_file")
KEYS = frozenset({"source", "endpoint_socket", "first_svid_timeout"})
"""The [tls] keys of the source choice and of the Workload API (the file keys are in schema.py)."""

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
"""Where SPIFFE workloads find the Workload API when nothing else says (the SPIFFE Workload Endpoint standard)."""

_FIRST_SVID_TIMEOUT = "10s"
_MAX_FIRST_SVID_TIMEOUT = 600


@dataclass(frozen=True)
class WorkloadApiSettings:
    """Where the agent is, and how long start-up waits for its first X509-SVID."""

    endpoint_socket: str
    """As configured: unix:///path or unix:/path (what SPIFFE_ENDPOINT_SOCKET holds)."""
    first_svid_timeout: int
    """Seconds."""

    @property
    def target(self) -> str:
        """The socket as a gRPC target (unix:/path)."""
        return "unix:/" + self.endpoint_socket.removeprefix("unix:").lstrip("/")


def read_source(r: TomlReader, tls: Mapping[str, Any]) -> WorkloadApiSettings | None:
    """`tls.source` and its keys: None for files (the default), the Workload API's settings for spiffe."""
    source = r.get(tls, "tls", "source", str, SOURCE_FILES)
    if source not in (SOURCE_FILES, SOURCE_SPIFFE):
        raise r.fail("tls.source", f"{source!r} is not one of {SOURCE_FILES}, {SOURCE_SPIFFE}")
    if source == SOURCE_FILES:
        for name in ("endpoint_socket", "first_svid_timeout"):
            if name in tls:
                raise r.fail(f"tls.{name}", f'only applies when tls.source is "{SOURCE_SPIFFE}"')
            r.note(f"tls.{name}", None)
        return None
    for name in FILE_KEYS:
        if name in tls:
            raise r.fail(
                f"tls.{name}",
                f'not with tls.source = "{SOURCE_SPIFFE}": the certificate and the client CAs come from the '
                "Workload API; remove the file keys, or set tls.source to files",
            )
        r.note(f"tls.{name}", None)
    return WorkloadApiSettings(
        endpoint_socket=_endpoint(r, tls),
        first_svid_timeout=r.duration(
            tls, "tls", "first_svid_timeout", _FIRST_SVID_TIMEOUT, 1, _MAX_FIRST_SVID_TIMEOUT
        ),
    )


def _endpoint(r: TomlReader, tls: Mapping[str, Any]) -> str:
    if "endpoint_socket" in tls:
        endpoint = r.get(tls, "tls", "endpoint_socket", str)
        where = ""
    else:
        endpoint = r.environ.get(ENDPOINT_ENV, "")
        where = f" (from {ENDPOINT_ENV})"
        if not endpoint:
            raise r.fail("tls.endpoint_socket", f"missing: set it, or {ENDPOINT_ENV} in the environment")
        r.note("tls.endpoint_socket", endpoint)
    path = endpoint.removeprefix("unix:")
    # unix:///path or unix:/path, as the standard writes them (unix://host/path names no file); an agent
    # on tcp://, which the standard also allows, is not supported: SPIRE's agent serves a Unix socket.
    absolute = path.startswith("/") and (path.startswith("///") or not path.startswith("//"))
    if not endpoint.startswith("unix:") or not absolute or not path.strip("/"):
        raise r.fail(
            "tls.endpoint_socket",
            f"{endpoint!r}{where} is not unix:///absolute/path (the Workload API's Unix socket)",
        )
    return endpoint

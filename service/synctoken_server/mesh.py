"""Mesh mode: a second, plaintext listener for a sidecar that terminated the caller's mTLS, and who its caller is.

The sidecar (Istio, Linkerd, Consul: Envoy) passes the caller's certificate
details in x-forwarded-client-cert. That header is read only on the mesh
listener, a Unix domain socket or a loopback port that only the sidecar can
reach: anyone can write the header, so it means something only where nobody
but the sidecar can connect. A call on the mTLS listener that carries it is
refused, never silently served on its certificate: a client that sends it
expects it to be used, and that is a misconfiguration to surface.

Which listener a call came in on is told by its transport: the mTLS
listener accepts nothing but TLS, and the mesh listener is the only one
without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from synctoken_server import xfcc
from synctoken_server.configfile import TomlReader
from synctoken_server.errors import CallerUnauthenticated, ForwardedCertNotTrusted
from synctoken_server.identity import (
    NO_CERTIFICATE,
    NO_WORKLOAD_PATH,
    NOT_A_SPIFFE_ID,
    CallerIdentityRules,
    IdentitySource,
    parse_spiffe_id,
)

_LOOPBACK = ("127.0.0.1", "[::1]", "localhost")
NOT_ONE_HEADER = "the mesh listener needs exactly one x-forwarded-client-cert header"


@dataclass(frozen=True)
class MeshListener:
    """Where the sidecar connects, in gRPC's address form (`unix:/path` or `127.0.0.1:port`)."""

    address: str


def read_mesh(r: TomlReader, data: Mapping[str, Any], source: IdentitySource) -> MeshListener | None:
    """`[mesh]`: the listener on which x-forwarded-client-cert is trusted, or None (mesh mode off)."""
    if "mesh" not in data:
        return None
    table = r.table(data, "mesh", {"listen", "trust_forwarded_client_cert"})
    listen = r.get(table, "mesh", "listen", str)
    # Saying so is the point: a listener that trusts a header anyone can write is never made by accident.
    if not r.get(table, "mesh", "trust_forwarded_client_cert", bool, default=False):
        raise r.fail("mesh.trust_forwarded_client_cert", "must be true: the mesh listener exists to trust it")
    if source is not IdentitySource.SPIFFE:
        raise r.fail("mesh", "needs identity.source = spiffe: the caller is taken from the header's URI")
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path:
            raise r.fail("mesh.listen", "unix: needs a socket path")
        return MeshListener(f"unix:{r.path(path)}")
    host, _, port = listen.rpartition(":")
    if host not in _LOOPBACK or not port.isascii() or not port.isdigit() or int(port) > 65535:  # noqa: PLR2004 - the largest port
        raise r.fail(
            "mesh.listen",
            f"{listen!r} is neither unix:<path> nor a loopback host:port (127.0.0.1, [::1] or localhost): "
            "only the sidecar may reach it",
        )
    return MeshListener(listen)


def caller_id(
    rules: CallerIdentityRules,
    auth_context: Mapping[str, Sequence[bytes]],
    forwarded: Sequence[str],
    *,
    mesh: bool,
) -> str:
    """The caller id of a call: from its certificate on the mTLS listener, from XFCC on the mesh listener.

    `forwarded` is every x-forwarded-client-cert value the call carries.
    """
    if auth_context.get("transport_security_type") == [b"ssl"]:
        if forwarded:
            raise ForwardedCertNotTrusted
        return rules.caller_id(auth_context)
    if not mesh:  # no plaintext listener exists; refuse rather than trust a transport we did not expect
        raise CallerUnauthenticated(NO_CERTIFICATE)
    if len(forwarded) != 1:
        raise CallerUnauthenticated(NOT_ONE_HEADER)
    try:
        uri = xfcc.nearest_uri(forwarded[0])
    except xfcc.XfccError as exc:
        raise CallerUnauthenticated(f"its x-forwarded-client-cert header is malformed: {exc}") from None
    try:
        spiffe_id = parse_spiffe_id(uri)
    except ValueError:
        raise CallerUnauthenticated(NOT_A_SPIFFE_ID, (uri,)) from None
    if not spiffe_id.path:
        raise CallerUnauthenticated(NO_WORKLOAD_PATH, (uri,))
    if spiffe_id.trust_domain.name not in rules.trust_domains:
        # Safe to name: it passed the trust domain grammar.
        raise CallerUnauthenticated(f"trust domain {spiffe_id.trust_domain.name} is not trusted", (uri,))
    return uri

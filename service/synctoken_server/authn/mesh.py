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

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from synctoken_server.authn import xfcc
from synctoken_server.authn.callercert import (
    NO_CERTIFICATE,
    CallerCertRules,
    workload_id,
)
from synctoken_server.errors import CallerUnauthenticated, ForwardedCertNotTrusted

NOT_ONE_HEADER = "the mesh listener needs exactly one x-forwarded-client-cert header"
# The header's URI= is the forwarded certificate's URI SAN; these say it as the header does.
NOT_A_SPIFFE_ID = "its URI is not a SPIFFE ID"
NO_WORKLOAD_PATH = "its URI names a trust domain, not a workload (it has no path)"

_OWNER_ONLY = 0o600
_OWNER_AND_GROUP = 0o660


@dataclass(frozen=True)
class MeshListener:
    """Where the sidecar connects, as configured, and what is bound for it."""

    address: str
    """As configured, in gRPC's form: `unix:/absolute/path` or `host:port`."""
    bind: tuple[str, ...]
    """The gRPC addresses to bind: the unix address, or each loopback address the host resolved to
    (as a literal, so that gRPC binds what was checked rather than resolving the name again)."""
    socket_path: Path | None = None
    """The Unix socket's path; None for a loopback port."""
    socket_group: int | None = None
    """The group (gid) the socket is given, mode 0660; None: owner only, mode 0600."""

    @property
    def socket_mode(self) -> int:
        """The Unix socket's permission bits: whoever can connect can name any caller."""
        return _OWNER_ONLY if self.socket_group is None else _OWNER_AND_GROUP


def is_loopback(address: str) -> bool:
    """Whether an IP address (v4, v6, or v4 mapped into v6, as gRPC binds v4 on a v6 socket) is loopback."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def caller_id(
    rules: CallerCertRules,
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
        raise CallerUnauthenticated(NOT_ONE_HEADER, forwarded=True)
    try:
        uri = xfcc.nearest_uri(forwarded[0])
    except xfcc.XfccError as exc:
        raise CallerUnauthenticated(f"the header is malformed: {exc}", forwarded=True) from None
    try:
        spiffe_id = workload_id(uri, NOT_A_SPIFFE_ID, NO_WORKLOAD_PATH)
    except ValueError as exc:
        raise CallerUnauthenticated(str(exc), (uri,), forwarded=True) from None
    rules.check_trust_domain(spiffe_id.trust_domain.name, uri, forwarded=True)
    return uri

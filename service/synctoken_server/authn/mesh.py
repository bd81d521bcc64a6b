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

import grp
import ipaddress
import os
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synctoken_server.authn import xfcc
from synctoken_server.authn.identity import (
    NO_CERTIFICATE,
    CallerIdentityRules,
    IdentitySource,
    parse_spiffe_id,
)
from synctoken_server.configfile import TomlReader
from synctoken_server.errors import CallerUnauthenticated, ForwardedCertNotTrusted
from synctoken_server.metrics import split_listen

NOT_ONE_HEADER = "the mesh listener needs exactly one x-forwarded-client-cert header"
# The header's URI= is the forwarded certificate's URI SAN; these say it as the header does.
NOT_A_SPIFFE_ID = "its URI is not a SPIFFE ID"
NO_WORKLOAD_PATH = "its URI names a trust domain, not a workload (it has no path)"

_KEYS = {"listen", "trust_forwarded_client_cert", "socket_group"}
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


def read_mesh(
    r: TomlReader, data: Mapping[str, Any], source: IdentitySource, server_listen: str
) -> MeshListener | None:
    """`[mesh]`: the listener on which x-forwarded-client-cert is trusted, or None (mesh mode off)."""
    if "mesh" not in data:
        return None
    table = r.table(data, "mesh", _KEYS)
    listen = r.get(table, "mesh", "listen", str)
    # Saying so is the point: a listener that trusts a header anyone can write is never made by accident.
    if not r.get(table, "mesh", "trust_forwarded_client_cert", bool, default=False):
        raise r.fail("mesh.trust_forwarded_client_cert", "must be true: the mesh listener exists to trust it")
    if source is not IdentitySource.SPIFFE:
        raise r.fail("mesh", "needs identity.source = spiffe: the caller is taken from the header's URI")
    if listen.startswith("unix:"):
        return _unix_listener(r, listen.removeprefix("unix:"), _socket_group(r, table))
    if "socket_group" in table:
        raise r.fail("mesh.socket_group", "applies to a unix:<path> listener only")
    return _loopback_listener(r, listen, server_listen)


def _unix_listener(r: TomlReader, text: str, group: int | None) -> MeshListener:
    if not text:
        raise r.fail("mesh.listen", "unix: needs a socket path")
    path = r.path(text)
    directory = path.parent
    # Said here, so that check-config says it too: gRPC's own bind error is "in use or not available".
    try:
        status = directory.stat()
    except FileNotFoundError:
        raise r.fail("mesh.listen", f"directory {directory} does not exist") from None
    except OSError as exc:
        raise r.fail("mesh.listen", f"directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(status.st_mode):
        raise r.fail("mesh.listen", f"{directory} is not a directory")
    if warning := _directory_warning(directory, status):
        r.warnings.append(f"{r.source}: mesh.listen: {warning}")
    return MeshListener(f"unix:{path}", (f"unix:{path}",), path, group)


def _directory_warning(directory: Path, status: os.stat_result) -> str | None:
    """Why others could put their own socket in place of this one (and so receive the sidecar's calls)."""
    mode = stat.S_IMODE(status.st_mode)
    # A warning, not an error, as for a key file others can read: a shared volume (a Kubernetes
    # emptyDir is 0777) may be the only place both containers see, and the pod its only users.
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        return (
            f"directory {directory} is writable by group or others (mode {mode:04o}): they can replace the "
            "socket with their own and receive the sidecar's calls; make it writable by its owner only "
            "(chmod go-w), or set the sticky bit"
        )
    if status.st_uid not in (0, os.geteuid()):
        return (
            f"directory {directory} belongs to uid {status.st_uid}, who can replace the socket with their own "
            "and receive the sidecar's calls; use a directory owned by this user or root"
        )
    return None


def _socket_group(r: TomlReader, table: Mapping[str, Any]) -> int | None:
    """`socket_group`, a group name or gid, as a gid this process can give the socket to."""
    value = table.get("socket_group")
    if value is None:
        r.note("mesh.socket_group", None)
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise r.fail("mesh.socket_group", "must be a group name or a gid")
    r.note("mesh.socket_group", value)
    if isinstance(value, int):
        gid = value
    else:
        try:
            gid = grp.getgrnam(value).gr_gid
        except KeyError:
            raise r.fail("mesh.socket_group", f"no group named {value!r}") from None
    # chown(2) gives a file to a group only if the process is in it (or is root): say so now, not at bind.
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise r.fail("mesh.socket_group", f"this process (uid {os.geteuid()}) is not in group {value}")
    return gid


def _loopback_listener(r: TomlReader, listen: str, server_listen: str) -> MeshListener:
    address = split_listen(listen)
    if address is None:
        raise r.fail("mesh.listen", f"{listen!r} is neither unix:<path> nor a loopback host:port")
    host, port = address
    # The name is resolved as gRPC resolves it (the system's hosts file, then DNS), and every address
    # must be loopback: `localhost` mapped to 0.0.0.0 in /etc/hosts is not loopback, whatever its name.
    try:
        found = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise r.fail("mesh.listen", f"{host} does not resolve: {getattr(exc, 'strerror', None) or exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    outside = [a for a in addresses if not is_loopback(a)]
    if outside:
        raise r.fail(
            "mesh.listen",
            f"{listen!r} resolves to {', '.join(outside)}, which is not loopback: only the sidecar may reach "
            "the mesh listener (use 127.0.0.1, [::1] or unix:<path>)",
        )
    server_port = split_listen(server_listen)
    if port != 0 and server_port is not None and server_port[1] == port:
        # On one port, whichever of the two listeners a connection reaches depends on its address
        # family (localhost:P beside 127.0.0.1:P): a TLS client could be served in plaintext.
        raise r.fail(
            "mesh.listen",
            f"port {port} is server.listen's port too: give the plaintext mesh listener a port of its own",
        )
    return MeshListener(listen, tuple(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses))


def is_loopback(address: str) -> bool:
    """Whether an IP address (v4, v6, or v4 mapped into v6, as gRPC binds v4 on a v6 socket) is loopback."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


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
        raise CallerUnauthenticated(NOT_ONE_HEADER, forwarded=True)
    try:
        uri = xfcc.nearest_uri(forwarded[0])
    except xfcc.XfccError as exc:
        raise CallerUnauthenticated(f"the header is malformed: {exc}", forwarded=True) from None
    try:
        spiffe_id = parse_spiffe_id(uri)
    except ValueError:
        raise CallerUnauthenticated(NOT_A_SPIFFE_ID, (uri,), forwarded=True) from None
    if not spiffe_id.path:
        raise CallerUnauthenticated(NO_WORKLOAD_PATH, (uri,), forwarded=True)
    if spiffe_id.trust_domain.name not in rules.trust_domains:
        # Safe to name: it passed the trust domain grammar.
        raise CallerUnauthenticated(
            f"trust domain {spiffe_id.trust_domain.name} is not trusted", (uri,), forwarded=True
        )
    return uri

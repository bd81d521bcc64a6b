"""`[mesh]`: the listener where x-forwarded-client-cert is trusted, checked and read into `authn.mesh.MeshListener`."""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synctoken_server.authn.callercert import CallerIdSource
from synctoken_server.authn.mesh import MeshListener, is_loopback
from synctoken_server.config.reader import TomlReader
from synctoken_server.serveroptions import split_listen

KEYS = frozenset({"listen", "trust_forwarded_client_cert", "socket_group"})
"""What [mesh] may hold."""


def read_mesh(
    r: TomlReader, data: Mapping[str, Any], source: CallerIdSource, server_listen: str
) -> MeshListener | None:
    """`[mesh]`: the listener on which x-forwarded-client-cert is trusted, or None (mesh mode off)."""
    if "mesh" not in data:
        return None
    table = r.table(data, "mesh", KEYS)
    listen = r.get(table, "mesh", "listen", str)
    # Saying so is the point: a listener that trusts a header anyone can write is never made by accident.
    if not r.get(table, "mesh", "trust_forwarded_client_cert", bool, default=False):
        raise r.fail("mesh.trust_forwarded_client_cert", "must be true: the mesh listener exists to trust it")
    if source is not CallerIdSource.SPIFFE:
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

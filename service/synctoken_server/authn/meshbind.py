"""Binding the mesh listener so that only the sidecar can reach it, whatever the umask or the resolver says.

A Unix socket is created with an explicit mode (0600, or 0660 for a
configured group): connecting needs write permission on it, and anyone who
can connect can name any caller. A loopback port is bound at the addresses
the config loader resolved and checked; then the sockets actually bound are
read back from the kernel and every one must be loopback, on a port of its
own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import sys
from pathlib import Path

import grpc

from synctoken_server.authn.mesh import MeshListener, is_loopback

_BIND_UMASK = 0o177
"""Sockets are made 0777 minus the umask: under this one, 0600 from the start."""
_PROC = Path("/proc/self")
_LISTENING = "0A"
"""TCP_LISTEN in /proc/net/tcp's `st` column."""


def bind(server: grpc.aio.Server, mesh: MeshListener, tls_port: int) -> tuple[str, ...]:
    """Add the mesh listener to `server` (not yet started); return what it listens on, or OSError."""
    if mesh.socket_path is not None:
        _bind_unix(server, mesh, mesh.socket_path)
        return (mesh.address,)
    return _bind_loopback(server, mesh, tls_port)


def _bind_unix(server: grpc.aio.Server, mesh: MeshListener, path: Path) -> None:
    # gRPC binds in add_insecure_port, before anything is accepted, but the socket is reachable at its
    # path from then on: it must never exist with the process's umask (000 would let anyone connect).
    # The umask is process-wide; this runs while the server is being built, before any other thread
    # of ours creates files.
    previous = os.umask(_BIND_UMASK)
    try:
        server.add_insecure_port(mesh.address)
    except RuntimeError as exc:  # gRPC's way of saying bind() failed
        why = "directory does not exist" if not path.parent.is_dir() else "in use or not available"
        raise OSError(f"cannot listen on {mesh.address}: {why}") from exc
    finally:
        os.umask(previous)
    if mesh.socket_group is not None:
        os.chown(path, -1, mesh.socket_group)  # still 0600 meanwhile: the group gets in only by the chmod
    path.chmod(mesh.socket_mode)
    status = path.lstat()
    if not stat.S_ISSOCK(status.st_mode) or stat.S_IMODE(status.st_mode) != mesh.socket_mode:
        raise OSError(f"cannot listen on {mesh.address}: the socket was replaced while it was being made")


def _bind_loopback(server: grpc.aio.Server, mesh: MeshListener, tls_port: int) -> tuple[str, ...]:
    before = _own_sockets()
    port = 0
    for literal in mesh.bind:
        # Port 0: the first address picks the port, the others share it, as gRPC does for a name.
        address = literal if port == 0 else f"{literal.rpartition(':')[0]}:{port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {mesh.address} ({address}): in use or not available") from exc
    bound = _listening_addresses(_own_sockets() - before)
    if bound is None:  # no /proc (not Linux): what was bound is the literals the loader checked
        return tuple(f"{literal.rpartition(':')[0]}:{port}" for literal in mesh.bind)
    for host, bound_port in bound:
        # The loader checked the addresses; this checks what the kernel was actually given.
        if not is_loopback(host) or bound_port == tls_port:
            raise OSError(
                f"cannot listen on {mesh.address}: bound {_format(host, bound_port)}, which is "
                + ("not loopback" if not is_loopback(host) else "the mTLS listener's port")
            )
    return tuple(_format(host, bound_port) for host, bound_port in bound)


def _format(host: str, port: int) -> str:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"{ip.ipv4_mapped}:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _own_sockets() -> set[str]:
    """The inodes of this process's sockets (empty without /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in (_PROC / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    return inodes


def _listening_addresses(inodes: set[str]) -> list[tuple[str, int]] | None:
    """The (address, port) each of these sockets listens on, from the kernel's tables; None without /proc."""
    found: list[tuple[str, int]] = []
    try:
        tables = [(_PROC / "net" / name).read_text().splitlines()[1:] for name in ("tcp", "tcp6")]
    except OSError:
        return None
    for row in (line.split() for table in tables for line in table):
        local, state, inode = row[1], row[3], row[9]
        if state == _LISTENING and inode in inodes:
            found.append(_decode(local))
    return found


def _decode(local: str) -> tuple[str, int]:
    """/proc/net/tcp's `0100007F:1F90` as ("127.0.0.1", 8080): the address in 32-bit words of host byte order."""
    hex_address, hex_port = local.split(":")
    words = (bytes.fromhex(hex_address[i : i + 8]) for i in range(0, len(hex_address), 8))
    raw = b"".join(word[::-1] if sys.byteorder == "little" else word for word in words)
    return str(ipaddress.ip_address(raw)), int(hex_port, 16)

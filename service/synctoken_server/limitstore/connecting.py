"""How the script client reaches Redis: a unix socket, or TCP (TLS included) after one name lookup at a time.

Why not `loop.create_connection(host=<name>)`: it looks the name up with
getaddrinfo in a pool thread, and a lookup outlives the opening that asked
for it (a timeout cancels the wait, not the thread). With a resolver that
hangs (glibc gives up after timeout x attempts per name server: 30 s with
three servers and its defaults), each opening, one per breaker cool-down once
the breaker is open, would leave one more pool thread stuck until all of the
pool's were: on uvloop, libuv's pool of 4 (UV_THREADPOOL_SIZE); on asyncio's
loop, its default executor, where config reloads and certificate refreshes
(asyncio.to_thread) would queue behind them, and which the process joins as it
exits, so a stop would wait for the resolver. Here a lookup runs in a daemon
thread of its own, which neither holds a pool thread nor delays the exit, and
an opening that finds a lookup still running waits for that one instead of
starting another, so a hung resolver holds one thread per process at most.
An IP address in the URL is never looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from synctoken_server.policy.limitbackend import RedisSettings

_Protocol = TypeVar("_Protocol", bound=asyncio.Protocol)
_Address = tuple[socket.AddressFamily, socket.SocketKind, int, tuple[Any, ...]]
"""What connecting to one address takes: family, type, protocol, socket address (getaddrinfo's, less its name)."""


class Connector:
    """Opens connections to the Redis that `settings` names: the caller bounds each with its own timeout."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._lookup: asyncio.Task[list[_Address]] | None = None
        """The name lookup under way, if any: shared by the openings that need it, never cancelled by them."""

    async def connect(self, protocol: Callable[[], _Protocol]) -> _Protocol:
        """A new connection with `protocol` on it; OSError (ssl.SSLError among them) when none can be made."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        if settings.unix_socket:
            _, made = await loop.create_unix_connection(protocol, settings.unix_socket)
            return made
        context = _tls_context(settings) if settings.tls else None
        failure: OSError | None = None
        # Each address in turn, as create_connection does with the addresses it looks up itself.
        for family, kind, proto, address in await self._addresses():
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(0)  # non-blocking, as sock_connect needs
                await loop.sock_connect(sock, address)
                _, made = await loop.create_connection(
                    protocol, sock=sock, ssl=context, server_hostname=settings.host if context else None
                )
            except OSError as exc:
                sock.close()
                failure = exc
            except BaseException:
                sock.close()
                raise
            else:
                return made
        raise failure or OSError(f"{settings.host} has no address")

    async def _addresses(self) -> list[_Address]:
        host, port = self._settings.host, self._settings.port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if isinstance(ip, ipaddress.IPv6Address) else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, (host, port))]
        lookup = self._lookup
        if lookup is None or lookup.done():
            lookup = self._lookup = asyncio.create_task(_look_up(host, port))
            # Read even when every opening waiting for it has given up: not reported as never retrieved.
            lookup.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(lookup)


async def _look_up(host: str, port: int) -> list[_Address]:
    loop = asyncio.get_running_loop()
    found: asyncio.Future[list[_Address]] = loop.create_future()

    def look_up() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome = functools.partial(_settle, found, [], exc)
        else:
            addresses: list[_Address] = [(family, kind, proto, address) for family, kind, proto, _, address in infos]
            outcome = functools.partial(_settle, found, addresses, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is stopping, nobody waits
            loop.call_soon_threadsafe(outcome)

    try:
        threading.Thread(target=look_up, name="synctoken-redis-lookup", daemon=True).start()
    except RuntimeError as exc:
        # No thread to be had (a pids limit reached): an opening that failed, which the limits count and
        # fall back from as from any other, not an error of the call (loop.getaddrinfo, on libuv's pool, never
        # needed a new thread).
        raise OSError(errno.EAGAIN, f"cannot start a thread to look up {host}") from exc
    return await found


def _settle(found: asyncio.Future[list[_Address]], addresses: list[_Address], failure: OSError | None) -> None:
    if found.done():
        return
    if failure is None:
        found.set_result(addresses)
    else:
        found.set_exception(failure)


def _tls_context(settings: RedisSettings) -> ssl.SSLContext:
    """Verified TLS: the CA file (or the system's CAs), the host name checked, a client certificate if given."""
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context

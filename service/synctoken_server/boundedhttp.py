"""A plain-HTTP listener that cannot take the process's threads and file descriptors from the gRPC listener.

The metrics scrape (and any plaintext HTTP listener added later: health, say)
runs in the server process and draws on the same RLIMIT_NOFILE as the gRPC
listener. http.server as it ships gives every connection a thread and keeps it
for as long as the client likes: slow, half-sent requests could hold every free
descriptor, and each new gRPC connection then failed until they left. Here:

- a connection must send its whole request within REQUEST_SECONDS (a deadline,
  not a timeout per read: a client sending one byte at a time is dropped too),
  and its response is written within as long again;
- at most `connection_limit()` connections are served at once, and about
  CONNECTIONS_PER_SECOND a second; one more is answered 503 by the accepting
  thread and closed, without a thread of its own;
- that limit is a small share of the soft RLIMIT_NOFILE, so the rest stays
  for gRPC however many scrapers come.

One request per connection (HTTP/1.0): no connection idles between requests.
"""

from __future__ import annotations

import contextlib
import errno
import io
import resource
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REQUEST_SECONDS = 5.0
"""How long a connection has to send its request (and, again, to take the response)."""

MAX_CONNECTIONS = 16
"""Connections served at once, at most: a scraper or two, with room for a person's curl."""

FILES_SHARE = 16
"""At most 1/FILES_SHARE of the open-file limit goes to this listener's connections."""

CONNECTIONS_PER_SECOND = 10.0
"""Connections served per second on average (in bursts of up to the connection limit); more are answered 503.

What a flood costs is what each connection costs the process: a thread, the
HTTP parsing, the reply, all under the GIL the gRPC handlers need. Scrapers
come every few seconds; a refusal costs the accept, a write and the close.
"""

ACCEPT_BACKOFF_SECONDS = 0.1
"""The pause after accept() found no descriptor free."""

_REFUSAL = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def connection_limit(open_files: int | None = None) -> int:
    """How many connections a listener may serve at once under `open_files` (default: the soft RLIMIT_NOFILE)."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, open_files // FILES_SHARE))


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that fails with TimeoutError once `deadline` (time.monotonic) has passed."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self._connection = connection
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._connection.settimeout(remaining)
        return self._connection.recv_into(buffer)


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """Reads the request against REQUEST_SECONDS' deadline; writes the response within REQUEST_SECONDS; logs nothing.

    Subclasses add `do_GET` and the like, as for BaseHTTPRequestHandler.
    """

    def setup(self) -> None:
        """Set up the streams, reading through the request's deadline."""
        super().setup()
        self.rfile.close()  # the plain one; it holds a reference that would keep the socket open past its close
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + REQUEST_SECONDS))

    def parse_request(self) -> bool:
        """Parse the request read so far; then give the response REQUEST_SECONDS to be written."""
        parsed = super().parse_request()
        # The deadline reader left the socket's timeout at what remained of it;
        # sendall holds the whole response to this one.
        self.connection.settimeout(REQUEST_SECONDS)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        """Log nothing: a line per request would let a flood of requests fill the log."""


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer serving at most `connections` connections at once, each within REQUEST_SECONDS.

    And about CONNECTIONS_PER_SECOND a second, in bursts of up to `connections`.
    """

    daemon_threads = True  # each one ends within its deadlines; closing need not wait for them

    def __init__(
        self, host: str, port: int, handler: type[BoundedRequestHandler], connections: int | None = None
    ) -> None:
        """Bind `host`:`port` (IPv4 or IPv6, as `host` resolves); OSError if that fails."""
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.connections = connection_limit() if connections is None else connections
        self._slots = threading.BoundedSemaphore(self.connections)
        # A token bucket, touched only by the accepting thread.
        self._allowance = float(self.connections)
        self._allowance_at = time.monotonic()
        super().__init__((str(address[0]), int(address[1])), handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; when no descriptor is free, pause before saying so.

        The listening socket stays readable meanwhile: retrying at once would
        spin, holding the GIL the gRPC handlers need.
        """
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(ACCEPT_BACKOFF_SECONDS)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` on a thread of its own if the bounds allow; otherwise answer 503 and close it, here."""
        now = time.monotonic()
        refill = (now - self._allowance_at) * CONNECTIONS_PER_SECOND
        self._allowance, self._allowance_at = min(float(self.connections), self._allowance + refill), now
        if self._allowance < 1 or not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        self._allowance -= 1
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (none left): nothing else will free the slot
            self._slots.release()
            raise  # socketserver closes the connection

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Say nothing of a client that went away (a reset, a broken pipe); print anything else as socketserver does."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        # Never blocks: a fresh socket's send buffer takes these few bytes, and if not, the client loses only the 503.
        request.settimeout(0)
        with contextlib.suppress(OSError):
            request.send(_REFUSAL)
        self.shutdown_request(request)

"""The attempts of one call: each without waiting for a connection, repeated until the deadline while none is made.

gRPC's wait-for-ready would wait for a connection too, but silently: a TLS
handshake that fails on every try ends as a bare DEADLINE_EXCEEDED. A call that
does not wait fails at once while the channel has no connection, naming its
last connection error (see _connectfailure), so the clients make such attempts
in a loop: a refused handshake is raised as soon as it is seen, anything else
that kept the call from a server (a server restarting, not yet started) is
tried again after a pause, and the deadline bounds the whole call.

The channel reconnects on its own backoff meanwhile (at most 5 s, see
_channel); an attempt fails at once only while the channel has given up
connecting for now, so the pauses keep a dead server from spinning a loop, and
a server that comes back is reached at most a pause after the channel is.
"""

from __future__ import annotations

import time

import grpc

from synctoken.client._connectfailure import ConnectFailure, ServerCheck
from synctoken.client._errors import deadline_passed, failure_to_wait_out

FIRST_PAUSE = 0.1
"""Seconds before trying again after the first attempt that could not connect; doubled each time."""
MAX_PAUSE = 1.0
"""The longest pause between attempts: a failed attempt costs no I/O, and the server may be back any moment."""


class Attempts:
    """One call's deadline and what its attempts found so far."""

    def __init__(self, timeout: float, check: ServerCheck) -> None:
        self._deadline = time.monotonic() + timeout
        self._check = check
        self._pause = FIRST_PAUSE
        self._unreached: ConnectFailure | None = None

    def remaining(self) -> float:
        """Seconds left for the next attempt; raise the deadline's error if none are."""
        left = self._deadline - time.monotonic()
        if left <= 0 and self._unreached is not None:
            raise deadline_passed(self._unreached)
        return max(left, 0.0)

    def failed(self, error: grpc.RpcError) -> float:
        """Seconds to pause before the next attempt; raise the typed error if there is to be none.

        Call it in the `except` clause that caught `error`, so that the raised
        error chains to it.
        """
        self._unreached = failure_to_wait_out(error, self._check, self._unreached)
        pause, self._pause = self._pause, min(self._pause * 2, MAX_PAUSE)
        return max(0.0, min(pause, self._deadline - time.monotonic()))

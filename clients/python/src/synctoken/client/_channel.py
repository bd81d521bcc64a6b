"""How the clients' channels are set up (balancing and retries as data, keepalive), and how rotation swaps them.

Calls are spread over every address the target names, round robin: all the
addresses a DNS name resolves to (`dns:///synctoken.ns.svc:443` on a headless
Kubernetes Service) or an explicit list (`ipv4:10.0.0.1:443,10.0.0.2:443`).
With one address (a ClusterIP, an L4 balancer) that is what pick_first would
do, so it is always on.

Retries are gRPC's own, from the service config below: UNAVAILABLE is retried
with backoff, within the call's one deadline. Waiting for a connection, so that
a server that is restarting or starting late is waited for up to the deadline,
is the clients' own loop (see _attempts), not gRPC's wait-for-ready, which
would hide why no connection could be made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Generic, TypeVar

from synctoken.v1 import token_service_pb2

SERVICE = token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name

RETRY_POLICY = {
    # gRPC caps attempts at 5. Backoffs are jittered in [0, backoff), so five
    # attempts span at most 1.5 s: well inside the default 5 s deadline.
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    # UNAVAILABLE is the only code the server means as "try again" (e.g.
    # AUDIT_UNAVAILABLE, where nothing was issued). DEADLINE_EXCEEDED is never
    # retried: the deadline bounds the call with its retries.
    "retryableStatusCodes": ["UNAVAILABLE"],
}

SERVICE_CONFIG = {
    # One connection per address, each call (and each retry of it) on the next
    # ready one: a replica that dies is skipped as soon as its connection
    # fails, and its calls' retries land on the others. gRPC's default,
    # pick_first, would put every call of this client on one replica.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}],
    # When most attempts fail, stop retrying (each failure costs a token, each
    # success earns a tenth back): a fleet of clients must not triple its
    # traffic at a server that is already failing.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def several_addresses(target: str) -> bool:
    """Whether the target lists more than one address itself (`ipv4:a:p1,b:p2`), rather than naming them."""
    scheme, _, addresses = target.partition(":")
    return scheme in {"ipv4", "ipv6"} and "," in addresses


def channel_options(server_name: str | None) -> list[tuple[str, str | int]]:
    """Options for every channel a client opens."""
    options: list[tuple[str, str | int]] = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        # Ours, whatever DNS TXT records say.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # A default gRPC server (synctoken is one) counts pings more often than
        # every 5 minutes, and any ping on a connection with no call, as abuse,
        # and soon answers GOAWAY "too_many_pings". So: ping only during
        # calls, at the rate it accepts. Enabling keepalive also sets
        # TCP_USER_TIMEOUT to the ping timeout, so a connection whose packets go
        # unacknowledged for 20 s is dropped. Idle connections need no pings:
        # the server closes them after its idle_timeout, and the channel
        # reconnects on the next call.
        ("grpc.keepalive_time_ms", 5 * 60 * 1000),
        ("grpc.keepalive_timeout_ms", 20 * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
        # gRPC's default grows to 2 minutes between reconnection attempts; a
        # long-lived client would then sit out a server's restart far longer
        # than its calls' deadlines.
        ("grpc.max_reconnect_backoff_ms", 5 * 1000),
    ]
    if server_name:
        # The name the server certificate must carry, when it is not the target's host.
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


T = TypeVar("T")


@dataclass(eq=False)
class Generation(Generic[T]):
    """One channel (with whatever rides on it) and the calls now using it."""

    connection: T
    in_flight: int = 0


class Generations(Generic[T]):
    """The current channel, for new calls, and the replaced ones, until their last call finishes.

    Not thread-safe: the blocking client holds a lock around it, the asyncio one
    runs it on one loop. Methods that return a connection hand it over to be
    closed by the caller.
    """

    def __init__(self, first: T) -> None:
        self._current = Generation(first)
        self._retired: list[Generation[T]] = []

    @property
    def current(self) -> T:
        """The connection new calls use."""
        return self._current.connection

    def acquire(self) -> Generation[T]:
        """Count a call on the current connection."""
        self._current.in_flight += 1
        return self._current

    def release(self, generation: Generation[T]) -> T | None:
        """Count a call as finished; return its connection if it was replaced and this was its last call."""
        generation.in_flight -= 1
        # Not among the retired: current, or already handed over by drain().
        if generation.in_flight or generation not in self._retired:
            return None
        self._retired.remove(generation)
        return generation.connection

    def replace(self, connection: T) -> T | None:
        """Make `connection` current; return the old one if no call is using it, else keep it until release."""
        old, self._current = self._current, Generation(connection)
        if old.in_flight:
            self._retired.append(old)
            return None
        return old.connection

    def drain(self) -> list[T]:
        """Every connection, current and replaced, for closing the client."""
        connections = [self._current.connection, *(g.connection for g in self._retired)]
        self._retired.clear()
        return connections

    def __len__(self) -> int:
        return 1 + len(self._retired)

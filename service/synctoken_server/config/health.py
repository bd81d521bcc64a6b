"""`[health]`: the plaintext listener the kubelet probes, or no table and no such listener."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synctoken_server.config.reader import TomlReader
from synctoken_server.serveroptions import split_listen

KEYS = frozenset({"listen"})
"""What [health] may hold."""


def read_listen(r: TomlReader, data: Mapping[str, Any], others: Mapping[str, str | None]) -> str | None:
    """`[health] listen`, checked against the other listeners (`others`: key to address); None without [health].

    The port must be none of theirs: with --workers every listener is bound with SO_REUSEPORT, so on a
    shared port the kernel would hand some TLS clients to the plaintext health server, and the reverse.
    """
    table = r.table(data, "health", KEYS, required=False)
    if "health" not in data:
        return None
    listen = r.listen(table, "health", "listen", "0.0.0.0:8081")
    address = split_listen(listen)
    port = address[1] if address is not None else 0
    for key, other in others.items():
        other_address = split_listen(other) if other is not None else None
        if port != 0 and other_address is not None and other_address[1] == port:
            raise r.fail(
                "health.listen",
                f"port {port} is {key}'s port too: give the plaintext health listener a port of its own",
            )
    return listen

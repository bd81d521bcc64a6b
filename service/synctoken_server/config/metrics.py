"""`[metrics]`: where Prometheus scrapes, or no table and no metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synctoken_server.config.reader import TomlReader
from synctoken_server.metrics import split_listen

KEYS = frozenset({"listen"})
"""What [metrics] may hold."""


def read_listen(r: TomlReader, data: Mapping[str, Any]) -> str | None:
    """`[metrics] listen`, checked; None when there is no [metrics] table (metrics are off)."""
    table = r.table(data, "metrics", KEYS, required=False)
    if "metrics" not in data:
        return None
    listen = r.get(table, "metrics", "listen", str)
    if split_listen(listen) is None:
        raise r.fail("metrics.listen", f"{listen!r} is not host:port (e.g. 127.0.0.1:9464)")
    return listen

"""`[metrics]`: where Prometheus scrapes, or no table and no metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synctoken_server.config.reader import TomlReader

KEYS = frozenset({"listen"})
"""What [metrics] may hold."""


def read_listen(r: TomlReader, data: Mapping[str, Any]) -> str | None:
    """`[metrics] listen`, checked; None when there is no [metrics] table (metrics are off)."""
    table = r.table(data, "metrics", KEYS, required=False)
    if "metrics" not in data:
        return None
    return r.listen(table, "metrics", "listen", "127.0.0.1:9464")

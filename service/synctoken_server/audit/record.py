"""The audit log: one structured line per IssueToken decision, written before any token leaves.

Fields are chosen here, in one place, so that no secret and no token can slip
in: a token appears only as its token_id fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from synctoken_server.audit import logs
from synctoken_server.errors import AuditUnavailable

EVENT_TOKEN_DECISION = "token.decision"  # noqa: S105 - an event name, not a password
EVENT_CALLER_LOOKUP = "caller.lookup"
EVENT_WRITABLE_AGAIN = "audit.writable_again"

OUTCOME_ISSUED = "issued"
OUTCOME_VALIDATED = "validated"
OUTCOME_DENIED = "denied"
OUTCOME_ANSWERED = "answered"


_NO_CONTEXT: Mapping[str, object] = MappingProxyType({})


class AuditLog:
    """Writes decision records; a record that cannot be written is an error, not a shrug."""

    def __init__(self, logger: Any | None = None) -> None:
        self._log = logger if logger is not None else logs.AuditLogger()
        self.writable = True
        """False since the last write failed; health reports NOT_SERVING meanwhile."""

    def record(self, event: str, context: Mapping[str, object] = _NO_CONTEXT, **fields: object) -> None:
        """Write one record; raise AuditUnavailable unless all of it, newline included, was written.

        `context` is what the RPC established (rpc, peer, caller, identity,
        service...); `fields` adds the outcome-specific ones, and wins where
        both name a field.
        """
        try:
            self._log.info(event, **{**context, **fields})
        except Exception as exc:  # whatever broke the write: fail closed
            self.writable = False
            raise AuditUnavailable from exc
        self.writable = True

    def probe(self) -> bool:
        """Whether the log is writable; while it is not, try a line saying writing works again.

        Besides this log's own last write, the shared output is checked without
        writing (a pipe nobody reads, a full disk), and any line that failed
        there counts: health must not wait for the next token request to learn.
        """
        if not logs.output_looks_ready():
            # Not even a probe line: on a nearly full disk it would fit where records do not.
            return False
        if self.writable and logs.output_last_write_ok():
            return True
        try:
            self.record(EVENT_WRITABLE_AGAIN)
        except AuditUnavailable:
            return False
        return True


def ms_since(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), for the duration_ms field."""
    return round((time.perf_counter() - started) * 1000, 3)

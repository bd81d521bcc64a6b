"""In-process micro-benchmarks: synctoken's issuing path against a bare AccessToken and one HMAC.

Each figure is the median, over `repeats` runs, of the mean time per call in a
run of `number` calls (timeit), in microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import SyncGrant

from synctoken.v1 import token_service_pb2 as pb
from synctoken_server import logs
from synctoken_server.audit import AuditLog
from synctoken_server.config import load_config
from synctoken_server.devenv import DEV_CLIENT_ID
from synctoken_server.issuing import TokenIssuer
from synctoken_server.keyledger import SignedExpiries
from synctoken_server.limits import RateLimiter
from synctoken_server.metrics import Metrics
from synctoken_server.snapshot import Snapshot


def _interleaved_medians_us(funcs: dict[str, Callable[[], object]], number: int, repeats: int) -> dict[str, float]:
    # One run of each in turn, `repeats` times over, so that a noisy moment on
    # this shared machine lands on all of them rather than on one.
    runs: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):
        for name, func in funcs.items():
            runs[name].append(timeit.timeit(func, number=number) / number * 1e6)
    return {name: statistics.median(values) for name, values in runs.items()}


def run(config_path: Path, *, number: int, repeats: int, sink: BinaryIO) -> dict[str, float]:
    """Time the three paths; audit records go to `sink` through the production log set-up."""
    logs.configure(sink)
    config = load_config(config_path, environ={})
    creds = config.credentials
    snapshot = Snapshot.of(config)
    issuer = TokenIssuer(
        audit_log=AuditLog(), signed=SignedExpiries(), limiter=RateLimiter(time.monotonic), metrics=Metrics()
    )
    request = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
    service_sid = next(iter(config.policy)).sync_services[0]

    def synctoken_path() -> object:
        # What one IssueToken does between parsing and serialising, per-RPC log context included.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc="IssueToken", peer="ipv4:127.0.0.1:1", caller_id=DEV_CLIENT_ID)
        return issuer.issue(snapshot, DEV_CLIENT_ID, request, time.perf_counter())

    def bare_access_token() -> object:
        token = AccessToken(
            creds.account_sid,
            creds.api_key_sid,
            creds.api_secret,
            identity="alice",
            grants=[SyncGrant(service_sid=service_sid)],
        )
        return token.to_jwt()

    key = creds.api_secret.encode()
    signing_input = str(bare_access_token()).rpartition(".")[0].encode()

    def one_hmac() -> object:
        return hmac.new(key, signing_input, hashlib.sha256).digest()

    results = _interleaved_medians_us(
        {
            "synctoken_issue_path_us": synctoken_path,
            "bare_access_token_us": bare_access_token,
            "hmac_sha256_us": one_hmac,
        },
        number,
        repeats,
    )
    results["issue_path_over_bare"] = results["synctoken_issue_path_us"] / results["bare_access_token_us"]
    return results

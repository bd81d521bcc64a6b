"""In-process micro-benchmarks: synctoken's issuing path against a bare AccessToken and one HMAC.

Each run times `number` calls (timeit) of every function in turn, `repeats`
times over. A figure is the median over runs of the mean time per call, in
microseconds, with its quartiles; a ratio is the median of the ratios taken
run by run, so that each compares two functions timed moments apart.

The issuing path is timed twice, with the direct minter and with the twilio
library's (the minter before it), side by side in the same runs.
`python -m bench.micro` runs this alone and prints the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import SyncGrant

from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.audit import logs, record
from synctoken_server.audit.record import AuditLog
from synctoken_server.config.schema import load_config
from synctoken_server.dev.devenv import DEV_CLIENT_ID
from synctoken_server.policy.limits import RateLimiter
from synctoken_server.policy.rules import decide
from synctoken_server.rpc.issuing import TokenIssuer
from synctoken_server.rpc.servicer import _Rpc  # the servicer's own record context, not a copy of it
from synctoken_server.rpc.snapshot import Snapshot
from synctoken_server.tokens.keyledger import SignedExpiries
from synctoken_server.tokens.minting import Minter, TokenTimes, TwilioLibraryMinter, plan_times

RATIOS = {
    "issue_path_over_bare": ("synctoken_issue_path", "bare_access_token"),
    "issue_path_twilio_minter_over_bare": ("synctoken_issue_path_twilio_minter", "bare_access_token"),
    "issue_path_over_issue_path_twilio_minter": ("synctoken_issue_path", "synctoken_issue_path_twilio_minter"),
    "direct_mint_over_twilio_minter_mint": ("direct_mint", "twilio_minter_mint"),
}


def _interleaved_runs_us(funcs: dict[str, Callable[[], object]], number: int, repeats: int) -> dict[str, list[float]]:
    # One run of each in turn, `repeats` times over, so that a noisy moment on
    # this shared machine lands on all of them rather than on one.
    runs: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):
        for name, func in funcs.items():
            runs[name].append(timeit.timeit(func, number=number) / number * 1e6)
    return runs


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of `values`, quartiles taken inclusively; one value is its own quartiles."""
    if len(values) < 2:  # noqa: PLR2004 - quantiles needs two points
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def new_issuer() -> TokenIssuer:
    """A TokenIssuer as the server builds one: the config comes with each call, in the snapshot."""
    return TokenIssuer(signed=SignedExpiries(), limiter=RateLimiter(time.monotonic))


BENCH_PEER = "ipv4:127.0.0.1:1"
"""The peer the in-process paths' audit records name."""


def issue_and_record(
    issuer: TokenIssuer,
    audit_log: AuditLog,
    snapshot: Snapshot,
    caller_id: str,
    request: pb.IssueTokenRequest,
) -> pb.IssueTokenResponse:
    """What the servicer does with a parsed request: issue, then write the audit record as it does.

    The record's context comes from the servicer's own _Rpc, so the two cannot drift apart.
    """
    rpc = _Rpc(snapshot, time.perf_counter(), "IssueToken", BENCH_PEER, caller_id=caller_id, request=request)
    issued = issuer.issue(snapshot, caller_id, request)
    audit_log.record(
        record.EVENT_TOKEN_DECISION, rpc.context(), **issued.record, duration_ms=record.ms_since(rpc.started)
    )
    return issued.response


def run(config_path: Path, *, number: int, repeats: int, sink: BinaryIO) -> dict[str, float]:
    """Time the paths; audit records go to `sink` through the production log set-up."""
    logs.configure(sink)
    config = load_config(config_path, environ={})
    creds = config.credentials
    snapshot = Snapshot.of(config)
    # The issuing path as it was before the direct minter: the same snapshot, twilio's AccessToken.
    twilio_snapshot = dataclasses.replace(snapshot, minter=TwilioLibraryMinter(creds))
    issuer = new_issuer()
    audit_log = AuditLog()
    request = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
    service_sid = next(iter(config.policy)).sync_services[0]
    grant = decide(config.policy, DEV_CLIENT_ID, request)
    times: TokenTimes = plan_times(int(time.time()), grant.ttl, issuer._rng)  # noqa: SLF001 - same jitter source
    direct_minter, twilio_minter = Minter(creds), TwilioLibraryMinter(creds)

    def issue_path(which: Snapshot) -> Callable[[], object]:
        def path() -> object:
            # What one IssueToken does between parsing and serialising, per-RPC log context included.
            return issue_and_record(issuer, audit_log, which, DEV_CLIENT_ID, request)

        return path

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

    runs = _interleaved_runs_us(
        {
            "synctoken_issue_path": issue_path(snapshot),
            "synctoken_issue_path_twilio_minter": issue_path(twilio_snapshot),
            "bare_access_token": bare_access_token,
            "direct_mint": lambda: direct_minter.mint(grant, times),
            "twilio_minter_mint": lambda: twilio_minter.mint(grant, times),
            "hmac_sha256": one_hmac,
        },
        number,
        repeats,
    )
    results: dict[str, float] = {}
    for name, values in runs.items():
        q1, median, q3 = quartiles(values)
        results |= {f"{name}_us": median, f"{name}_q1_us": q1, f"{name}_q3_us": q3}
    for ratio, (top, bottom) in RATIOS.items():
        q1, median, q3 = quartiles([a / b for a, b in zip(runs[top], runs[bottom], strict=True)])
        results |= {ratio: median, f"{ratio}_q1": q1, f"{ratio}_q3": q3}
    return results


def with_quartiles(results: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """Each figure of `results` with its quartiles: (name, median, q1, q3)."""
    rows = []
    for name, median in results.items():
        stem, unit = (name.removesuffix("_us"), "_us") if name.endswith("_us") else (name, "")
        if f"{stem}_q1{unit}" in results:
            rows.append((name, median, results[f"{stem}_q1{unit}"], results[f"{stem}_q3{unit}"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the micro-benchmarks alone, on a throwaway dev config, and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--number", type=int, default=3000, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved runs of each function")
    args = parser.parse_args(argv)
    # Imported here: the systems module pulls in the load generator, which the in-process figures do not need.
    from bench.systems import Workspace  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="synctoken-micro-") as tmp:
        workspace = Workspace.make(Path(tmp) / "pki")
        with (Path(tmp) / "micro-audit.jsonl").open("wb") as sink:
            results = run(workspace.config_path, number=args.number, repeats=args.repeats, sink=sink)
    for name, median, q1, q3 in with_quartiles(results):
        print(f"{name:45s} {median:9.3f}   IQR {q1:9.3f} .. {q3:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

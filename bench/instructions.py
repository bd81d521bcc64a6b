"""Instructions per request, counted by valgrind's callgrind: the one figure here that noise does not move.

    python -m bench.instructions [--calls 400] [--out FILE] [--tracing]

On this shared 2-core machine a server's CPU time per request moves by half
between rounds; the number of instructions it executes does not (the same
code, inputs and environment give the same count to within a percent). Each
server runs under callgrind with counting switched on (`callgrind_control`)
only while `--calls` IssueToken calls (empty calls for the empty RPC) are
made one at a time over one mTLS connection, after a warm-up; every thread of
the server counts. synctoken-redis (its limits in a loopback Redis, far above
the load) is counted the same way, last; the redis-server it calls is not
traced, so its line is synctoken's side of the Redis check only. The
in-process figure counts the handler's own work (caller id, parsing, policy,
mint, audit line) in a loop, as the difference between two runs of different
lengths, so start-up cancels out.

Instructions are not time: the same instructions take longer when they run
cold, between gRPC's own work, than in a loop. Comparing the two says which
of the two a gap comes from.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from bench.micro import issue_and_record, new_issuer
from bench.otlpsink import OtlpSink
from bench.systems import (
    ROOT,
    System,
    Workspace,
    empty_rpc,
    issue_payload,
    synctoken,
    synctoken_redis,
    synctoken_traced,
)
from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.audit import logs
from synctoken_server.audit.record import AuditLog
from synctoken_server.authn import mesh
from synctoken_server.config.schema import load_config
from synctoken_server.dev import devenv
from synctoken_server.rpc.snapshot import Snapshot

START_TIMEOUT_S = 300.0  # everything runs tens of times slower under valgrind
WARMUP_CALLS = 50


@dataclass(frozen=True)
class Counts:
    """Instructions per request: each server's, the difference, and the handler's work in a loop."""

    calls: int
    empty_rpc: int
    synctoken: int
    in_process_handler: int
    synctoken_redis: int
    """synctoken's server with its limits in Redis; Redis's own instructions are not counted (it is not traced)."""
    synctoken_traced: int | None = None
    """With --tracing: synctoken with [tracing] on, every call sampled and exported (batch thread included)."""

    @property
    def synctoken_extra(self) -> int:
        """What an IssueToken costs beyond an empty call on the same stack."""
        return self.synctoken - self.empty_rpc

    @property
    def redis_extra(self) -> int:
        """What the Redis check adds to an IssueToken, in synctoken's server."""
        return self.synctoken_redis - self.synctoken

    def as_dict(self) -> dict[str, int]:
        """Plain data for JSON."""
        counts = {
            "calls": self.calls,
            "empty_rpc": self.empty_rpc,
            "synctoken": self.synctoken,
            "synctoken_extra": self.synctoken_extra,
            "in_process_handler": self.in_process_handler,
            "synctoken_redis": self.synctoken_redis,
            "redis_extra": self.redis_extra,
        }
        if self.synctoken_traced is not None:
            counts["synctoken_traced"] = self.synctoken_traced
        return counts


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian package valgrind; `make test` installs it)"
        raise RuntimeError(msg)
    return path


def _valgrind() -> list[str]:
    return [_tool("valgrind"), "--tool=callgrind", "--quiet"]


def _total(prefix: Path) -> int:
    """The instructions counted in every dump callgrind wrote for one process."""
    total = 0
    for dump in prefix.parent.glob(f"{prefix.name}*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def _callgrind_control(option: str, pid: int) -> None:
    subprocess.run([_tool("callgrind_control"), option, str(pid)], check=True, capture_output=True, timeout=60)


def _count_server(system: System, workspace: Workspace, calls: int, out_dir: Path) -> int:
    prefix = out_dir / f"{system.name}.callgrind"
    command = [*_valgrind(), "--instr-atstart=no", f"--callgrind-out-file={prefix}.%p", *system.command]
    traced = replace(system, command=command, start_timeout_s=START_TIMEOUT_S)
    traced.start(out_dir)
    assert traced.process is not None  # noqa: S101 - start() either started it or raised
    pid = traced.process.pid
    try:
        pki = workspace.directory
        credentials = grpc.ssl_channel_credentials(
            (pki / devenv.CA_FILE).read_bytes(),
            (pki / devenv.CLIENT_KEY).read_bytes(),
            (pki / devenv.CLIENT_CERT).read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{system.port}", credentials) as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(system.grpc_method)
            for _ in range(WARMUP_CALLS):
                call(system.grpc_payload, timeout=60)
            _callgrind_control("--instr=on", pid)
            for _ in range(calls):
                call(system.grpc_payload, timeout=60)
            _callgrind_control("--instr=off", pid)
    finally:
        # SIGINT: synctoken stops without its drain delay. A kill would lose
        # callgrind's counts, which it writes as the process exits. (stop() then stops its Redis.)
        traced.stop(signal.SIGINT if system.name.startswith("synctoken") else signal.SIGTERM, timeout=120)
    return _total(Path(f"{prefix}.{pid}")) // calls


def _count_in_process(workspace: Workspace, calls: int, out_dir: Path) -> int:
    def run(loops: int) -> int:
        prefix = out_dir / f"in-process-{loops}.callgrind"
        hot = [sys.executable, "-m", "bench.instructions", "--in-process-loop", str(loops)]
        hot += ["--config", str(workspace.config_path), "--audit-to", str(out_dir / "in-process-audit.jsonl")]
        subprocess.run(
            [*_valgrind(), f"--callgrind-out-file={prefix}", *hot],
            check=True,
            cwd=ROOT,
            capture_output=True,
            timeout=900,
        )
        return _total(prefix)

    return (run(WARMUP_CALLS + calls) - run(WARMUP_CALLS)) // calls


def _in_process_loop(config_path: Path, loops: int, audit_to: Path) -> None:
    """The handler's work, `loops` times: caller id from the dev client certificate, parse, issue, audit."""
    with audit_to.open("wb") as sink:
        logs.configure(sink)
        config = load_config(config_path, environ={})
        snapshot = Snapshot.of(config)
        issuer = new_issuer()
        audit_log = AuditLog()
        leaf = (config_path.parent / devenv.CLIENT_CERT).read_bytes()
        raw = issue_payload()
        for _ in range(loops):
            # What gRPC hands the servicer: a fresh auth context and request bytes on every call.
            auth_context = {"x509_pem_cert": [bytes(leaf)], "transport_security_type": [b"ssl"]}
            caller_id = mesh.caller_id(snapshot.caller_rules, auth_context, [], mesh=False)
            request = pb.IssueTokenRequest.FromString(raw)
            issue_and_record(issuer, audit_log, snapshot, caller_id, request)


def count(calls: int, *, tracing: bool = False) -> Counts:
    """Count instructions per request for the empty RPC, synctoken, and the handler's work in-process.

    With `tracing`, synctoken with tracing on too, exporting to a sink in this process.
    """
    with tempfile.TemporaryDirectory(prefix="synctoken-instructions-") as tmp:
        out_dir = Path(tmp)
        workspace = Workspace.make(out_dir / "pki")
        counts = Counts(
            calls=calls,
            empty_rpc=_count_server(empty_rpc(workspace), workspace, calls, out_dir),
            synctoken=_count_server(synctoken(workspace, 1), workspace, calls, out_dir),
            in_process_handler=_count_in_process(workspace, calls, out_dir),
            # Last, so that the figures above are counted exactly as before it was added.
            synctoken_redis=_count_server(synctoken_redis(workspace), workspace, calls, out_dir),
        )
        if not tracing:
            return counts
        # After all the others, for the same reason.
        sink = OtlpSink()
        try:
            traced = _count_server(synctoken_traced(workspace, sink.endpoint), workspace, calls, out_dir)
        finally:
            sink.close()
        if sink.exports == 0:
            raise RuntimeError("the traced server exported no spans: the figure would not include the export")
        return replace(counts, synctoken_traced=traced)


def main(argv: list[str] | None = None) -> int:
    """Count and print; with --out, also write the counts as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls counted per server (after a warm-up)")
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    parser.add_argument(
        "--tracing", action="store_true", help="also count synctoken with tracing on (every call sampled, exported)"
    )
    parser.add_argument("--in-process-loop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--audit-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process_loop is not None:
        _in_process_loop(args.config, args.in_process_loop, args.audit_to)
        return 0
    counts = count(args.calls, tracing=args.tracing)
    print(f"instructions per request (callgrind; {counts.calls} calls, one at a time, after {WARMUP_CALLS} warm-up)")
    print(f"  empty-rpc server            {counts.empty_rpc:>10,}")
    print(f"  synctoken server            {counts.synctoken:>10,}")
    print(f"  synctoken extra             {counts.synctoken_extra:>10,}")
    print(f"  handler's work, in-process  {counts.in_process_handler:>10,}   (caller id, parse, policy, mint, audit)")
    print(f"  synctoken-redis server      {counts.synctoken_redis:>10,}   (redis-server's own not counted)")
    print(f"  Redis check extra           {counts.redis_extra:>10,}   (over synctoken)")
    if counts.synctoken_traced is not None:
        extra = counts.synctoken_traced - counts.synctoken
        print(f"  synctoken, tracing on       {counts.synctoken_traced:>10,}   (every call sampled and exported)")
        print(f"  tracing's extra             {extra:>10,}   ({extra / counts.synctoken:+.1%} over synctoken)")
    if args.out is not None:
        args.out.write_text(json.dumps(counts.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

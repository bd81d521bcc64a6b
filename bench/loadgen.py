"""A gRPC load generator process: C calls in flight over K channels, for a fixed window.

Every process of a run gets the same absolute start time, so the harness can
run several side by side and add up their counts for one window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc


async def _worker(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    payload: bytes,
    window: tuple[float, float],
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    start, end = window
    while (now := time.perf_counter()) < end:
        try:
            await call(payload, timeout=10)
        except grpc.aio.AioRpcError as exc:
            # Counted in warm-up too: the smoke test wants a run with no errors at all.
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            continue
        if now >= start:
            latencies.append((time.perf_counter() - now) * 1000)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    directory: Path = args.pki
    credentials = grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / "client-key.pem").read_bytes(),
        (directory / "client.pem").read_bytes(),
    )
    # A local subchannel pool gives every channel its own connection; otherwise
    # gRPC shares one, and with workers every call would reach one process.
    channels = [
        grpc.aio.secure_channel(args.target, credentials, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [c.unary_unary(args.method) for c in channels]
    payload = bytes.fromhex(args.payload)
    # Wall-clock start shared by all processes, mapped onto this process's perf_counter.
    delay = args.start_at - time.time()
    await asyncio.sleep(max(0.0, delay))
    measure_from = time.perf_counter() + args.warmup
    window = (measure_from, measure_from + args.duration)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cpu = asyncio.create_task(_own_cpu_over(window))
    await asyncio.gather(
        *(_worker(calls[i % len(calls)], payload, window, latencies, errors) for i in range(args.concurrency))
    )
    for channel in channels:
        await channel.close()
    return {"latencies_ms": latencies, "errors": errors, "duration_s": args.duration, "cpu_s": await cpu}


async def _own_cpu_over(window: tuple[float, float]) -> float:
    # This process's CPU over the window: on a small machine the load
    # generators compete with the server for cores, and the report says how much.
    start, end = window
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return time.process_time() - before


def main() -> None:
    """Run one load window and print its raw figures as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--payload", required=True, help="the serialized request, in hex")
    parser.add_argument("--pki", type=Path, required=True, help="folder with ca.pem, client.pem, client-key.pem")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="Unix time at which warm-up starts")
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_run(args))))


if __name__ == "__main__":
    main()

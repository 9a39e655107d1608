"""The load process: drives one server with the generated client, N calls in flight.

    python -m bench.load --target 127.0.0.1:50051 --in-flight 64 --seconds 5 \\
        --tenants hot --resource tokens [--calls reserve-commit]
Prints one JSON object: calls, errors, calls_per_s, p50_ms, p99_ms, p999_ms. With
`--calls reserve-commit` a call is a Reserve followed by the Commit of its reservation
(what an executor does around a model call whose size it learns afterwards), timed as one."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import random
import time

import grpc
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc


def tenant_picker(spec: str, count: int, seed: int) -> list[str]:
    """A long precomputed sequence of tenant ids: one hot tenant, uniform, or Zipf(1.1)."""
    rng = random.Random(seed)
    if spec == "hot":
        return ["bench-hot"]
    names = [f"bench-{i:05d}" for i in range(count)]
    if spec == "uniform":
        return [rng.choice(names) for _ in range(200_000)]
    weights = list(itertools.accumulate(1 / (i + 1) ** 1.1 for i in range(count)))
    total = weights[-1]
    return [names[bisect.bisect(weights, rng.random() * total)] for _ in range(200_000)]


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def run(args: argparse.Namespace) -> dict[str, float]:
    tenants = tenant_picker(args.tenants, args.tenant_count, args.seed)
    tokens = pb.TokenUsage(provider="bench", model="bench-model", input_tokens=10)
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    prefix = f"{os.getpid()}-{time.time_ns()}"
    # several targets (several sidecars on one database): the calls go round them
    channels = [grpc.aio.insecure_channel(t) for t in args.target.split(",")]
    stubs = [pb_grpc.QuotaServiceStub(c) for c in channels]
    try:

        async def call() -> None:
            nonlocal errors
            n = next(counter)
            stub = stubs[n % len(stubs)]
            tenant, request_id = tenants[n % len(tenants)], f"{prefix}-{n}"
            priced = tokens if args.resource == "tokens" else None
            started = time.perf_counter()
            try:
                if args.calls == "reserve-commit":
                    held = await stub.Reserve(
                        pb.ReserveRequest(tenant_id=tenant, resource=args.resource, amount=1,
                                          request_id=request_id, tokens=priced, ttl_seconds=300),
                        timeout=10,
                    )  # fmt: skip
                    if held.allowed:
                        await stub.Commit(
                            pb.CommitRequest(tenant_id=tenant, reservation_id=held.reservation_id,
                                             amount=1, tokens=priced),
                            timeout=10,
                        )  # fmt: skip
                    else:
                        errors += 1
                else:
                    reply = await stub.CheckAndConsume(
                        pb.CheckAndConsumeRequest(tenant_id=tenant, resource=args.resource,
                                                  amount=1, request_id=request_id, tokens=priced),
                        timeout=10,
                    )  # fmt: skip
                    if not reply.allowed:
                        errors += 1
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await call()

        warm = time.perf_counter() + args.warmup
        await asyncio.gather(*(worker(warm) for _ in range(args.in_flight)))
        latencies.clear()
        errors = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + args.seconds) for _ in range(args.in_flight)))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close(None)
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "errors": errors,
        "calls_per_s": len(ordered) / elapsed,
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "p999_ms": percentile(ordered, 0.999),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--tenants", choices=["hot", "uniform", "zipf"], default="hot")
    parser.add_argument("--tenant-count", type=int, default=10_000)
    parser.add_argument("--resource", default="tokens")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calls", choices=["check-and-consume", "reserve-commit"],
                        default="check-and-consume")  # fmt: skip
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()

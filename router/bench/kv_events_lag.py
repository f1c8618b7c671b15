"""How far the router's index trails a worker's cache: `python -m baton.router.bench.kv_events_lag`.

One real `baton worker` (CPU engine, SmolLM2, float32, a --num-blocks KV pool) in its own
process, a real Redis, and a KVEventsReader in this one following the worker's stream, under a
steady load of --concurrency clients sending greedy requests whose prompts share random
prefixes (so the cache both hits and evicts) for --duration-s. Per applied batch it records the
lag from the batch's timestamp (the wall clock when the worker took the events from its engine)
to the batch being indexed, and reports p50 / p99 / max, batches/s and events/s. That leaves
out the wait between a step storing a block and the worker taking it (up to one poll interval,
20 ms by default, plus the step then in flight), so a second lag is end to end: from a request's
first token reaching the client (its prompt's blocks were stored by the step that made it) to
the index holding every full block of its prompt under the keys the gateway computes from the
registry entry (requests whose blocks were all indexed already are counted apart). At the end
it checks that the index equals the worker's own GetCachedBlocks. Prints a table; writes
bench_kv_events_lag.json to $OUT (or bench_out/). Both processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from baton.kvstore.block_hash import BlockHashExtra, hash_blocks
from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pb_grpc
from baton.router.kv_events_reader import (
    AppliedBatch,
    KVEventsReader,
    Snapshot,
    snapshot_from_pb,
)
from baton.router.prefix_index import PrefixIndex
from baton.router.registry import WorkerInfo, connect, list_workers
from baton.services.cluster_auth import (
    CLUSTER_TOKEN_ENV,
    REDIS_URL_ENV,
    client_interceptors,
    new_secret,
)
from baton.services.redis_server import RedisServer

WORKER_ID = "bench-kv-events-0"
VOCAB = 49_152


def out_dir() -> Path:
    """$OUT (the device machine's return folder), else bench_out/."""
    path = Path(os.environ.get("OUT") or "bench_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_worker(
    args: argparse.Namespace, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str]:
    """`baton worker` in a child process; returns it and its gRPC address."""
    cmd = [
        sys.executable,
        "-m",
        "baton.services.cli",
        "worker",
        "--worker-id",
        WORKER_ID,
        "--dtype",
        "float32",
        "--num-blocks",
        str(args.num_blocks),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("BATON_WORKER_READY"):
            # Keep reading what else it prints, or a full pipe would stall it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split()[2]
    raise RuntimeError(f"the worker exited before it was ready (rc {proc.wait()})")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    args: argparse.Namespace, redis_url: str, token: str, address: str
) -> dict[str, Any]:
    redis = connect(redis_url)
    channel = grpc.aio.insecure_channel(address, interceptors=client_interceptors(token))
    stub = pb_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]

    async def snapshot(_: WorkerInfo) -> Snapshot:
        return snapshot_from_pb(await stub.GetCachedBlocks(pb.CachedBlocksRequest(), timeout=5))

    applied: list[AppliedBatch] = []
    pending: dict[str, tuple[list[bytes], float]] = {}
    """request id -> (its prompt's full-block keys, wall clock of its first token)"""
    e2e_ms: list[float] = []
    num_indexed_before_first_token = 0

    def fully_indexed(keys: list[bytes]) -> bool:
        match = reader.index.match(keys, [WORKER_ID]).get(WORKER_ID)
        return match is not None and match.num_blocks == len(keys)

    def on_applied(batch: AppliedBatch) -> None:
        applied.append(batch)
        now = time.time()
        for request_id, (keys, first_token_s) in list(pending.items()):
            if fully_indexed(keys):
                e2e_ms.append((now - first_token_s) * 1000)
                del pending[request_id]

    reader = KVEventsReader(redis, PrefixIndex(), snapshot, on_applied=on_applied)
    (info,) = await list_workers(redis, token=token)
    extra = BlockHashExtra(info.model, "").encode()
    reader.set_workers([info])
    await reader.start()

    rng = random.Random(args.seed)
    roots = [[rng.randrange(VOCAB) for _ in range(args.prompt_tokens)] for _ in range(8)]
    num_requests = 0

    async def client() -> None:
        nonlocal num_requests, num_indexed_before_first_token
        while time.monotonic() < stop_at:
            root = rng.choice(roots)
            prompt = root[: rng.randrange(len(root) + 1)]
            prompt += [rng.randrange(VOCAB) for _ in range(rng.randrange(1, args.prompt_tokens))]
            request = pb.GenerateRequest(
                request_id=f"r{num_requests}-{rng.getrandbits(32)}",
                prompt_token_ids=prompt,
                params=pb.SamplingParams(
                    temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True
                ),
            )
            num_requests += 1
            keys = hash_blocks(prompt, info.block_size, extra)
            first = True
            async for _ in stub.Generate(request, timeout=120):
                if first and keys:
                    if fully_indexed(keys):
                        num_indexed_before_first_token += 1
                    else:
                        pending[request.request_id] = (keys, time.time())
                first = False

    await asyncio.sleep(0.5)  # the first resync
    applied.clear()
    started = time.monotonic()
    stop_at = started + args.duration_s
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    elapsed_s = time.monotonic() - started

    agreed = False
    for _ in range(100):  # the last batches land within a poll or two
        cached = await stub.GetCachedBlocks(pb.CachedBlocksRequest(), timeout=5)
        status = reader.status(WORKER_ID)
        (tier,) = cached.tiers
        if status is not None and status.last_event_ids.get("device") == tier.last_event_id:
            agreed = reader.index.keys_of(WORKER_ID).get("device", set()) == set(tier.block_hashes)
            break
        await asyncio.sleep(0.05)
    await reader.stop()
    await channel.close()
    await redis.aclose()

    lags_ms = [a.lag_s * 1000 for a in applied]
    num_events = sum(a.num_events for a in applied)
    return {
        "duration_s": round(elapsed_s, 2),
        "requests": num_requests,
        "batches": len(applied),
        "events": num_events,
        "events_per_s": round(num_events / elapsed_s, 1),
        "batches_per_s": round(len(applied) / elapsed_s, 1),
        "events_by_kind": dict(reader.stats.events_by_kind),
        "lag_ms_p50": round(statistics.median(lags_ms), 3) if lags_ms else None,
        "lag_ms_p99": round(percentile(lags_ms, 0.99), 3) if lags_ms else None,
        "lag_ms_max": round(max(lags_ms), 3) if lags_ms else None,
        "e2e_lag_ms_p50": round(statistics.median(e2e_ms), 3) if e2e_ms else None,
        "e2e_lag_ms_p99": round(percentile(e2e_ms, 0.99), 3) if e2e_ms else None,
        "e2e_lag_ms_max": round(max(e2e_ms), 3) if e2e_ms else None,
        "e2e_requests": len(e2e_ms),
        "requests_indexed_before_first_token": num_indexed_before_first_token,
        "requests_never_fully_indexed": len(pending),
        "resyncs": {r.value: n for r, n in reader.stats.resyncs.items()},
        "index_equals_cache": agreed,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("requests", result["requests"]),
        ("batches applied", result["batches"]),
        ("events applied", f"{result['events']} {result['events_by_kind']}"),
        ("events/s", result["events_per_s"]),
        ("batches/s", result["batches_per_s"]),
        ("lag p50 (ms)", result["lag_ms_p50"]),
        ("lag p99 (ms)", result["lag_ms_p99"]),
        ("lag max (ms)", result["lag_ms_max"]),
        ("first token -> indexed p50 (ms)", result["e2e_lag_ms_p50"]),
        ("first token -> indexed p99 (ms)", result["e2e_lag_ms_p99"]),
        ("first token -> indexed max (ms)", result["e2e_lag_ms_max"]),
        ("  requests measured", result["e2e_requests"]),
        ("  indexed before first token", result["requests_indexed_before_first_token"]),
        ("  never fully indexed (evicted)", result["requests_never_fully_indexed"]),
        ("resyncs", result["resyncs"]),
        ("index == cache at end", result["index_equals_cache"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    token = new_secret()
    with RedisServer() as redis_server:
        env = os.environ | {CLUSTER_TOKEN_ENV: token, REDIS_URL_ENV: redis_server.url}
        proc, address = start_worker(args, env)
        try:
            result = asyncio.run(measure(args, redis_server.url, token, address))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result["config"] = vars(args) | {"host": platform.node(), "cpus": os.cpu_count()}
    print(format_table(result))
    path = out_dir() / "bench_kv_events_lag.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

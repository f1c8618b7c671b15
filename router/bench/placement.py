"""What a KV-aware placement costs the gateway: `python -m baton.router.bench.placement`.

A real PrefixIndex holds --blocks block keys over --workers workers: chains of prompts that
start with one of --shared-prefixes common prefixes (system prompts) and go on with their own
tokens, mostly on the device tier, some on host and disk. Each request is a --prompt-tokens
prompt: most extend an indexed chain (a deep hit on one or more workers), the rest are new.
Per request it times, separately, the three steps of the request path's routing:

    hash   kvstore/block_hash.hash_blocks of the prompt (16-token blocks), from a list of ints
           as the tokenizer gives it
    match  PrefixIndex.match(keys)
    place  choose_kv_placement(workers, loads, matches, ...) with random loads

and reports p50 / p99 / max in microseconds of each and of their sum. Hashing is most of it, so
two more rows take it apart (not in the sum): `hash:np`, the same keys from a uint32 array
(no list-to-array conversion per block), and `hash:b2b`, the BLAKE2b chain alone over bytes
prepared beforehand (the floor of any caller of this hash). Prints a table; writes
bench_router_placement.json to $OUT (or bench_out/). Pure CPU, one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from baton.kvstore.block_hash import HASH_BYTES, ROOT_PARENT, BlockHashExtra, hash_blocks
from baton.router.cost_model import CostModel
from baton.router.kv_policy import choose_kv_placement
from baton.router.policy import WorkerLoad
from baton.router.prefix_index import PrefixIndex
from baton.router.registry import WorkerInfo

VOCAB = 49_152
TARGET_P99_US = 1000.0


def out_dir() -> Path:
    """$OUT (the device machine's return folder), else bench_out/."""
    path = Path(os.environ.get("OUT") or "bench_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_workers(num_workers: int, num_prefill: int, block_size: int) -> list[WorkerInfo]:
    return [
        WorkerInfo(
            worker_id=f"{'prefill' if i < num_prefill else 'decode'}-{i}",
            address=f"10.0.0.{i + 1}:50051",
            role="prefill" if i < num_prefill else "decode",
            model="bench",
            num_kv_blocks=65_536,
            block_size=block_size,
            transport="nixl",
            started_unix_s=0.0,
            kv_block_bytes=2 << 20,
        )
        for i in range(num_workers)
    ]


def build_index(
    rng: random.Random,
    workers: list[WorkerInfo],
    args: argparse.Namespace,
    extra: bytes,
) -> tuple[PrefixIndex, list[list[int]]]:
    """Fill an index with ~args.blocks keys; return it and the indexed chains' token lists."""
    bs = args.block_size
    prefixes = [
        [rng.randrange(VOCAB) for _ in range(args.prefix_tokens)]
        for _ in range(args.shared_prefixes)
    ]
    index = PrefixIndex()
    chains: list[list[int]] = []
    while len(index) < args.blocks:
        tokens = rng.choice(prefixes) + [
            rng.randrange(VOCAB) for _ in range(rng.randint(bs, args.prompt_tokens))
        ]
        keys = hash_blocks(tokens, bs, extra)
        for w in rng.sample(workers, rng.randint(1, 2)):
            # A worker keeps the chain's head on the device and may have demoted its tail.
            cut_host = rng.randint(len(keys) // 2, len(keys))
            cut_disk = rng.randint(cut_host, len(keys))
            index.store(w.worker_id, "device", keys[:cut_host])
            index.store(w.worker_id, "host", keys[cut_host:cut_disk])
            index.store(w.worker_id, "disk", keys[cut_disk:])
        chains.append(tokens)
    return index, chains


def make_prompt(rng: random.Random, chains: list[list[int]], args: argparse.Namespace) -> list[int]:
    n = args.prompt_tokens
    if rng.random() < args.hit_fraction:
        base = rng.choice(chains)
        head = base[: rng.randint(0, min(len(base), n))]
    else:
        head = []
    return head + [rng.randrange(VOCAB) for _ in range(n - len(head))]


def blake2b_chain(raw: bytes, block_bytes: int, extra: bytes) -> list[bytes]:
    """hash_blocks' digest chain over already-encoded token bytes: what hashing costs at least."""
    keys, parent = [], ROOT_PARENT
    for start in range(0, len(raw) - block_bytes + 1, block_bytes):
        h = hashlib.blake2b(digest_size=HASH_BYTES)
        h.update(parent)
        h.update(raw[start : start + block_bytes])
        h.update(extra)
        parent = h.digest()
        keys.append(parent)
    return keys


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1e3 for x in samples_ns)
    q = statistics.quantiles(us, n=100, method="inclusive")
    return {"p50_us": q[49], "p99_us": q[98], "max_us": us[-1], "mean_us": statistics.fmean(us)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workers = make_workers(args.workers, args.prefill_workers, args.block_size)
    extra = BlockHashExtra(model_id="bench").encode()
    t0 = time.perf_counter()
    index, chains = build_index(rng, workers, args, extra)
    build_s = time.perf_counter() - t0
    cost = CostModel()
    stages: dict[str, list[int]] = {
        name: [] for name in ("hash", "match", "place", "total", "hash:np", "hash:b2b")
    }
    depths: list[int] = []
    num_remote = 0
    for i in range(args.warmup + args.requests):
        prompt = make_prompt(rng, chains, args)
        loads = {
            w.worker_id: WorkerLoad(w.worker_id, rng.randint(0, 40_000), 8, rng.randint(0, 4), 0.5)
            for w in workers
        }
        a = time.perf_counter_ns()
        keys = hash_blocks(prompt, args.block_size, extra)
        b = time.perf_counter_ns()
        matches = index.match(keys)
        c = time.perf_counter_ns()
        decision = choose_kv_placement(
            workers,
            loads,
            matches,
            len(prompt),
            args.block_size,
            cost,
            local_prefill_min_tokens=256,
        )
        d = time.perf_counter_ns()
        # The parts of hashing, on the same prompt (outside the timed path above).
        as_array = np.asarray(prompt, dtype="<u4")
        raw = as_array.tobytes()
        e = time.perf_counter_ns()
        np_keys = hash_blocks(as_array, args.block_size, extra)  # type: ignore[arg-type]
        f = time.perf_counter_ns()
        b2b_keys = blake2b_chain(raw, args.block_size * 4, extra)
        g = time.perf_counter_ns()
        assert np_keys == keys == b2b_keys
        if i < args.warmup:
            continue
        timed = {"hash": b - a, "match": c - b, "place": d - c, "total": d - a}
        timed |= {"hash:np": f - e, "hash:b2b": g - f}
        for name, ns in timed.items():
            stages[name].append(ns)
        depths.append(max((m.num_blocks for m in matches.values()), default=0))
        num_remote += not decision.local_prefill
    return {
        "config": vars(args),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "indexed_blocks": len(index),
        "build_s": build_s,
        "mean_deepest_hit_blocks": statistics.fmean(depths),
        "remote_prefill_fraction": num_remote / max(args.requests, 1),
        "target_p99_us": TARGET_P99_US,
        "stages": {name: percentiles(s) for name, s in stages.items()},
    }


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"{cfg['workers']} workers ({cfg['prefill_workers']} prefill), "
        f"{result['indexed_blocks']} indexed blocks, {cfg['prompt_tokens']}-token prompts "
        f"({cfg['prompt_tokens'] // cfg['block_size']} blocks), {cfg['requests']} requests, "
        f"mean deepest hit {result['mean_deepest_hit_blocks']:.0f} blocks, "
        f"{result['remote_prefill_fraction']:.0%} placed with a remote prefill"
    )
    print(f"{'stage':<8}{'p50 us':>10}{'p99 us':>10}{'max us':>10}{'mean us':>10}")
    for name, p in result["stages"].items():
        print(
            f"{name:<8}{p['p50_us']:>10.1f}{p['p99_us']:>10.1f}{p['max_us']:>10.1f}"
            f"{p['mean_us']:>10.1f}"
        )
    total = result["stages"]["total"]["p99_us"]
    verdict = "meets" if total < TARGET_P99_US else "misses"
    print(f"total p99 {total:.0f} us {verdict} the {TARGET_P99_US:.0f} us target")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prefill-workers", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=100_000, help="indexed block keys in all")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--shared-prefixes", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=512)
    ap.add_argument("--hit-fraction", type=float, default=0.8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run(args)
    print_table(result)
    path = out_dir() / "bench_router_placement.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

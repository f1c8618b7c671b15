"""Placement policies side by side on shared-prefix load: kv vs least-loaded vs round-robin.

For each policy a fresh cluster (`baton serve`'s Cluster: one prefill and two decode workers,
caches cold) serves the same shared-prefix workload from `baton bench serve` (G groups x Q
questions behind a per-group prefix, shuffled). The KV caches are sized so that one decode
worker holds only part of the groups' prefixes: a router that sends each group where its prefix
is keeps hitting, one that spreads groups over both workers evicts what it will need next.

Prints one table (prefix hit rate from the workers' own cached-token counts, p50/p90 TTFT,
goodput at the SLO, throughput) and writes JSON to $OUT or bench_out/. A benchmark, never a
test assertion (docs/design.md §20):

    python -m baton.router.bench.policies            # CPU defaults: SmolLM2, 8 x 16, 1500
    python -m baton.router.bench.policies --model dummy:llama-3.1-8b --device cuda ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port

POLICIES = ("kv", "least-loaded", "round-robin")


def _bench(cluster: Cluster, a: argparse.Namespace, out_dir: Path, policy: str) -> dict[str, Any]:
    model = cluster.workers[0].model
    cmd = [
        sys.executable, "-m", "baton.services.cli", "bench", "serve",
        "--base-url", cluster.url, "--model", model, "--tokenizer", a.model,
        "--dataset-name", "shared-prefix", "--num-groups", str(a.groups),
        "--questions-per-group", str(a.questions), "--prefix-len", str(a.prefix_len),
        "--question-len", str(a.question_len), "--random-output-len", str(a.output_len),
        "--max-concurrency", str(a.concurrency), "--request-rate", "inf",
        "--goodput", f"ttft:{a.slo_ttft_ms}", f"tpot:{a.slo_tpot_ms}",
        "--metric-percentiles", "50,90,99", "--seed", "0",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{policy}.json",
        "--no-plots", "--disable-tqdm",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads((out_dir / f"{policy}.json").read_text())
    return result


def _row(policy: str, r: dict[str, Any]) -> dict[str, Any]:
    inputs = max(r["total_input_tokens"], 1)
    return {
        "policy": policy,
        "completed": r["completed"],
        "failed": r["failed"],
        "prefix_hit_rate": r["total_cached_tokens"] / inputs,
        "p50_ttft_ms": r["p50_ttft_ms"],
        "p90_ttft_ms": r["p90_ttft_ms"],
        "p99_ttft_ms": r["p99_ttft_ms"],
        "p50_tpot_ms": r["p50_tpot_ms"],
        "goodput_req_s": r["request_goodput"],
        "throughput_req_s": r["request_throughput"],
        "duration_s": r["duration"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=1500)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kv-cache-memory-mb", type=int, default=0, help="0: room for half the groups")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    a = p.parse_args(argv)
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="bench-policies-", dir=out))
    rows = []
    for policy in a.policies:
        config = ServeConfig(
            port=free_port(),
            num_prefill=1,
            num_decode=2,
            router_policy=policy,
            log_dir=str(runs / f"{policy}-logs"),
            kv_cache_memory_mb=a.kv_cache_memory_mb or _half_the_groups_mb(a),
        )
        config = _with_engine(config, a)
        cluster = Cluster(config)
        started = time.monotonic()
        cluster.start()
        try:
            print(f"[{policy}] cluster up in {time.monotonic() - started:.0f} s", flush=True)
            rows.append(_row(policy, _bench(cluster, a, runs, policy)))
        finally:
            cluster.stop()
    _print(rows, a)
    path = out / "bench_router_policies.json"
    path.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


def _with_engine(config: ServeConfig, a: argparse.Namespace) -> ServeConfig:
    from dataclasses import replace

    engine = replace(config.engine, model=a.model, device=a.device, dtype=a.dtype)
    return replace(config, engine=engine)


def _half_the_groups_mb(a: argparse.Namespace) -> int:
    """KV room per worker for about half the groups' prefixes (+ the running requests),
    assuming SmolLM2-135M's 30 layers x 3 KV heads x 64 dims x K and V in bf16/fp32."""
    bytes_per_token = 30 * 3 * 64 * 2 * (4 if a.dtype == "float32" else 2)
    tokens = (a.groups // 2) * a.prefix_len + a.concurrency * (a.question_len + a.output_len + 64)
    return max(16, int(tokens * bytes_per_token * 1.1) // 2**20)


def _print(rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    print(
        f"\nshared-prefix: {a.groups} groups x {a.questions} questions, prefix {a.prefix_len} "
        f"tokens, question {a.question_len}, output {a.output_len}, concurrency "
        f"{a.concurrency}; goodput SLO ttft <= {a.slo_ttft_ms:g} ms, tpot <= "
        f"{a.slo_tpot_ms:g} ms; 1 prefill + 2 decode workers, {a.model} on {a.device}\n"
    )
    head = (
        "| policy | done | hit rate | p50 TTFT ms | p90 TTFT ms | p99 TTFT ms | p50 TPOT ms "
        "| goodput req/s | req/s |"
    )
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['completed']}/{r['completed'] + r['failed']} "
            f"| {r['prefix_hit_rate']:.1%} | {r['p50_ttft_ms']:.0f} | {r['p90_ttft_ms']:.0f} "
            f"| {r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} | {r['goodput_req_s']:.2f} "
            f"| {r['throughput_req_s']:.2f} |"
        )
    by = {r["policy"]: r for r in rows}
    if "kv" in by and "round-robin" in by:
        kv, rr = by["kv"], by["round-robin"]
        ratio = rr["p90_ttft_ms"] / max(kv["p90_ttft_ms"], 1e-9)
        if rr["goodput_req_s"] > 0:
            good = f"{kv['goodput_req_s'] / rr['goodput_req_s']:.1f}x"
        else:
            good = f"{kv['goodput_req_s']:.2f} req/s against none within the SLO"
        print(f"\nkv vs round-robin: p90 TTFT {ratio:.1f}x lower, goodput {good}")


if __name__ == "__main__":
    sys.exit(main())

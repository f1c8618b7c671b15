"""The single-GPU benchmark: the engine against the device's own measured limits, in one run.

    python -m baton.services.engine.bench.gpu [--models llama-3.1-8b qwen3-8b] [--batches 16 64 256]

Measures, on random-weight models built from real configs (dummy:<name>), bf16:
  device      copy bandwidth (read + write bytes of a 2 GiB copy) and the bf16 matmul peak
  decode b=1  engine tok/s at 1k context, CUDA graphs on, against the roofline
              (weight bytes read per step + live KV) / copy bandwidth; and where the step's
              time goes: engine step (wall) vs graph replay alone (GPU) vs the step's GEMMs
              alone (a graph of just them) vs the ideal byte time; then the first model again
              with PDL off, with async scheduling off, and with both off
  decode b=B  steady-state tok/s at batch 16, 64, 256 with 1k context against the analytic
              bound (weights + every sequence's live KV) / bandwidth
  prefill     tok/s and MFU (model FLOPs incl. causal attention / measured matmul peak) of one
              2k and one 8k prompt
  attention   decode-attention bandwidth at batch 8 x 4k and 32k: Triton, SDPA, FlashInfer
Prints one table last and writes bench_gpu.json to $OUT (or bench_out/). Without CUDA it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from baton.services.engine.bench.common import (
    DECODE_CONTEXT,
    DecodeDriver,
    build_engine,
    copy_bandwidth,
    cuda_ms,
    kv_bytes_per_token,
    out_dir,
    random_prompts,
    weight_bytes_per_step,
)
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.sampling_params import SamplingParams


def matmul_peak() -> tuple[float, dict[str, float]]:
    """Best bf16 TFLOP/s over square and prefill-shaped GEMMs (FLOP/s, per-shape TFLOP/s)."""
    shapes = {"8192^3": (8192, 8192, 8192), "2048x4096x28672": (2048, 4096, 28672)}
    shapes["8192x4096x28672"] = (8192, 4096, 28672)
    results: dict[str, float] = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")

        def gemm(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.nn.functional.linear(a, b)

        ms = cuda_ms(gemm, iters=20)
        results[name] = 2 * m * k * n / (ms / 1e3) / 1e12
    return max(results.values()) * 1e12, results


def decode(engine: LLMEngine, batch: int, new_tokens: int, seed: int) -> dict[str, float]:
    """Run `batch` requests of DECODE_CONTEXT prompt tokens; time `new_tokens` decode steps.

    Once every request is prefilled and decoding, a few warm-up steps, then the timed window:
    consecutive engine steps with no sync between them (wall time / steps: under async
    scheduling a step's tokens are collected by the next one, so only a window measures it).
    Every timed step must be one graph replay of the full batch. Then the graph alone is timed
    on the last step's buffers (a replay rewrites the same KV slots with the same values).
    """
    graphs = engine.core.decode_graphs
    assert graphs is not None
    bucket = graphs.bucket_for(batch)
    assert bucket is not None
    warmup = 4
    params = SamplingParams(
        temperature=0, max_tokens=new_tokens + warmup + 8 + batch, ignore_eos=True
    )
    prompts = random_prompts(batch, DECODE_CONTEXT, engine.arch.vocab_size, seed)
    driver = DecodeDriver(engine, prompts, params)
    driver.step_until_decoding()
    for _ in range(warmup):
        driver.step()
    torch.cuda.synchronize()
    replays = graphs.num_replays
    start = time.perf_counter()
    for _ in range(new_tokens):
        driver.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / new_tokens
    assert graphs.num_replays - replays == new_tokens, "a timed step was not a full graph step"
    context = driver.context_len
    replay_ms = cuda_ms(lambda: graphs.replay(bucket), iters=20)
    driver.abort()
    return {
        "batch": batch,
        "context": context - new_tokens // 2,
        "step_ms": step_s * 1e3,
        "replay_ms": replay_ms,
        "tok_s": batch / step_s,
    }


def decode_variants(model: str, bandwidth: float, weights: int) -> list[dict[str, Any]]:
    """Batch-1 decode with one feature off at a time: what PDL and async scheduling buy."""
    rows = []
    variants = {
        "no PDL": {"pdl": False},
        "sync": {"async_scheduling": False},
        "sync, no PDL": {"async_scheduling": False, "pdl": False},
    }
    for name, options in variants.items():
        engine = build_engine(model, 1, 2048, **options)
        r: dict[str, Any] = dict(decode(engine, 1, new_tokens=128, seed=7))
        kv = r["context"] * kv_bytes_per_token(engine)
        r["variant"] = name
        r["bound_tok_s"] = bandwidth / (weights + kv)
        r["fraction"] = r["tok_s"] / r["bound_tok_s"]
        rows.append(r)
        print(f"{model} decode b=1 {name}: {r}", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def gemm_only_ms(engine: LLMEngine, batch: int) -> float:
    """One decode step's projections and LM head alone (a CUDA graph of just them)."""
    from baton.services.engine.layers.linear import Linear

    model = engine.core.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    inputs = [
        torch.randn(batch, m.in_features, dtype=torch.bfloat16, device="cuda") for m in linears
    ]
    table = model.get_parameter("model.embed_tokens.weight")
    head_in = torch.randn(batch, table.shape[1], dtype=torch.bfloat16, device="cuda")

    def run() -> None:
        for m, x in zip(linears, inputs, strict=True):
            m(x)
        if engine.arch.tie_word_embeddings:
            torch.nn.functional.linear(head_in, table)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return cuda_ms(graph.replay, iters=30)


def prefill(engine: LLMEngine, length: int, peak: float) -> dict[str, float]:
    """Best of 3 single-step prefills of a `length`-token prompt (one token generated)."""
    arch = engine.arch
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for seed in range(4):
        engine.add_request(random_prompts(1, length, arch.vocab_size, 100 + seed)[0], params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    seconds = min(times[1:])  # the first run compiles this shape's kernels
    model = engine.core.model
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    head = arch.vocab_size * arch.hidden_size  # the LM head runs on the last token only
    attention = 2 * 2 * (length * (length + 1) // 2) * arch.num_heads * arch.head_dim
    flops = 2 * length * layer_params + 2 * head + attention * arch.num_layers
    return {
        "prompt": length,
        "ms": seconds * 1e3,
        "tok_s": length / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak,
    }


def bench_model(
    model: str,
    bandwidth: float,
    peak: float,
    batches: list[int],
    prefills: list[int],
    variants: bool = False,
) -> dict[str, Any]:
    max_batch = max([1, *batches])
    engine = build_engine(model, max_batch, max([8192, *prefills]) + 64)
    weights = weight_bytes_per_step(engine)
    kv_per_token = kv_bytes_per_token(engine)
    out: dict[str, Any] = {"model": model, "weight_bytes": weights, "decode": []}
    for i, batch in enumerate([1, *batches]):
        r = decode(engine, batch, new_tokens=128 if batch == 1 else 32, seed=i)
        bytes_per_step = weights + batch * r["context"] * kv_per_token
        r["bound_tok_s"] = batch * bandwidth / bytes_per_step
        r["fraction"] = r["tok_s"] / r["bound_tok_s"]
        r["ideal_ms"] = bytes_per_step / bandwidth * 1e3
        r["gemm_ms"] = gemm_only_ms(engine, batch)
        out["decode"].append(r)
        print(f"{model} decode b={batch}: {r}", flush=True)
    out["prefill"] = []
    for length in prefills:
        r = prefill(engine, length, peak)
        out["prefill"].append(r)
        print(f"{model} prefill {length}: {r}", flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if variants:
        out["variants"] = decode_variants(model, bandwidth, weights)
    return out


def profile_host(model: str, batch: int) -> None:
    """cProfile of 20 all-decode steps at `batch` (host time by function, GPU waits included
    in the sync that returns the tokens)."""
    import cProfile
    import pstats

    engine = build_engine(model, batch, 2048)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    prompts = random_prompts(batch, DECODE_CONTEXT, engine.arch.vocab_size, 0)
    DecodeDriver(engine, prompts, params).step_until_decoding()
    for _ in range(5):
        engine.step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        engine.step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def profile_kernels(model: str, batch: int, pdl: bool, replays: int = 10) -> None:
    """Per-kernel GPU time inside one decode graph replay at `batch` (torch.profiler/CUPTI):
    where the step's time goes, and how much of it is gaps between kernels. With PDL a
    kernel's time includes its wait for the one before: profile without it for durations."""
    from torch.profiler import ProfilerActivity, profile

    engine = build_engine(model, batch, 8192 + 64, pdl=pdl)  # as bench_model builds it
    graphs = engine.core.decode_graphs
    assert graphs is not None
    bucket = graphs.bucket_for(batch)
    assert bucket is not None
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = random_prompts(batch, DECODE_CONTEXT, engine.arch.vocab_size, 0)
    DecodeDriver(engine, prompts, params).step_until_decoding()
    for _ in range(4):
        engine.step()
    wall_ms = cuda_ms(lambda: graphs.replay(bucket), iters=20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.replay(bucket)
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            by_name.setdefault(event.name, []).append(event.device_time)
    total = sum(sum(v) for v in by_name.values()) / replays / 1e3
    print(
        f"\n{model} b={batch} PDL {'on' if pdl else 'off'}: graph replay {wall_ms:.3f} ms, "
        f"kernels {total:.3f} ms busy"
    )
    print(f"{'kernel':<60}{'per step':>9}{'avg us':>9}{'ms/step':>9}")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(
            f"{name[:59]:<60}{len(times) / replays:>9.0f}{statistics.mean(times):>9.2f}"
            f"{sum(times) / replays / 1e3:>9.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen3-8b"])
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--prefills", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument(
        "--profile-host",
        type=int,
        default=0,
        metavar="B",
        help="only profile the engine's host work (cProfile) over decode steps at batch B",
    )
    parser.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="B",
        help="only print per-kernel GPU time of a decode graph replay at batch B",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine.bench.gpu: no CUDA device, nothing to measure")
        return 0
    if args.profile_kernels:
        for pdl in (False, True):
            profile_kernels(args.models[0], args.profile_kernels, pdl)
            gc.collect()
            torch.cuda.empty_cache()
        return 0
    if args.profile_host:
        profile_host(args.models[0], args.profile_host)
        return 0
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    peak, gemms = matmul_peak()
    print(f"copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {gemms}", flush=True)
    models = [
        bench_model(m, bandwidth, peak, args.batches, args.prefills, variants=i == 0)
        for i, m in enumerate(args.models)
    ]
    attention: list[dict[str, Any]] = []
    if not args.skip_attention:
        from baton.kernels.bench.attention import bench_one

        for context in args.contexts:
            attention += bench_one(8, context, torch.bfloat16)
            torch.cuda.empty_cache()
    result = {
        "device": props.name,
        "copy_bytes_per_s": bandwidth,
        "matmul_flops": peak,
        "matmul_tflops_by_shape": gemms,
        "models": models,
        "attention": attention,
    }
    _print_table(result)
    path = out_dir() / "bench_gpu.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


def _print_table(r: dict[str, Any]) -> None:
    bw = r["copy_bytes_per_s"]
    print(f"\n{r['device']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {r['matmul_flops'] / 1e12:.0f}")
    print(
        f"{'model':<14}{'what':<18}{'tok/s':>10}{'bound':>10}{'of bound':>9}"
        f"{'step ms':>9}{'graph ms':>9}{'GEMMs ms':>9}{'ideal ms':>9}"
    )
    for m in r["models"]:
        for d in m["decode"]:
            print(
                f"{m['model']:<14}{'decode b=' + str(d['batch']):<18}{d['tok_s']:>10.1f}"
                f"{d['bound_tok_s']:>10.1f}{d['fraction']:>9.1%}{d['step_ms']:>9.2f}"
                f"{d['replay_ms']:>9.2f}{d['gemm_ms']:>9.2f}{d['ideal_ms']:>9.2f}"
            )
        for v in m.get("variants", []):
            print(
                f"{m['model']:<14}{'b=1 ' + v['variant']:<18}{v['tok_s']:>10.1f}"
                f"{v['bound_tok_s']:>10.1f}{v['fraction']:>9.1%}{v['step_ms']:>9.2f}"
                f"{v['replay_ms']:>9.2f}"
            )
        for p in m["prefill"]:
            what = f"prefill {p['prompt']}"
            print(
                f"{m['model']:<14}{what:<18}{p['tok_s']:>10.0f}{'':>10}{p['mfu']:>9.1%}"
                f"{p['ms']:>9.1f}   ({p['tflops']:.0f} TFLOP/s; MFU vs measured peak)"
            )
    for a in r["attention"]:
        what = f"attn {a['impl']}"[:17]
        frac = a["GB_per_s"] * 1e9 / bw
        print(
            f"{'b=8 ctx=' + str(a['context']):<14}{what:<18}{a['GB_per_s']:>10.0f}"
            f"{bw / 1e9:>10.0f}{frac:>9.1%}{a['us'] / 1e3:>9.3f}   (GB/s vs copy)"
        )


if __name__ == "__main__":
    raise SystemExit(main())

"""Weight-streaming bandwidth of skinny_linear (triton_gemv.py) vs F.linear (cuBLAS) at decode M.

    python -m baton.kernels.bench.gemv               # GPU: sweep, table + JSON ($OUT or bench_out/)
    python -m baton.kernels.bench.gemv --no-sweep    # GPU: F.linear vs the default config only
    python -m baton.kernels.bench.gemv --ptx-check   # any machine: compile for sm_90, read the PTX

For M in {1, 8, 16} and the projections of Llama-3.1-8B and Qwen3-8B (bf16), each case times
F.linear, the default config and a handful of alternatives (tile shape, pipeline depth, split-K,
CUDA-core path), and keeps the best. The figure of merit is weight bytes over time: at these M
the weights are all the traffic there is. Timing replays a CUDA graph (do_bench_cudagraph), so
launch overhead is not counted, as in the engine's captured decode step. Each timed call walks
enough copies of W to overflow the L2 (50 MB on H100) by 4x, since in a real step every layer's
weights come from HBM; small ones (o_proj is 32 MB) would otherwise be served from cache.
Every config's output is checked against F.linear before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from baton.kernels.triton_gemv import GemvConfig, default_config, skinny_linear, with_split_k


@dataclass(frozen=True)
class Shape:
    name: str
    """Projections with this (K, N), e.g. "llama/qwen qkv"."""
    K: int
    N: int


# (K, N) of the targets; qkv and o_proj are the same for both models.
SHAPES = (
    Shape("llama/qwen qkv", 4096, 6144),
    Shape("llama/qwen o_proj", 4096, 4096),
    Shape("llama gate_up", 4096, 28672),
    Shape("llama down", 14336, 4096),
    Shape("llama lm_head", 4096, 128256),
    Shape("qwen gate_up", 4096, 24576),
    Shape("qwen down", 12288, 4096),
    Shape("qwen lm_head", 4096, 151936),
)
# Per decode step: (layers, projections by shape name, lm_head) for the summary line.
MODELS = {
    "llama-3.1-8b": (
        32,
        ("llama/qwen qkv", "llama/qwen o_proj", "llama gate_up", "llama down"),
        "llama lm_head",
    ),
    "qwen3-8b": (
        36,
        ("llama/qwen qkv", "llama/qwen o_proj", "qwen gate_up", "qwen down"),
        "qwen lm_head",
    ),
}


@dataclass(frozen=True)
class BenchRow:
    M: int
    shape: str
    K: int
    N: int
    impl: str
    """"cublas" (F.linear), "default" (default_config) or a sweep variant's label."""
    config: dict[str, int | bool] | None
    ms: float
    weight_gbps: float
    """Weight bytes (N * K * 2) over the time of one call."""
    max_rel_err: float
    """max |y - F.linear| / max |F.linear| on this case's inputs."""


def _variants(M: int, N: int, K: int, num_sms: int) -> list[tuple[str, GemvConfig]]:
    """A handful of configs around the default. Tile shapes are shared across cases so the
    whole sweep compiles about a dozen kernels."""
    base = default_config(M, N, K, num_sms=num_sms)
    out = [("default", base)]

    def add(label: str, cfg: GemvConfig, fit_split: bool = True) -> None:
        cfg = with_split_k(cfg, M, N, K, num_sms=num_sms) if fit_split else cfg
        if all(cfg != c for _, c in out):
            out.append((label, cfg))

    if base.split_k > 1:
        add(f"split{base.split_k // 2}", replace(base, split_k=base.split_k // 2), False)
        add(f"split{base.split_k * 2}", replace(base, split_k=base.split_k * 2), False)
    add("n128k128s4", GemvConfig(block_n=128, block_k=128, num_stages=4))
    add("n64k256s3", GemvConfig(block_n=64, block_k=256, num_stages=3))
    add("n64k64s6", GemvConfig(block_n=64, block_k=64, num_stages=6))
    add("n32k256s4", GemvConfig(block_n=32, block_k=256, num_stages=4))
    if M == 1:
        add("fma16x512", GemvConfig(block_n=16, block_k=512, num_stages=1, use_dot=False))
    return out


def _time_ms(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def _reference_gbps(rep_ms: int) -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s of a float32 sum) over 1 GiB."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy_ms = _time_ms(lambda: dst.copy_(src), rep_ms)
    read_ms = _time_ms(lambda: src.sum(), rep_ms)
    return 2 * nbytes / copy_ms / 1e6, nbytes / read_ms / 1e6


@dataclass(frozen=True)
class _Case:
    """One (M, shape): inputs, the copies of W each timed call walks, F.linear's output."""

    M: int
    shape: Shape
    x: torch.Tensor
    weights: list[torch.Tensor]
    ref: torch.Tensor


def _measure(case: _Case, label: str, cfg: GemvConfig | None, rep_ms: int) -> BenchRow:
    x, weights, (K, N) = case.x, case.weights, (case.shape.K, case.shape.N)
    err = 0.0
    if cfg is None:
        fn: Callable[[torch.Tensor], object] = lambda w: F.linear(x, w)
    else:
        fn = lambda w: skinny_linear(x, w, config=cfg)
        y = skinny_linear(x, weights[0], config=cfg).float()
        err = float((y - case.ref).abs().max() / case.ref.abs().max())
    t_ms = _time_ms(lambda: [fn(w) for w in weights], rep_ms) / len(weights)
    gbps = N * K * 2 / t_ms / 1e6
    cfg_dict = None if cfg is None else asdict(cfg)
    row = BenchRow(case.M, case.shape.name, K, N, label, cfg_dict, t_ms, gbps, err)
    print(
        f"  M={row.M:<2} {row.shape:<18} {label:<11} {t_ms * 1e3:8.1f} us {gbps:7.0f} GB/s "
        f"err {err:.1e}",
        flush=True,
    )
    return row


def _bench(ms: list[int], sweep: bool, rep_ms: int) -> list[BenchRow]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    props = torch.cuda.get_device_properties(dev)
    num_sms = props.multi_processor_count
    l2_bytes = int(getattr(props, "L2_cache_size", 50 * 2**20))
    rows: list[BenchRow] = []
    for shape in SHAPES:
        K, N = shape.K, shape.N
        copies = max(1, math.ceil(4 * l2_bytes / (N * K * 2)))
        g = torch.Generator(device=dev).manual_seed(K + N)
        weights = [
            (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(dt) for _ in range(copies)
        ]
        for M in ms:
            x = torch.randn(M, K, device=dev, generator=g).to(dt)
            case = _Case(M, shape, x, weights, F.linear(x, weights[0]).float())
            rows.append(_measure(case, "cublas", None, rep_ms))
            variants = _variants(M, N, K, num_sms)
            for label, cfg in variants if sweep else variants[:1]:
                rows.append(_measure(case, label, cfg, rep_ms))
        del weights, case
        torch.cuda.empty_cache()
    return rows


def _best(rows: list[BenchRow]) -> dict[tuple[int, str], BenchRow]:
    """Fastest correct skinny_linear row per (M, shape)."""
    best: dict[tuple[int, str], BenchRow] = {}
    for r in rows:
        if r.impl == "cublas" or r.max_rel_err > 2e-2:
            continue
        key = (r.M, r.shape)
        if key not in best or r.ms < best[key].ms:
            best[key] = r
    return best


def _summary(rows: list[BenchRow]) -> list[str]:
    """Per model and M: the projections' time per decode step under each choice."""
    by = {(r.M, r.shape, r.impl): r for r in rows}
    best = _best(rows)
    lines = []
    for model, (layers, projs, head) in MODELS.items():
        for M in sorted({r.M for r in rows}):
            names = [*projs, head]
            if not all((M, n, "cublas") in by and (M, n) in best for n in names):
                continue
            counts = [layers] * len(projs) + [1]
            cub = sum(c * by[(M, n, "cublas")].ms for n, c in zip(names, counts, strict=True))
            dft = sum(
                c * by[(M, n, "default")].ms
                for n, c in zip(names, counts, strict=True)
                if (M, n, "default") in by
            )
            bst = sum(c * best[(M, n)].ms for n, c in zip(names, counts, strict=True))
            lines.append(
                f"{model} M={M}: projections per step cublas {cub:.3f} ms, "
                f"skinny default {dft:.3f} ms, skinny best {bst:.3f} ms"
            )
    return lines


def _print_table(rows: list[BenchRow]) -> None:
    by = {(r.M, r.shape, r.impl): r for r in rows}
    best = _best(rows)
    print(
        f"{'M':>2} {'shape':<18} {'K':>6} {'N':>7} {'cublas GB/s':>11} {'default GB/s':>12} "
        f"{'best GB/s':>9} {'best/cublas':>11}  best config"
    )
    for (M, name), b in sorted(best.items(), key=lambda kv: (kv[0][0], kv[1].K * kv[1].N)):
        cub, dft = by.get((M, name, "cublas")), by.get((M, name, "default"))
        cub_gbps = cub.weight_gbps if cub else float("nan")
        dft_gbps = dft.weight_gbps if dft else float("nan")
        cfg = b.config or {}
        desc = (
            f"{b.impl}: n{cfg.get('block_n')} k{cfg.get('block_k')} split{cfg.get('split_k')} "
            f"w{cfg.get('num_warps')} s{cfg.get('num_stages')} "
            f"{'dot' if cfg.get('use_dot') else 'fma'}"
        )
        print(
            f"{M:>2} {name:<18} {b.K:>6} {b.N:>7} {cub_gbps:>11.0f} {dft_gbps:>12.0f} "
            f"{b.weight_gbps:>9.0f} {b.weight_gbps / cub_gbps:>11.2f}  {desc}"
        )


# --- Ahead-of-time compile for sm_90: works without a GPU (Triton ships ptxas) ----------------


def _ptx_check() -> int:
    """Compile the GEMM kernel for sm_90 in the default and sweep variants (the divisibility
    hints a real launch gets: 16-aligned pointers, strides and sizes) and report its global
    access widths, MMA instructions and shared memory; fail without 16-byte weight loads."""
    assert "TRITON_INTERPRET" not in os.environ, "the interpreter replaces the compiler"
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from baton.kernels import triton_gemv as gemv

    fn = gemv._skinny_gemm_kernel
    base: dict[str, object] = {"HAS_BIAS": False, "SPLIT": False, "EVEN_K": True}
    base |= {"USE_DOT": True, "PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
    base |= {"SILU_MUL": False, "RMS_NORM": False, "ADD_RESIDUAL": False, "SQ_PAD": 1}
    base |= {"USE_PDL": False, "PREFETCH_TILES": 0}
    pdl_on = {"USE_PDL": True, "PREFETCH_TILES": 2}
    # (constexprs, num_warps, num_stages)
    cases: list[tuple[dict[str, object], int, int]] = [
        (base, 4, 4),
        (base | {"SPLIT": True}, 4, 4),
        (base | {"HAS_BIAS": True, "EVEN_K": False}, 4, 4),
        (base | {"BLOCK_N": 32, "BLOCK_K": 256}, 4, 4),
        (base | {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 512}, 4, 1),
        (base | pdl_on | {"SPLIT": True, "SILU_MUL": True}, 4, 4),
        (base | pdl_on | {"RMS_NORM": True, "SQ_PAD": 64}, 4, 4),
        (base | pdl_on | {"SPLIT": True, "ADD_RESIDUAL": True, "SQ_PAD": 64}, 4, 4),
    ]
    fp32_ptrs = ("ws_ptr", "sq_ptr")
    failed = 0
    for consts, num_warps, num_stages in cases:
        signature: dict[str, str] = {}
        attrs = {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = "*fp32" if name in fp32_ptrs else "*bf16"
                signature[name] = "*i32" if name == "counter_ptr" else signature[name]
            elif name == "eps":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
            if name not in ("M", "eps", "sq_cols"):  # M is do_not_specialize
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        options = {"num_warps": num_warps, "num_stages": num_stages}
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = kernel.asm["ptx"]
        cp_sizes = sorted(
            set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(0x[0-9a-f]+|\d+)", ptx))
        )
        loads = sorted(set(re.findall(r"ld\.global[.a-z0-9:]*", ptx)))
        mma = sorted(set(re.findall(r"wgmma\.mma_async[.a-z0-9]*|mma\.sync[.a-z0-9]*", ptx)))
        ok = "0x10" in cp_sizes or "16" in cp_sizes or "ld.global.v4.b32" in loads
        failed += not ok
        print(
            f"{'ok ' if ok else 'BAD'} {consts} warps={num_warps} stages={num_stages} "
            f"smem={kernel.metadata.shared} cp.async bytes={cp_sizes} loads={loads} mma={mma}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx-check", action="store_true", help="compile for sm_90, no GPU needed")
    parser.add_argument("--no-sweep", action="store_true", help="time the default config only")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 16], help="rows of x")
    parser.add_argument("--rep-ms", type=int, default=10, help="graph length per timing")
    args = parser.parse_args(argv)
    if args.ptx_check:
        return _ptx_check()
    if not torch.cuda.is_available():
        print("kernels.bench.gemv: no CUDA device, nothing to time (try --ptx-check)")
        return 0
    t0 = time.perf_counter()
    copy_gbps, read_gbps = _reference_gbps(args.rep_ms)
    print(f"copy {copy_gbps:.0f} GB/s (read + write), read-only sum {read_gbps:.0f} GB/s")
    rows = _bench(args.m, not args.no_sweep, args.rep_ms)
    best = _best(rows)
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "dtype": "bfloat16",
        "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "copy_gbps": copy_gbps,
        "read_only_gbps": read_gbps,
        "wall_s": time.perf_counter() - t0,
    }
    summary = _summary(rows)
    payload = {
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "best": [asdict(b) for b in best.values()],
        "summary": summary,
    }
    (out_dir / "bench_gemv.json").write_text(json.dumps(payload, indent=2))
    print()
    for line in summary:
        print(line)
    print(f"copy {copy_gbps:.0f} GB/s, read-only {read_gbps:.0f} GB/s, {meta['wall_s']:.0f} s")
    _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

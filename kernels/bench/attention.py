"""Decode-attention bandwidth on a GPU: Triton split-KV vs torch SDPA vs FlashInfer (if present).

    python -m baton.kernels.bench.attention [--batch 8] [--contexts 4096 32768]

Shape: Llama-3-8B-like (32 query heads, 8 KV heads, head_dim 128), bf16, block size 16,
shuffled block tables. Bandwidth counts the bytes the kernel must read at least: every context
token's K and V once (q, the output and the tables are negligible). Times are medians of
triton.testing.do_bench (and of CUDA-graph replays for Triton). SDPA runs on K/V already gathered
into dense [batch, kv_heads, context, head_dim] tensors, gather not timed: the best a dense
kernel could do. FlashInfer runs through our backend, kernels/flashinfer_attention.py
(tensor-core decode, planned outside the timed region). Prints a table; writes JSON to $OUT (or
bench_out/) as bench_attention.json. Not a test: on a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def _median_us(fn: Callable[[], Any], graph: bool = False) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")) * 1e3
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")) * 1e3


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def bench_one(batch: int, context: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    from baton.kernels.triton_attention import (
        paged_decode_attention,
        plan_attention,
        triton_paged_attention,
    )

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(context)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 8
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g, device=dev, dtype=dtype)
    v_cache = torch.randn(shape, generator=g, device=dev, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g, device=dev)
    tables = perm[: batch * blocks_per_seq].view(batch, blocks_per_seq).contiguous()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g, device=dev, dtype=dtype)
    seq_lens = [context] * batch
    scale = HEAD_DIM**-0.5
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()

    # Dense baseline inputs: [B, kv_heads, ctx, D], gathered once outside the timed region.
    k_dense = k_cache[tables].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v_dense = v_cache[tables].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    qs = q.unsqueeze(2)  # [B, H, 1, D]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qs, k_dense, v_dense, scale=scale, enable_gqa=True)

    want = sdpa().squeeze(2)

    rows: list[dict[str, Any]] = []

    def record(name: str, us: float, out: torch.Tensor | None, **extra: Any) -> None:
        rows.append(
            {
                "impl": name,
                "batch": batch,
                "context": context,
                "us": round(us, 2),
                "GB_per_s": round(kv_bytes / us / 1e3, 1),
                "rel_err_vs_sdpa": None if out is None else _rel_err(out, want),
                **extra,
            }
        )

    meta = plan_attention(tables, seq_lens, list(range(batch + 1)), BLOCK_SIZE, KV_HEADS)
    out = torch.empty_like(q)

    def run() -> torch.Tensor:
        return triton_paged_attention(q, k_cache, v_cache, meta, scale, out=out)

    run()
    record("triton", _median_us(run), out.clone(), num_splits=meta.num_splits)
    try:
        record("triton (graph)", _median_us(run, graph=True), None, num_splits=meta.num_splits)
    except Exception as e:  # graph capture is optional here
        print(f"cuda graph timing failed: {e!r}", file=sys.stderr)
    lens = meta.decode_seq_lens

    def one() -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, 1, out=out)

    one()
    record("triton 1 split", _median_us(one), out.clone(), num_splits=1)
    record("sdpa (pre-gathered)", _median_us(sdpa), None)

    fi = _flashinfer_decode(q, k_cache, v_cache, tables, context, scale)
    if fi is not None:
        o = fi()
        record("flashinfer", _median_us(fi), o)
    return rows


def _flashinfer_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context: int,
    scale: float,
) -> Callable[[], torch.Tensor] | None:
    """Our FlashInfer backend (flashinfer_attention: tensor-core decode for GQA) on the same
    cache, planned once outside the timed region; None if flashinfer is unavailable."""
    from baton.kernels.flashinfer_attention import (
        flashinfer_available,
        flashinfer_paged_attention,
        plan_flashinfer,
    )

    if not flashinfer_available():
        return None
    try:
        batch = tables.shape[0]
        # FlashInfer wants its float workspace zeroed before first use.
        workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
        plan = plan_flashinfer(
            tables,
            [context] * batch,
            list(range(batch + 1)),
            BLOCK_SIZE,
            HEADS,
            KV_HEADS,
            HEAD_DIM,
            q.dtype,
            workspace,
        )
        out = torch.empty_like(q)
        return lambda: flashinfer_paged_attention(q, k_cache, v_cache, plan, scale, out=out)
    except Exception as e:  # API drift between FlashInfer versions, JIT failure: report, go on
        print(f"flashinfer unavailable: {e!r}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench.attention: no CUDA device, nothing to measure")
        return 0
    rows: list[dict[str, Any]] = []
    for context in args.contexts:
        rows += bench_one(args.batch, context, torch.bfloat16)
        torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    print(
        f"\n{props.name}, {props.multi_processor_count} SMs; bf16, {HEADS}/{KV_HEADS} heads, d=128"
    )
    print(
        f"{'impl':<22}{'batch':>6}{'context':>9}{'splits':>7}{'us':>10}{'GB/s':>9}{'rel err':>10}"
    )
    for r in rows:
        err = "" if r["rel_err_vs_sdpa"] is None else f"{r['rel_err_vs_sdpa']:.1e}"
        splits = r.get("num_splits", "")
        print(
            f"{r['impl']:<22}{r['batch']:>6}{r['context']:>9}{splits!s:>7}"
            f"{r['us']:>10.1f}{r['GB_per_s']:>9.0f}{err:>10}"
        )
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_attention.json"
    path.write_text(json.dumps({"device": props.name, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

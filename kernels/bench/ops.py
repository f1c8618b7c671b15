"""Bandwidth of the Triton ops in triton_ops.py vs torch eager (the references), on one GPU.

    python -m baton.kernels.bench.ops              # GPU: table + JSON ($OUT or bench_out/)
    python -m baton.kernels.bench.ops --ptx-check  # any machine: compile for sm_90, read the PTX

Every op is memory-bound, so the figure of merit is the fewest bytes it must move (each input read
once, each output written once) over the do_bench median, next to a device-to-device copy's rate
as the ceiling. Tensors are sized past the L2 (50-60 MB on H100/H200), so repeated calls measure
device memory, not the cache. Without CUDA the benchmark prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BenchRow:
    op: str
    shape: str
    bytes_moved: int
    triton_ms: float
    eager_ms: float
    triton_gbps: float
    eager_gbps: float
    triton_of_copy: float
    """Triton bandwidth as a fraction of the measured copy bandwidth."""


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _copy_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written: the practical ceiling."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _bench() -> list[BenchRow]:
    from baton.kernels import ops_ref, triton_ops

    dev, dt, eps = "cuda", torch.bfloat16, 1e-6
    e = torch.tensor([], dtype=dt).element_size()
    copy_gbps = _copy_gbps()
    rows: list[BenchRow] = []

    def add(
        op: str, shape: str, nbytes: int, kern: Callable[[], object], eager: Callable[[], object]
    ) -> None:
        t_ms, e_ms = _median_ms(kern), _median_ms(eager)
        t_gbps, e_gbps = nbytes / t_ms / 1e6, nbytes / e_ms / 1e6
        rows.append(BenchRow(op, shape, nbytes, t_ms, e_ms, t_gbps, e_gbps, t_gbps / copy_gbps))

    tokens, hidden = 8192, 4096
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    res = torch.randn(tokens, hidden, device=dev, dtype=dt)
    w = torch.randn(hidden, device=dev, dtype=dt)
    out = torch.empty_like(x)
    shape = f"{tokens}x{hidden}"
    add(
        "rms_norm",
        shape,
        2 * x.numel() * e + hidden * e,
        lambda: triton_ops.rms_norm(x, w, eps, out=out),
        lambda: ops_ref.rms_norm_ref(x, w, eps),
    )
    add(
        "fused_add_rms_norm",
        shape,
        4 * x.numel() * e + hidden * e,
        lambda: triton_ops.fused_add_rms_norm(x, res, w, eps, out=out),
        lambda: ops_ref.fused_add_rms_norm_ref(x, res, w, eps),
    )

    hq, hk, head_dim, max_pos = 32, 8, 128, 32768
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, device=dev, dtype=dt)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim :].view(tokens, hk, head_dim)
    pos = torch.randint(0, max_pos, (tokens,), device=dev)
    angles = torch.rand(max_pos, head_dim // 2, device=dev) * 6.3
    cos_h, sin_h = angles.cos().to(dt), angles.sin().to(dt)
    rope_bytes = 2 * (q.numel() + k.numel()) * e + tokens * (8 + head_dim * e)
    add(
        "rope_inplace",
        f"{tokens}x({hq}+{hk})x{head_dim}",
        rope_bytes,
        lambda: triton_ops.rotary_embedding(pos, q, k, cos_h, sin_h, inplace=True),
        lambda: (ops_ref.rope_ref(q, pos, cos_h, sin_h), ops_ref.rope_ref(k, pos, cos_h, sin_h)),
    )

    inter = 14336
    gu = torch.randn(tokens // 2, 2 * inter, device=dev, dtype=dt)
    act = torch.empty(tokens // 2, inter, device=dev, dtype=dt)
    add(
        "silu_and_mul",
        f"{tokens // 2}x2*{inter}",
        (gu.numel() + act.numel()) * e,
        lambda: triton_ops.silu_and_mul(gu, out=act),
        lambda: ops_ref.silu_and_mul_ref(gu),
    )

    block_size = 16
    num_blocks = 2 * tokens // block_size
    k_cache = torch.empty(num_blocks, block_size, hk, head_dim, device=dev, dtype=dt)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device=dev)[:tokens]
    add(
        "write_kv_cache",
        f"{tokens}x{hk}x{head_dim}",
        4 * k.numel() * e + tokens * 8,
        lambda: triton_ops.write_kv_cache(k, v, k_cache, v_cache, slots),
        lambda: ops_ref.write_kv_cache(k, v, k_cache, v_cache, slots),
    )
    rows.append(BenchRow("d2d_copy", "1GiB fp32", 0, 0.0, 0.0, copy_gbps, copy_gbps, 1.0))
    return rows


def _print_table(rows: list[BenchRow]) -> None:
    print(
        f"{'op':<20} {'shape':<22} {'MB':>8} {'triton ms':>10} {'eager ms':>9} "
        f"{'triton GB/s':>11} {'eager GB/s':>10} {'of copy':>8}"
    )
    for r in rows:
        print(
            f"{r.op:<20} {r.shape:<22} {r.bytes_moved / 1e6:>8.1f} {r.triton_ms:>10.4f} "
            f"{r.eager_ms:>9.4f} {r.triton_gbps:>11.0f} {r.eager_gbps:>10.0f} "
            f"{r.triton_of_copy:>8.2f}"
        )


# --- Ahead-of-time compile for sm_90: works without a GPU (Triton ships ptxas) ----------------


def _ptx_check() -> int:
    """Compile every kernel for sm_90 with the divisibility hints a real launch would get (16-
    aligned pointers and strides) and report global load/store widths; fail without 16-byte
    (v4.b32) loads, the access width HOPPER.md asks for."""
    assert "TRITON_INTERPRET" not in os.environ, "the interpreter replaces the compiler"
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from baton.kernels import triton_argmax, triton_decode
    from baton.kernels import triton_ops as ops

    pointer_types = {"pos_ptr": "*i64", "slot_ptr": "*i64", "ids_ptr": "*i64", "sq_ptr": "*fp32"}
    # (kernel, constexprs, elements per tile: the wrappers pick num_warps from it)
    cases: list[tuple[Any, dict[str, object], int]] = [
        (ops._rms_norm_kernel, {"HAS_RESIDUAL": True, "BLOCK_N": 1024}, 1024),
        (ops._rms_norm_kernel, {"HAS_RESIDUAL": False, "BLOCK_N": 4096}, 4096),
        (
            ops._rope_kernel,
            {"NUM_Q_HEADS": 32, "NUM_K_HEADS": 8, "HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64},
            32 * 64,
        ),
        (
            ops._rope_kernel,
            {"NUM_Q_HEADS": 9, "NUM_K_HEADS": 3, "HALF": 32, "BLOCK_H": 16, "BLOCK_HALF": 32},
            16 * 32,
        ),
        (ops._silu_and_mul_kernel, {"BLOCK": 1024}, 1024),
        (ops._embed_sumsq_kernel, {"BLOCK_N": 4096}, 4096),
        (triton_argmax._argmax_kernel, {"CHUNK": 4096, "CHUNKS_PAD": 32}, 4096),
        (
            ops._write_kv_kernel,
            {"NUM_HEADS": 8, "HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128},
            8 * 128,
        ),
    ]
    # The decode split kernel with the attention prologue folded in (Qwen3's head norms, graph
    # buffers read early), as the engine launches it at batch 1: 4 warps.
    decode: dict[str, object] = {"NUM_HEADS": 32, "GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128}
    decode |= {"HEAD_DIM_PAD": 128}
    decode |= {"BLOCK_SIZE": 16, "BLOCK_N": 64, "HAS_ROWS": False, "DIRECT": False}
    decode |= {"DOT_PRECISION": "tf32", "PRELOAD": True, "PROLOGUE": True, "QK_NORM": True}
    cases.append((triton_decode._decode_split_kernel, decode | {"USE_PDL": True}, 4 * 512))
    own_pointers = {
        triton_argmax._argmax_kernel: {
            "part_idx_ptr": "*i32",
            "counter_ptr": "*i32",
            "out_ptr": "*i64",
        },
        triton_decode._decode_split_kernel: {
            "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32",
            "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32",
            "rows_ptr": "*i32",
        },
    }
    failed = 0
    for fn, consts, tile in cases:
        pointers = pointer_types | own_pointers.get(fn, {})
        num_warps = ops._num_warps(tile)
        signature: dict[str, str] = {}
        attrs = {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
            elif name in ("eps", "qk_scale"):
                signature[name] = "fp32"
            else:
                signature[name] = pointers.get(name, "*bf16") if name.endswith("_ptr") else "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
        )
        ptx = kernel.asm["ptx"]
        widths = sorted(set(re.findall(r"(?:ld|st)\.global[.a-z0-9:]*", ptx)))
        ok = any(w.startswith("ld.global") and ".v4.b32" in w for w in widths)
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {fn.fn.__name__:<22} {consts} {widths}")
        # The folded prologue must not convert K/V tiles through shared memory (bench notes).
        if fn is triton_decode._decode_split_kernel and kernel.metadata.shared > 64 * 1024:
            print(f"BAD {fn.fn.__name__}: {kernel.metadata.shared} bytes of shared memory")
            failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx-check", action="store_true", help="compile for sm_90, no GPU needed")
    args = parser.parse_args(argv)
    if args.ptx_check:
        return _ptx_check()
    if not torch.cuda.is_available():
        print("kernels.bench.ops: no CUDA device, nothing to time (try --ptx-check)")
        return 0
    rows = _bench()
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16"}
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (out_dir / "bench_ops.json").write_text(json.dumps(payload, indent=2))
    _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The attention prologue in one launch: [per-head q/k RMSNorm] -> RoPE -> KV-cache write.

    qk_norm_rope_write_kv(positions, q, k, v, cos_half, sin_half, k_cache, v_cache, slot_mapping,
                          q_norm_weight, k_norm_weight, eps) -> (q, k) rotated in place

Bit for bit the sequence triton_ops.rms_norm (per head, Qwen3) -> rotary_embedding(inplace=True)
-> write_kv_cache that it replaces, with the same roundings to the model dtype in between (the
shared pieces, the rotation and the input checks, are triton_ops' own). One kernel instead of
three or four per layer: at batch-1 decode each launch is a few microseconds of a ~6 ms step.
Takes a constexpr USE_PDL like every kernel in triton_ops (pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.triton_ops import (
    _check_caches,
    _check_heads,
    _check_index,
    _check_tables,
    _num_warps,
    _rope_halves,
)


@triton.jit  # type: ignore[untyped-decorator]
def _qk_norm_rope_kv_kernel(  # type: ignore[no-untyped-def]
    pos_ptr,
    cos_ptr,
    sin_ptr,
    table_row_stride,
    q_ptr,
    q_tok_stride,
    q_head_stride,
    k_ptr,
    k_tok_stride,
    k_head_stride,
    v_ptr,
    v_tok_stride,
    v_head_stride,
    q_w_ptr,
    k_w_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cache_slot_stride,
    cache_head_stride,
    slot_ptr,
    head_dim,  # run-time, like _rms_norm_kernel's n_cols: the variance divides the same way
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STATIC_INDEX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Grid (tokens, head groups). Region map of axis 1, BLOCK_H heads per group:
    #   [0, NQG): q heads g*BLOCK_H ...   | [NQG, NQG + NKG): k heads, and the same v heads
    # where NQG = cdiv(NUM_Q_HEADS, BLOCK_H). Only k groups touch the caches.
    num_q_groups: tl.constexpr = (NUM_Q_HEADS + BLOCK_H - 1) // BLOCK_H
    tok = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    is_q = group < num_q_groups
    head0 = tl.where(is_q, group, group - num_q_groups) * BLOCK_H
    h = head0 + tl.arange(0, BLOCK_H)[:, None]
    h_mask = h < tl.where(is_q, NUM_Q_HEADS, NUM_K_HEADS)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    half_mask = h_mask & (d < HALF)
    x_ptr = tl.where(is_q, q_ptr + tok * q_tok_stride, k_ptr + tok * k_tok_stride)
    x_head_stride = tl.where(is_q, q_head_stride, k_head_stride)
    if HAS_NORM:  # weights: read before the wait
        w_ptr = tl.where(is_q, q_w_ptr, k_w_ptr)
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    if STATIC_INDEX:  # positions and slots were filled before the step's first kernel
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        cos = tl.load(cos_ptr + pos * table_row_stride + d, mask=d < HALF, other=0.0)
        sin = tl.load(sin_ptr + pos * table_row_stride + d, mask=d < HALF, other=0.0)
    if USE_PDL:  # otherwise a previous kernel may have written positions and slots
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not STATIC_INDEX:
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        cos = tl.load(cos_ptr + pos * table_row_stride + d, mask=d < HALF, other=0.0)
        sin = tl.load(sin_ptr + pos * table_row_stride + d, mask=d < HALF, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    src = x_ptr + h * x_head_stride + d
    x1 = tl.load(src, mask=half_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=half_mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    if HAS_NORM:
        # Op for op _rms_norm_kernel on each head row, with its summation order: the variance is
        # reduced over the whole head as one row of the tile, and num_warps == BLOCK_H puts one
        # row in one warp with the same elements per thread as rms_norm's one-warp program.
        # Reading the halves again (above) is an L1 hit; the store below depends on every
        # element of the row through the sum, so no thread overwrites x before all have read it.
        full = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        x = tl.load(x_ptr + h * x_head_stride + full, mask=h_mask & (full < head_dim), other=0.0)
        x = x.to(tl.float32)
        variance = tl.sum(x * x, axis=1) / head_dim
        rstd = tl.rsqrt(variance + eps)[:, None]
        # Rounded to the model dtype before and after the weight multiply, as rms_norm does,
        # and again as rotary_embedding reads what rms_norm stored.
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    o1, o2 = _rope_halves(x1, x2, cos, sin)
    o1 = o1.to(dtype)
    o2 = o2.to(dtype)
    tl.store(src, o1, mask=half_mask)
    tl.store(src + HALF, o2, mask=half_mask)

    # k groups: the rotated k and the untouched v into the caches (slot < 0: padding, skipped).
    valid = (slot >= 0) & (group >= num_q_groups)
    dst = k_cache_ptr + slot * cache_slot_stride + h * cache_head_stride + d
    cache_mask = half_mask & valid
    tl.store(dst, o1.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
    tl.store(dst + HALF, o2.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
    full_d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    v_mask = h_mask & (full_d < 2 * HALF) & valid
    v = tl.load(v_ptr + tok * v_tok_stride + h * v_head_stride + full_d, mask=v_mask)
    v_dst = v_cache_ptr + slot * cache_slot_stride + h * cache_head_stride + full_d
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def qk_norm_rope_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    static_index: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue in one kernel; returns (q, k), rotated in place.

    q [T, Hq, D], k and v [T, Hk, D] (strided views of a fused QKV output are fine); cos_half,
    sin_half and positions as for rotary_embedding; caches and slot_mapping as for write_kv_cache.
    With q_norm_weight and k_norm_weight ([D], model dtype: Qwen3) each q and k head is first
    RMS-normalised. Bit for bit the sequence rms_norm (per head) -> rotary_embedding(inplace=True)
    -> write_kv_cache, including its roundings to the model dtype in between.

    static_index: positions and slot_mapping were written before the step's first kernel (a
    CUDA graph's input buffers), so under PDL they and the cos/sin rows are read before the
    wait for the previous kernel (the qkv GEMM): one dependent round trip fewer per layer.

    Grid: (tokens, head groups of 4). A decode step of one sequence with 32 + 8 heads gets ten
    programs that run side by side; one program per token would walk the heads in turn, and its
    loop iterations cannot overlap (each stores in place what the next could alias). Four heads
    per program keep prefill at about 80k programs for 8k tokens.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = head_dim // 2
    assert head_dim == 2 * half, head_dim
    _check_heads("q", q, num_tokens, head_dim)
    _check_heads("k", k, num_tokens, head_dim)
    _check_heads("v", v, num_tokens, head_dim)
    assert v.shape == k.shape and q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    _check_index("positions", positions, num_tokens)
    _check_index("slot_mapping", slot_mapping, num_tokens)
    _check_tables(cos_half, sin_half, head_dim)
    _check_caches(k_cache, v_cache, num_k_heads, head_dim)
    has_norm = q_norm_weight is not None
    assert (k_norm_weight is not None) == has_norm, "pass both q_norm_weight and k_norm_weight"
    block_half = triton.next_power_of_2(half)
    block_h = min(4, triton.next_power_of_2(max(num_q_heads, num_k_heads)))
    if q_norm_weight is not None and k_norm_weight is not None:
        for w in (q_norm_weight, k_norm_weight):
            assert w.shape == (head_dim,) and w.stride(0) == 1, (w.shape, w.stride())
            assert w.dtype == q.dtype, ("norm weights must be in the model dtype", w.dtype)
            assert w.device == q.device, (w.device, q.device)
        # rms_norm reduces a row of head_dim in one warp only up to this width (_num_warps).
        assert _num_warps(2 * block_half) == 1, head_dim
    tensors = (q, k, v, positions, cos_half, sin_half, k_cache, v_cache, slot_mapping)
    assert all(t.device == q.device for t in tensors), [t.device for t in tensors]
    if num_tokens == 0:
        return q, k
    num_groups = triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h)
    _qk_norm_rope_kv_kernel[(num_tokens, num_groups)](
        positions,
        cos_half,
        sin_half,
        cos_half.stride(0),
        q,
        q.stride(0),
        q.stride(1),
        k,
        k.stride(0),
        k.stride(1),
        v,
        v.stride(0),
        v.stride(1),
        q if q_norm_weight is None else q_norm_weight,  # unread without HAS_NORM
        k if k_norm_weight is None else k_norm_weight,
        k_cache,
        v_cache,
        k_cache.stride(1),
        k_cache.stride(2),
        slot_mapping,
        head_dim,
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        HAS_NORM=has_norm,
        STATIC_INDEX=static_index,
        USE_PDL=pdl.enabled(),
        # With the norm, one warp per head row (see the kernel); without, one warp carries a
        # whole [4, D/2] tile in 16-byte accesses: the op is latency-bound at decode sizes.
        num_warps=block_h if has_norm else 1,
        **pdl.launch_kwargs(),
    )
    return q, k

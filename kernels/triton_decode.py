"""Paged decode attention in Triton: one query token per sequence, split-KV (flash-decoding).

Stage 1, grid (num_seqs, num_kv_heads, num_splits): a program takes every query head of one KV
head group (GQA: K/V are loaded once for the whole group) over one contiguous slice of the
sequence's context, runs an online softmax in float32, and writes a partial output normalised by
its own softmax sum plus that sum's log (base 2). Stage 2, grid (num_seqs, num_heads), merges
the splits by their log-sum-exps. With one split, stage 1 writes the final output directly.

Context slices, per sequence (tiles of BLOCK_N tokens; the last tile is cut at seq_len):

    tokens  0 ............................................................. seq_len
            | split 0: tiles_per_split tiles | split 1 | ... | last | (empty splits) |

A split that starts at or past seq_len writes lse = -inf and contributes nothing, so one
num_splits serves every sequence of the batch (and a fixed-shape CUDA graph).

Two launches beat one here: folding the merge into the last-arriving split program (an
arrival counter) was measured 3 us per layer slower at batch 1 and 1k context on an H200
(12 vs 9 us: the atomic and the re-read of the partials sit on the critical path, where the
merge kernel's own programs run in parallel and, with PDL, start while stage 1 drains).

With `preload` (CUDA graphs, where the step's tables and older KV are fixed before its first
kernel) a short context's K/V are read before the PDL wait: at batch 1 and 1k context the
split kernel's two dependent round trips (seq_len and block table, then K/V) overlap the
attention prologue, and only q and the newest token's K/V row come after it.

With `prologue` (DecodePrologue) the kernel also does the attention prologue that
triton_prologue runs as its own launch: q and the newest k go through the head norms and RoPE as
they are loaded, the newest K/V row is used from registers, and the split that holds the newest
token writes it to the cache. One launch fewer per layer, and at batch 1 the prologue's own
dependent round trips (indices, then rows) leave the critical path.

Each token's K/V row is found through the block table (`block_tables[seq, tok // BLOCK_SIZE]`,
offset `tok % BLOCK_SIZE`), so any power-of-two block size works, smaller or larger than BLOCK_N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.triton_ops import _check_heads, _check_index, _check_tables

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256
"""A split shorter than this spends more on its partial write and merge than it saves."""
MAX_SPLITS = 64
CTAS_PER_SM = 4
"""Target programs per SM: enough loads in flight to cover HBM latency with 4 warps each."""


@dataclass(frozen=True)
class DecodePrologue:
    """The attention prologue for paged_decode_attention to do in its own kernel: what
    triton_prologue.qk_norm_rope_write_kv does to a decode step (per-head RMSNorm of q and k
    with q_norm_weight / k_norm_weight, RoPE at `positions`, the new K/V written at
    slot_mapping; a slot < 0 is skipped), bit for bit without the norm. q (the attention's own
    argument) and k are read unrotated and left so; the caches receive the rotated k and v.

    k, v: [num_seqs, num_kv_heads, head_dim] (strided views of a fused qkv output are fine);
    positions, slot_mapping: [num_seqs] ints; cos_half, sin_half: [max_positions, head_dim / 2]
    tables in the model dtype (rotary.RotaryEmbedding's). head_dim must be a power of two.
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_half: torch.Tensor
    sin_half: torch.Tensor
    slot_mapping: torch.Tensor
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    eps: float = 1e-6


def _check_prologue(
    p: DecodePrologue, q: torch.Tensor, k_cache: torch.Tensor, rows: torch.Tensor | None
) -> None:
    """triton_prologue's input checks, plus what the folded form needs."""
    num_seqs, _, head_dim = q.shape
    assert rows is None, "the folded prologue takes row b of q as sequence b (rows=None)"
    assert head_dim >= 2 and head_dim & (head_dim - 1) == 0, ("head_dim not a power of 2", head_dim)
    _check_heads("k", p.k, num_seqs, head_dim)
    _check_heads("v", p.v, num_seqs, head_dim)
    assert p.k.shape[1] == p.v.shape[1] == k_cache.shape[2], (p.k.shape, p.v.shape, k_cache.shape)
    assert p.k.dtype == p.v.dtype == q.dtype, (p.k.dtype, p.v.dtype, q.dtype)
    _check_index("positions", p.positions, num_seqs)
    _check_index("slot_mapping", p.slot_mapping, num_seqs)
    _check_tables(p.cos_half, p.sin_half, head_dim)
    assert (p.q_norm_weight is None) == (p.k_norm_weight is None), "both norm weights or none"
    for w in (p.q_norm_weight, p.k_norm_weight):
        if w is not None:
            assert w.shape == (head_dim,) and w.stride(0) == 1, w.shape
            assert w.dtype == q.dtype, ("norm weights must be in the model dtype", w.dtype)
    tensors = (p.k, p.v, p.positions, p.cos_half, p.slot_mapping)
    assert all(t.device == q.device for t in tensors), [t.device for t in tensors]


def _prologue_args(
    p: DecodePrologue | None, q: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[object, ...]:
    """The split kernel's prologue arguments, kn_ptr .. eps (placeholders, never read, without
    a prologue)."""
    if p is None:
        return (q, q, 0, 0, 0, 0, seq_lens, q, q, 0, seq_lens, q, q, 0.0)
    q_w = p.q_norm_weight if p.q_norm_weight is not None else p.k
    k_w = p.k_norm_weight if p.k_norm_weight is not None else p.k
    return (
        p.k,
        p.v,
        p.k.stride(0),
        p.k.stride(1),
        p.v.stride(0),
        p.v.stride(1),
        p.positions,
        p.cos_half,
        p.sin_half,
        p.cos_half.stride(0),
        p.slot_mapping,
        q_w,
        k_w,
        p.eps,
    )


def num_sms_of(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device; 132 (an H100 SXM) for the CPU interpreter."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 132


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many slices to cut each sequence's context into for decode.

    Without splitting the grid has num_seqs * num_kv_heads programs: 64 at batch 8 with 8 KV
    heads, half of an H100's 132 SMs, each walking a whole 32k context alone. Split until there
    are about CTAS_PER_SM programs per SM, but keep each slice at least MIN_TOKENS_PER_SPLIT
    tokens long (of the longest sequence) and at most MAX_SPLITS slices. For CUDA graphs pass
    the captured shape's worst case (e.g. max_model_len) so the choice is fixed per graph.
    """
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-CTAS_PER_SM * num_sms // programs)
    cap = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


@triton.jit
def _norm_rope(row_ptrs, m, cos, sin, w, w_partner, eps, QK_NORM, HEAD_DIM):  # type: ignore[no-untyped-def]
    # The head rows at row_ptrs ([R, 1]; rows with m off give zeros) after the per-head RMSNorm
    # (QK_NORM) and RoPE, in their dtype, with triton_prologue's operations and roundings
    # (rms_norm's, then rotary_embedding's). Kept in the [R, HEAD_DIM] layout of a plain tile
    # load, never split into halves and re-joined (that costs a shared-memory layout conversion
    # of the K/V tiles it meets): element d is rotated with its partner d +- HEAD_DIM / 2, read
    # by a second load from the same lines; cos [1, HEAD_DIM] repeats the half table, sin too
    # with its first half negated, and w_partner is the norm weight at the partner's index.
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)[None, :]
    x = tl.load(row_ptrs + d, mask=m, other=0.0).to(tl.float32)
    xp = tl.load(row_ptrs + (d + HALF) % HEAD_DIM, mask=m, other=0.0).to(tl.float32)
    dtype = row_ptrs.dtype.element_ty
    if QK_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        x = ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
        xp = ((xp * rstd).to(dtype).to(tl.float32) * w_partner).to(dtype).to(tl.float32)
    return (x * cos + xp * sin).to(dtype)


@triton.jit
def _token_rope(seq, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cs, HEAD_DIM):  # type: ignore[no-untyped-def]
    # Sequence seq's new token: its cache slot, and cos / sign-folded sin ([1, HEAD_DIM] fp32)
    # at its position, as _norm_rope takes them.
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)[None, :]
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cs + d % HALF).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cs + d % HALF).to(tl.float32)
    return slot, cos, tl.where(d < HALF, -sin, sin)


@triton.jit
def _newest_kv(new, kn_row, vn_row, k_dst, v_dst, cos, sin, w, w_partner, eps, QK_NORM, HEAD_DIM):  # type: ignore[no-untyped-def]
    # The tile's rows where `new` ([BLOCK_N]) holds (the sequence's newest token: one row or
    # none) from this step's k (normed, rotated) and v rows instead of the cache, as a K and a V
    # tile in the layout of the cache tiles they replace rows of; the rows are also written to
    # the cache (k_dst, v_dst: row pointers, null-masked by the caller through `new`).
    d = tl.arange(0, HEAD_DIM)[None, :]
    rows = new[:, None]
    k = _norm_rope(kn_row + 0 * rows, rows, cos, sin, w, w_partner, eps, QK_NORM, HEAD_DIM)
    v = tl.load(vn_row + 0 * rows + d, mask=rows, other=0.0)
    tl.store(k_dst + 0 * rows + d, k.to(k_dst.dtype.element_ty), mask=rows)
    tl.store(v_dst + 0 * rows + d, v.to(v_dst.dtype.element_ty), mask=rows)
    return k, v


@triton.jit  # type: ignore[untyped-decorator]
def _decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] float32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] float32, log2 of the softmax sum
    block_tables_ptr,
    seq_lens_ptr,
    rows_ptr,  # [num_seqs]: packed row of each sequence's query (read only when HAS_ROWS)
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2)
    stride_q_tok,
    stride_q_head,
    stride_k_blk,
    stride_k_tok,
    stride_k_head,
    stride_v_blk,
    stride_v_tok,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_bt_seq,
    kn_ptr,  # PROLOGUE: this step's k and v rows, before RoPE, [num_seqs, kv_heads, D] views
    vn_ptr,
    stride_kn_tok,
    stride_kn_head,
    stride_vn_tok,
    stride_vn_head,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_cs,
    slot_ptr,
    qw_ptr,
    kw_ptr,
    eps,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: write the normalised output, skip stage 2
    DOT_PRECISION: tl.constexpr,
    PRELOAD: tl.constexpr,
    PROLOGUE: tl.constexpr,  # q/k not yet rotated, the newest K/V not yet in the cache
    QK_NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_head_off = kv_head * stride_k_head
    v_head_off = kv_head * stride_v_head
    if PRELOAD:
        # seq_lens and the block tables were filled before the step's first kernel, and every
        # cached token but the sequence's newest (which the attention prologue writes just
        # before this kernel) was written by earlier steps: all readable before gdc_wait, so
        # a short context's whole K/V tile streams in while the previous kernel still runs.
        seq_len = tl.load(seq_lens_ptr + seq)
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
        tok = start + tl.arange(0, BLOCK_N)
        old = (tok < end) & (tok < seq_len - 1) & (tiles_per_split == 1)
        block = tl.load(table + tok // BLOCK_SIZE, mask=old, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        k_pre = tl.load(
            k_ptr + (block * stride_k_blk + slot * stride_k_tok + k_head_off)[:, None] + d[None, :],
            mask=old[:, None] & d_mask[None, :],
            other=0.0,
        )
        v_pre = tl.load(
            v_ptr + (block * stride_v_blk + slot * stride_v_tok + v_head_off)[:, None] + d[None, :],
            mask=old[:, None] & d_mask[None, :],
            other=0.0,
        )
    if PROLOGUE:  # the norm weights, and with PRELOAD this token's position, slot and cos/sin
        dd = tl.arange(0, HEAD_DIM)[None, :]
        partner = (dd + HEAD_DIM // 2) % HEAD_DIM
        if QK_NORM:
            qw = tl.load(qw_ptr + dd).to(tl.float32)
            qw_p = tl.load(qw_ptr + partner).to(tl.float32)
            kw = tl.load(kw_ptr + dd).to(tl.float32)
            kw_p = tl.load(kw_ptr + partner).to(tl.float32)
        else:
            qw = tl.zeros([1, HEAD_DIM], tl.float32)  # unused without QK_NORM
            qw_p = qw
            kw = qw
            kw_p = qw
        if PRELOAD:
            slot_new, cos, sin = _token_rope(seq, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cs,
                                             HEAD_DIM)  # fmt: skip
    if USE_PDL:  # without PRELOAD, seq_lens and tables may come from the previous kernel
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not PRELOAD:
        seq_len = tl.load(seq_lens_ptr + seq)
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
        if PROLOGUE:
            slot_new, cos, sin = _token_rope(seq, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cs,
                                             HEAD_DIM)  # fmt: skip
    row = tl.load(rows_ptr + seq).to(tl.int64) if HAS_ROWS else seq.to(tl.int64)

    # Rows of the q tile are the group's query heads, padded to GROUP_PAD >= 16 for tl.dot;
    # padded rows load zeros and are never stored.
    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    if PROLOGUE:
        # The attention prologue (triton_prologue.qk_norm_rope_write_kv) in this kernel: q and
        # the newest k normed and rotated with the same roundings as they are loaded, and the
        # newest K/V row used from the step's projections and written to the cache by the split
        # that holds it (slot < 0: a padding row, nothing written).
        q_rows = q_ptr + row * stride_q_tok + heads[:, None] * stride_q_head
        q = _norm_rope(q_rows, g_mask[:, None], cos, sin, qw, qw_p, eps, QK_NORM, HEAD_DIM)
        kn_row = kn_ptr + row * stride_kn_tok + kv_head * stride_kn_head
        vn_row = vn_ptr + row * stride_vn_tok + kv_head * stride_vn_head
        blk = tl.maximum(slot_new, 0) // BLOCK_SIZE
        off = tl.maximum(slot_new, 0) % BLOCK_SIZE
        k_dst = k_ptr + blk * stride_k_blk + off * stride_k_tok + k_head_off
        v_dst = v_ptr + blk * stride_v_blk + off * stride_v_tok + v_head_off
        newest = tl.where(slot_new >= 0, seq_len - 1, -1)  # no row matches -1
    else:
        q = tl.load(
            q_ptr + row * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    if PRELOAD and tiles_per_split == 1:
        if start < end:
            # One tile: the preloaded rows plus the newest token's, read now (after the wait).
            t_mask = tok < end
            if PROLOGUE:
                new = t_mask & (tok == newest)
                k_new, v_new = _newest_kv(new, kn_row, vn_row, k_dst, v_dst, cos, sin, kw, kw_p,
                                          eps, QK_NORM, HEAD_DIM)  # fmt: skip
                k = tl.where(new[:, None], k_new, k_pre)
                v = tl.where(new[:, None], v_new, v_pre)
            else:
                new = t_mask & (tok == seq_len - 1)
                block = tl.load(table + tok // BLOCK_SIZE, mask=new, other=0).to(tl.int64)
                k_off = block * stride_k_blk + slot * stride_k_tok + k_head_off
                v_off = block * stride_v_blk + slot * stride_v_tok + v_head_off
                new_d = new[:, None] & d_mask[None, :]
                k_new = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=new_d, other=0.0)
                v_new = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=new_d, other=0.0)
                k = tl.where(new[:, None], k_new, k_pre)
                v = tl.where(new[:, None], v_new, v_pre)
            # The loop below on one tile from m = -inf, l = 0, acc = 0, op for op.
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_i = tl.max(s, 1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        for tile_start in range(start, end, BLOCK_N):
            tok = tile_start + tl.arange(0, BLOCK_N)
            t_mask = tok < end
            block = tl.load(table + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            slot = tok % BLOCK_SIZE
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k_off = block * stride_k_blk + slot * stride_k_tok + k_head_off
            v_off = block * stride_v_blk + slot * stride_v_tok + v_head_off
            k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if PROLOGUE and (newest >= tile_start) & (newest < tile_start + BLOCK_N):
                # The cache's copy of the newest row is not written yet.
                new = tok == newest
                k_new, v_new = _newest_kv(new, kn_row, vn_row, k_dst, v_dst, cos, sin, kw,
                                          kw_p, eps, QK_NORM, HEAD_DIM)  # fmt: skip
                k = tl.where(new[:, None], k_new, k)
                v = tl.where(new[:, None], v_new, v)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(t_mask[None, :], s, float("-inf"))
            # Every tile holds at least one token < end, so m_new is finite from the first on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    has_keys = l_i > 0.0  # false only for an empty split (or a padded seq_len = 0 row)
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        out_off = row * stride_o_tok + heads[:, None] * stride_o_head + d[None, :]
        tl.store(
            out_ptr + out_off,
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        # part_* region map: [seq, head, split] rows of HEAD_DIM floats.
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
        tl.store(
            part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
            o,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit  # type: ignore[untyped-decorator]
def _decode_merge_kernel(  # type: ignore[no-untyped-def]
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    rows_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if USE_PDL:  # the partials are the split kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.load(rows_ptr + seq).to(tl.int64) if HAS_ROWS else seq.to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    sp_mask = sp < num_splits
    d_mask = d < HEAD_DIM
    part = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + sp
    lse = tl.load(part_lse_ptr + part, mask=sp_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights 0, output 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    po = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=sp_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    o = tl.sum(po * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    out_off = row * stride_o_tok + head * stride_o_head + d
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    preload: bool = False,
    prologue: DecodePrologue | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    q: [num_tokens, num_heads, head_dim]. Without `rows`, row b of q is sequence b (num_tokens ==
    num_seqs, the CUDA-graph shape); with `rows` ([num_seqs] int), sequence b's query is q[rows[b]]
    and its output goes to out[rows[b]], other rows of `out` untouched. block_tables:
    [num_seqs, max_blocks] int32/int64; seq_lens: [num_seqs] int32 (context incl. the new token;
    0 marks a padding row, whose output is 0). Returns out ([num_tokens, num_heads, head_dim]).

    preload: the caller promises that seq_lens, block_tables and every cached token but each
    sequence's newest were written before the step's first kernel (a CUDA graph's input
    buffers, filled by copies ahead of the replay). Under PDL a short context's K/V tile is
    then read before gdc_wait, while the previous kernel (the one writing the newest token)
    still runs; only the newest token's row waits for it. Results are the same either way.

    prologue: q and prologue.k are this step's projections before the head norms and RoPE, and
    the newest K/V are not in the cache yet: the kernel does the attention prologue itself
    (DecodePrologue), one launch fewer per layer. With preload, the positions and slots count
    among the buffers written before the step's first kernel, so they are read early too.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert k_cache.shape[3] == head_dim, (k_cache.shape, q.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert block_size & (block_size - 1) == 0, block_size
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1, block_tables.stride()
    assert block_tables.dtype in (torch.int32, torch.int64), block_tables.dtype
    assert seq_lens.shape == (num_seqs,) and seq_lens.is_contiguous(), seq_lens.shape
    if rows is None:
        assert num_tokens == num_seqs, (num_tokens, num_seqs)
    else:
        assert rows.shape == (num_seqs,) and rows.is_contiguous(), rows.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    assert num_splits >= 1, num_splits
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    if direct:  # stage 1 writes `out`; the partial buffers are not touched
        part_out = part_lse = out
    else:
        part_out = q.new_empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32)
        part_lse = q.new_empty(num_seqs, num_heads, num_splits, dtype=torch.float32)
    rows_arg = seq_lens if rows is None else rows  # never read without HAS_ROWS
    if prologue is not None:
        _check_prologue(prologue, q, k_cache, rows)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        block_tables,
        seq_lens,
        rows_arg,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        *_prologue_args(prologue, q, seq_lens),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        HAS_ROWS=rows is not None,
        DIRECT=direct,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PRELOAD=preload,
        PROLOGUE=prologue is not None,
        QK_NORM=prologue is not None and prologue.q_norm_weight is not None,
        USE_PDL=pdl.enabled(),
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch_kwargs(),
    )
    if not direct:
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            rows_arg,
            num_splits,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HAS_ROWS=rows is not None,
            USE_PDL=pdl.enabled(),
            num_warps=4,
            **pdl.launch_kwargs(),
        )
    return out


__all__ = ["DecodePrologue", "choose_num_splits", "num_sms_of", "paged_decode_attention"]

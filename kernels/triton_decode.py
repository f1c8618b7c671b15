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

Each token's K/V row is found through the block table (`block_tables[seq, tok // BLOCK_SIZE]`,
offset `tok % BLOCK_SIZE`), so any power-of-two block size works, smaller or larger than BLOCK_N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels import pdl

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256
"""A split shorter than this spends more on its partial write and merge than it saves."""
MAX_SPLITS = 64
CTAS_PER_SM = 4
"""Target programs per SM: enough loads in flight to cover HBM latency with 4 warps each."""


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
    if USE_PDL:  # without PRELOAD, seq_lens and tables may come from the previous kernel
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not PRELOAD:
        seq_len = tl.load(seq_lens_ptr + seq)
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    row = tl.load(rows_ptr + seq).to(tl.int64) if HAS_ROWS else seq.to(tl.int64)

    # Rows of the q tile are the group's query heads, padded to GROUP_PAD >= 16 for tl.dot;
    # padded rows load zeros and are never stored.
    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
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


__all__ = ["choose_num_splits", "num_sms_of", "paged_decode_attention"]

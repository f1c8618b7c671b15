"""Prefill / extend attention in Triton over paged KV: ragged batch, cached prefix, causal.

Grid (num_tiles, num_heads). The new tokens of every prefill sequence are cut into query tiles
of BLOCK_M rows; tile t belongs to sequence tile_seq[t] and starts at its new-token index
tile_q_start[t] (both built on the host once per step, see triton_attention.plan_attention).
Each tile's queries sit at the end of the sequence's context (bottom-right aligned):

    key position  0 ...................... first_pos .......... seq_len
                  | cached prefix + earlier new tokens | diagonal |
                  |<- full tiles: no mask ------------>|<- causal mask: k <= q_pos ->|

where first_pos = seq_len - q_len + tile_q_start is the position of the tile's first query.
Keys below first_pos + 1 are visible to every row of the tile, so whole BLOCK_N tiles there skip
the mask; the rest (at most ceil(BLOCK_M / BLOCK_N) + 1 tiles) are masked. The new tokens' K/V
are already in the paged cache (written by the KV-write step), so all keys come through the
block table, exactly as in the plain-torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit  # type: ignore[untyped-decorator]
def _attend(  # type: ignore[no-untyped-def]
    q,
    m_i,
    l_i,
    acc,
    k_ptr,
    v_ptr,
    table,
    kv_start,
    kv_end,
    q_pos,
    qk_scale,
    kv_head,
    stride_k_blk,
    stride_k_tok,
    stride_k_head,
    stride_v_blk,
    stride_v_tok,
    stride_v_head,
    d,
    d_mask,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with keys [kv_start, kv_end), paged."""
    for tile_start in range(kv_start, kv_end, BLOCK_N):
        tok = tile_start + tl.arange(0, BLOCK_N)
        t_mask = tok < kv_end
        block = tl.load(table + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k_off = block * stride_k_blk + slot * stride_k_tok + kv_head * stride_k_head
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL_MASK:
            visible = (tok[None, :] <= q_pos[:, None]) & t_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        # Every row sees key 0 in the first tile it processes, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block * stride_v_blk + slot * stride_v_tok + kv_head * stride_v_head
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit  # type: ignore[untyped-decorator]
def _prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    tile_seq_ptr,
    tile_q_start_ptr,
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    q_start = tl.load(tile_q_start_ptr + tile)
    row_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - row_begin
    seq_len = tl.load(seq_lens_ptr + seq)

    m = q_start + tl.arange(0, BLOCK_M)  # new-token index within the sequence
    m_mask = m < q_len
    q_pos = seq_len - q_len + m  # rows past q_len get positions >= seq_len: masked, not stored
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    io_mask = m_mask[:, None] & d_mask[None, :]
    rows = (row_begin + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
        mask=io_mask,
        other=0.0,
    )

    first_pos = seq_len - q_len + q_start
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    m_i, l_i, acc = _attend(
        q, m_i, l_i, acc, k_ptr, v_ptr, table, 0, full_end, q_pos, qk_scale, kv_head,
        stride_k_blk, stride_k_tok, stride_k_head, stride_v_blk, stride_v_tok, stride_v_head,
        d, d_mask, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
    )  # fmt: skip
    m_i, l_i, acc = _attend(
        q, m_i, l_i, acc, k_ptr, v_ptr, table, full_end, kv_end, q_pos, qk_scale, kv_head,
        stride_k_blk, stride_k_tok, stride_k_head, stride_v_blk, stride_v_tok, stride_v_head,
        d, d_mask, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
    )  # fmt: skip
    o = acc / l_i[:, None]
    out_off = rows[:, None] * stride_o_tok + head * stride_o_head + d[None, :]
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_q_start: torch.Tensor,
    scale: float,
    block_m: int,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of the query tiles named by (tile_seq, tile_q_start) over paged KV.

    q: [num_tokens, num_heads, head_dim] packed; sequence s owns rows
    query_start_loc[s]:query_start_loc[s + 1] and has seq_lens[s] tokens of context after this
    step. tile_seq / tile_q_start ([num_tiles] int32) list the BLOCK_M-row tiles to compute, built
    with the same block_m. Rows not covered by any tile are left untouched in `out`.
    """
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    num_tiles = tile_seq.shape[0]
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert k_cache.shape[3] == head_dim, (k_cache.shape, q.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert block_size & (block_size - 1) == 0, block_size
    assert block_m >= 16 and block_m & (block_m - 1) == 0, block_m
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1, block_tables.stride()
    assert seq_lens.shape == (num_seqs,) and seq_lens.is_contiguous(), seq_lens.shape
    assert query_start_loc.shape == (num_seqs + 1,), query_start_loc.shape
    assert tile_q_start.shape == (num_tiles,), (tile_q_start.shape, num_tiles)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    if num_tiles == 0:
        return out
    _prefill_kernel[(num_tiles, num_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        tile_seq,
        tile_q_start,
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
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

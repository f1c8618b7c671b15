"""Plain-torch paged attention: the CPU path and the reference every GPU kernel is tested against.

KV cache layout (one layer): k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token's slot is `block_id * block_size + offset`; a sequence's blocks are listed, in
order, in its row of `block_tables`.

Ragged batch layout: the new tokens of all sequences are packed along dim 0 of `q`
([num_tokens, num_heads, head_dim]); sequence s owns rows query_start_loc[s]:query_start_loc[s+1].
Its context after this step is seq_lens[s] tokens (cached + new), so its new tokens sit at
positions seq_lens[s] - query_len .. seq_lens[s] - 1 and attend causally to everything before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) into their cache slots."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,), slot_mapping.shape
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:seq_len]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV.

    q: [num_tokens, num_heads, head_dim]; returns the same shape. The new tokens' K/V must already
    be written to the cache (write_kv_cache). Decode-only sequences (one new token) are batched
    into one padded SDPA call; each prefill chunk gets its own call with an offset causal mask.
    """
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert len(query_start_loc) == len(seq_lens) + 1, (len(query_start_loc), len(seq_lens))
    assert query_start_loc[-1] == num_tokens, (query_start_loc[-1], num_tokens)
    assert block_tables.shape[0] == len(seq_lens), (block_tables.shape, len(seq_lens))
    out = torch.empty_like(q)
    decode_seqs = [
        s for s in range(len(seq_lens)) if query_start_loc[s + 1] - query_start_loc[s] == 1
    ]
    if decode_seqs:
        _decode_batch(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, decode_seqs, out
        )
    decode_set = set(decode_seqs)
    for s, seq_len in enumerate(seq_lens):
        if s in decode_set:
            continue
        start, end = query_start_loc[s], query_start_loc[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[s], seq_len)
        v = gather_kv(v_cache, block_tables[s], seq_len)
        # [1, heads, q_len, dim] x [1, kv_heads, seq_len, dim]
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks = k.transpose(0, 1).unsqueeze(0).to(q.dtype)
        vs = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query i sits at position seq_len - q_len + i (bottom-right aligned causal mask).
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    seqs: list[int],
    out: torch.Tensor,
) -> None:
    """One padded SDPA over all single-token sequences (the common decode step)."""
    block_size = k_cache.shape[1]
    lens = [seq_lens[s] for s in seqs]
    max_blocks = (max(lens) + block_size - 1) // block_size
    rows = torch.tensor([query_start_loc[s] for s in seqs])
    tables = block_tables[seqs, :max_blocks]  # [B, max_blocks]
    # Padding entries of a table may hold any block id: masked out below, never read as valid.
    k = k_cache[tables].flatten(1, 2)  # [B, max_blocks*block_size, kv_heads, dim]
    v = v_cache[tables].flatten(1, 2)
    valid = torch.arange(k.shape[1]).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
    qb = q.index_select(0, rows).unsqueeze(2)  # [B, heads, 1, dim]
    o = F.scaled_dot_product_attention(
        qb,
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    out.index_copy_(0, rows, o.squeeze(2))

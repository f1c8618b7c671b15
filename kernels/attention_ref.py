"""Plain-torch paged attention: the CPU path and the reference every GPU kernel is tested against.

KV cache layout (one layer): k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token's slot is `block_id * block_size + offset`; a sequence's blocks are listed, in
order, in its row of `block_tables`.

Ragged batch layout: the new tokens of all sequences are packed along dim 0 of `q`
([num_tokens, num_heads, head_dim]); sequence s owns rows query_start_loc[s]:query_start_loc[s+1].
Its context after this step is seq_lens[s] tokens (cached + new), so its new tokens sit at
positions seq_lens[s] - query_len .. seq_lens[s] - 1 and attend causally to everything before.

A step's AttentionPlan (built once by plan_attention, shared by every layer) splits the batch
into single-token sequences (decodes: one batched gather + two batched matmuls) and the rest
(prefill chunks: one SDPA call each with a bottom-right-aligned causal mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSeq:
    start: int
    """First row of this sequence's new tokens in the packed batch."""
    end: int
    seq_len: int
    block_ids: torch.Tensor
    """[ceil(seq_len / block_size)] int64: exactly the blocks holding its context."""


@dataclass(frozen=True)
class AttentionPlan:
    decode_rows: torch.Tensor | None
    """[B] int64: packed row of each single-token sequence (None when there are none)."""
    decode_tables: torch.Tensor | None
    """[B, max_blocks] int64: their block tables, cut to the longest context."""
    decode_valid: torch.Tensor | None
    """[B, 1, 1, max_blocks * block_size] bool: which gathered slots hold context."""
    prefills: tuple[PrefillSeq, ...]


def plan_attention(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    block_size: int,
) -> AttentionPlan:
    """Index work shared by all layers of one step (done once, not once per layer)."""
    num_seqs = len(seq_lens)
    assert len(query_start_loc) == num_seqs + 1, (len(query_start_loc), num_seqs)
    assert block_tables.shape[0] == num_seqs, (block_tables.shape, num_seqs)
    decode = [s for s in range(num_seqs) if query_start_loc[s + 1] - query_start_loc[s] == 1]
    decode_set = set(decode)
    prefills = []
    for s in range(num_seqs):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        if s in decode_set or end == start:
            continue
        num_blocks = -(-seq_lens[s] // block_size)
        prefills.append(PrefillSeq(start, end, seq_lens[s], block_tables[s, :num_blocks]))
    if not decode:
        return AttentionPlan(None, None, None, tuple(prefills))
    lens = torch.tensor([seq_lens[s] for s in decode])
    max_blocks = -(-int(lens.max()) // block_size)
    device = block_tables.device
    # Padding entries of a table may name any block: masked out, never read as context.
    tables = block_tables[torch.tensor(decode, device=device), :max_blocks]
    valid = torch.arange(max_blocks * block_size).unsqueeze(0) < lens.unsqueeze(1)
    return AttentionPlan(
        decode_rows=torch.tensor([query_start_loc[s] for s in decode], device=device),
        decode_tables=tables,
        decode_valid=valid[:, None, None, :].to(device),
        prefills=tuple(prefills),
    )


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


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV.

    q: [num_tokens, num_heads, head_dim]; returns the same shape. The new tokens' K/V must already
    be in the cache (write_kv_cache).
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        _decode(q, k_cache, v_cache, plan, scale, out)
    for p in plan.prefills:
        q_len = p.end - p.start
        k = k_cache.index_select(0, p.block_ids).flatten(0, 1)[: p.seq_len]
        v = v_cache.index_select(0, p.block_ids).flatten(0, 1)[: p.seq_len]
        # [1, heads, q_len, dim] x [1, kv_heads, seq_len, dim]
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)
        ks = k.transpose(0, 1).unsqueeze(0).to(q.dtype)
        vs = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        if q_len == p.seq_len:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query i sits at position seq_len - q_len + i (bottom-right aligned causal mask).
            q_pos = torch.arange(p.seq_len - q_len, p.seq_len).unsqueeze(1)
            mask = (torch.arange(p.seq_len).unsqueeze(0) <= q_pos).to(q.device)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[p.start : p.end] = o.squeeze(0).transpose(0, 1)
    return out


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    out: torch.Tensor,
) -> None:
    """All single-token sequences at once: gather their blocks, two batched matmuls.

    CPU flash-SDPA costs ~0.6 ms per call for one query token; plain bmm costs a fraction.
    The matmuls run in the cache dtype (accumulating in float32); softmax runs in float32.
    """
    assert plan.decode_rows is not None and plan.decode_tables is not None
    assert plan.decode_valid is not None
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    rows = plan.decode_rows
    batch = rows.shape[0]
    group = q.shape[1] // num_kv_heads
    # [B, max_blocks, block_size, kv_heads, dim] → [B, kv_heads, ctx, dim]
    # index_select over flat block ids is several times cheaper than advanced indexing here.
    flat = plan.decode_tables.flatten()
    k = k_cache.index_select(0, flat).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    qb = q.index_select(0, rows).to(k.dtype).view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(qb, k.transpose(2, 3)).float() * scale  # [B, kv_heads, group, ctx]
    scores.masked_fill_(~plan.decode_valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.matmul(probs, v).view(batch, num_kv_heads * group, head_dim)
    out.index_copy_(0, rows, o.to(out.dtype))

"""Triton paged attention for a mixed batch: the GPU counterpart of attention_ref.

Same contract as attention_ref.paged_attention: q is the packed ragged batch [num_tokens,
num_heads, head_dim]; sequence s owns rows query_start_loc[s]:query_start_loc[s + 1] and has
seq_lens[s] tokens of context after this step, its new tokens last (causal, bottom-right
aligned); the new tokens' K/V are already in the paged cache (attention_ref.write_kv_cache).

plan_attention builds a step's TritonAttentionMetadata once (host lists -> one int32 tensor, one
host-to-device copy); every layer then calls triton_paged_attention with it, which launches
  - single-token sequences -> triton_decode.paged_decode_attention (split-KV, GQA-grouped),
  - longer ones           -> triton_prefill.paged_prefill_attention (query tiles x heads).
A pure-decode step in batch order keeps the caller's block_tables and needs no row map, so a
CUDA graph can call paged_decode_attention on fixed buffers (block_tables, seq_lens) directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.kernels.triton_decode import choose_num_splits, num_sms_of, paged_decode_attention
from baton.kernels.triton_prefill import paged_prefill_attention

__all__ = [
    "TritonAttentionMetadata",
    "choose_num_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
    "plan_attention",
    "plan_decode",
    "triton_paged_attention",
]


@dataclass(frozen=True)
class TritonAttentionMetadata:
    """One step's device-side index tensors, shared by every layer (all int32 unless noted)."""

    num_tokens: int
    """Rows of the packed batch (q.shape[0])."""
    block_size: int
    """Tokens per KV block; must match the cache passed at call time."""
    num_decodes: int
    """Single-token sequences handled by the decode kernel."""
    num_splits: int
    """KV slices per decode sequence (choose_num_splits unless the caller fixed it)."""
    decode_rows: torch.Tensor | None
    """[num_decodes]: packed row of each decode query; None when decode b is row b."""
    decode_block_tables: torch.Tensor
    """[num_decodes, max_blocks] (int64 or int32, as given): the decodes' block tables."""
    decode_seq_lens: torch.Tensor
    """[num_decodes]: their context lengths."""
    prefill_block_m: int
    """Query rows per prefill tile."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks]: all sequences' tables, as given."""
    seq_lens: torch.Tensor
    """[num_seqs]."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1]."""
    tile_seq: torch.Tensor
    """[num_tiles]: sequence of each prefill query tile."""
    tile_q_start: torch.Tensor
    """[num_tiles]: first new-token index (within its sequence) of each tile."""
    static_inputs: bool = False
    """The decode tables, seq_lens and older KV are fixed before the step's first kernel (a
    CUDA graph's buffers): the decode kernel may read them early (paged_decode_attention's
    preload)."""


def plan_attention(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    block_size: int,
    num_kv_heads: int,
    num_splits: int | None = None,
    prefill_block_m: int = 64,
    num_sms: int | None = None,
) -> TritonAttentionMetadata:
    """Index work shared by all layers of one step (host-side, torch ops, one H2D copy).

    block_tables lives on the device the kernels run on. num_splits=None picks it with
    choose_num_splits from the decodes' longest context and the device's SM count.
    """
    num_seqs = len(seq_lens)
    assert len(query_start_loc) == num_seqs + 1, (len(query_start_loc), num_seqs)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, block_tables.shape
    device = block_tables.device
    q_lens = [query_start_loc[s + 1] - query_start_loc[s] for s in range(num_seqs)]
    decode_seqs = [s for s in range(num_seqs) if q_lens[s] == 1]
    tile_seq: list[int] = []
    tile_q_start: list[int] = []
    for s in range(num_seqs):
        if q_lens[s] > 1:
            for start in range(0, q_lens[s], prefill_block_m):
                tile_seq.append(s)
                tile_q_start.append(start)
    decode_rows = [query_start_loc[s] for s in decode_seqs]
    decode_lens = [seq_lens[s] for s in decode_seqs]

    # One int32 host tensor, one copy; region map of `packed` (lengths in brackets):
    #   seq_lens [S] | query_start_loc [S+1] | tile_seq [T] | tile_q_start [T]
    #   | decode_rows [D] | decode_seq_lens [D] | decode_seqs [D]
    parts = [
        seq_lens,
        query_start_loc,
        tile_seq,
        tile_q_start,
        decode_rows,
        decode_lens,
        decode_seqs,
    ]
    packed = torch.tensor([x for part in parts for x in part], dtype=torch.int32).to(device)
    views = torch.split(packed, [len(p) for p in parts])
    seq_lens_t, qsl_t, tile_seq_t, tile_q_start_t, rows_t, dec_lens_t, dec_seqs_t = views

    # A pure-decode batch in order (the usual decode step) reuses the tables and needs no rows.
    in_order = len(decode_seqs) == num_seqs and query_start_loc == list(range(num_seqs + 1))
    decode_tables = block_tables if in_order else block_tables.index_select(0, dec_seqs_t.long())
    if num_splits is None:
        num_splits = choose_num_splits(
            len(decode_seqs),
            num_kv_heads,
            max(decode_lens, default=0),
            num_sms if num_sms is not None else num_sms_of(device),
        )
    return TritonAttentionMetadata(
        num_tokens=query_start_loc[-1],
        block_size=block_size,
        num_decodes=len(decode_seqs),
        num_splits=num_splits,
        decode_rows=None if in_order else rows_t,
        decode_block_tables=decode_tables,
        decode_seq_lens=dec_lens_t,
        prefill_block_m=prefill_block_m,
        block_tables=block_tables,
        seq_lens=seq_lens_t,
        query_start_loc=qsl_t,
        tile_seq=tile_seq_t,
        tile_q_start=tile_q_start_t,
    )


def plan_decode(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    num_splits: int,
    *,
    static_inputs: bool = False,
) -> TritonAttentionMetadata:
    """A pure-decode plan over caller-owned device buffers, with no host data at all.

    Row b of the batch is sequence b: block_tables [B, max_blocks] and seq_lens [B] (int32 or
    int64). Nothing is copied, so a CUDA graph captured with this plan replays on whatever the
    buffers hold at replay time; a padding row has seq_len 0 and gets a zero output.
    static_inputs: the buffers (and the KV of all but each sequence's newest token) are written
    before the forward's first kernel, never by a kernel of the forward (see
    TritonAttentionMetadata.static_inputs).
    """
    num_seqs = seq_lens.shape[0]
    assert block_tables.shape[0] == num_seqs, (block_tables.shape, num_seqs)
    empty = torch.empty(0, dtype=torch.int32, device=seq_lens.device)
    return TritonAttentionMetadata(
        num_tokens=num_seqs,
        block_size=block_size,
        num_decodes=num_seqs,
        num_splits=num_splits,
        decode_rows=None,
        decode_block_tables=block_tables,
        decode_seq_lens=seq_lens,
        prefill_block_m=64,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=empty,
        tile_seq=empty,
        tile_q_start=empty,
        static_inputs=static_inputs,
    )


def triton_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: TritonAttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV (mixed batch).

    q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim], same dtype as q (fp32, fp16 or bf16; accumulation is fp32).
    Returns `out` (allocated when None), the same shape and dtype as q.
    """
    assert q.dim() == 3 and k_cache.dim() == 4, (q.shape, k_cache.shape)
    assert q.shape[0] == meta.num_tokens, (q.shape, meta.num_tokens)
    assert k_cache.shape[1] == meta.block_size, (k_cache.shape, meta.block_size)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert q.device == k_cache.device == v_cache.device == meta.seq_lens.device
    if out is None:
        out = torch.empty_like(q)
    if meta.num_decodes:
        paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            scale,
            meta.num_splits,
            out=out,
            rows=meta.decode_rows,
            preload=meta.static_inputs,
        )
    if meta.tile_seq.shape[0]:
        paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.tile_seq,
            meta.tile_q_start,
            scale,
            meta.prefill_block_m,
            out=out,
        )
    return out

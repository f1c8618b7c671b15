"""The attention layer: writes this step's K/V into the paged cache, then attends over it.

What crosses the runner → model edge for attention is one frozen AttentionMetadata per step;
layers receive it as an argument (never through a global), together with their own layer's
slice of the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from baton.kernels.attention_ref import (
    AttentionPlan,
    paged_attention,
    plan_attention,
    write_kv_cache,
)

if TYPE_CHECKING:  # Triton is not a dependency of the CPU install
    from baton.kernels.triton_decode import DecodePrologue

FOLD_PROLOGUE_MAX_ROWS = 4
"""Decode batches up to this size fold the attention prologue into the decode kernel: on a
Llama-3.1-8B step on an H100 -0.053 ms at 1 row, -0.040 at 4, but +0.16 at 16 (docs/perf.md),
where every split program's own q rotation and larger shared memory cost more than the launch
they save."""


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each sequence attends to.

    Packed layout: sequence s owns token rows query_start_loc[s]:query_start_loc[s+1].
    """

    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot (block_id * block_size + offset) of every new token."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int64: each sequence's block ids in order (padded with 0)."""
    seq_lens: list[int]
    """Per sequence: context length after this step (cached + new tokens)."""
    query_start_loc: list[int]
    """num_seqs + 1 offsets of each sequence's new tokens in the packed batch."""
    block_size: int
    """Tokens per KV block."""
    num_kv_heads: int = 0
    """KV heads per layer (the CUDA kernels' planner needs it; the CPU path does not)."""
    device_plan: Any = None
    """CUDA: a prebuilt plan — TritonAttentionMetadata (e.g. over a CUDA graph's static
    buffers) or, with backend "flashinfer", a FlashInferPlan; None = Triton, planned from the
    lists above on first use."""
    backend: str = "triton"
    """CUDA kernels: "triton" or "flashinfer" (the CPU path ignores it)."""

    @property
    def static_inputs(self) -> bool:
        """Whether slot_mapping, positions and the device plan's tables are buffers filled before
        the step's first kernel (a CUDA graph's), which kernels may read early under PDL."""
        return bool(getattr(self.device_plan, "static_inputs", False))

    @cached_property
    def plan(self) -> AttentionPlan:
        """The kernel's index work for this step: built by the first layer, reused by the rest."""
        return plan_attention(
            self.block_tables, self.seq_lens, self.query_start_loc, self.block_size
        )

    @cached_property
    def triton_plan(self) -> Any:
        """The Triton kernels' device-side index tensors (CUDA), built once per step."""
        if self.device_plan is not None:
            return self.device_plan
        from baton.kernels.triton_attention import plan_attention as plan_triton

        return plan_triton(
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.block_size,
            self.num_kv_heads,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class Attention(nn.Module):
    """Paged multi-head / grouped-query attention over one layer's KV cache.

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """q: [T, heads, head_dim] or [T, heads*head_dim]; k, v likewise with kv_heads (views
        with a token stride are fine) → [T, heads*head_dim]. kv_written: the caller already
        wrote k and v into the cache (a fused prologue kernel)."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if q.is_cuda:
            # One engine, two devices: the CUDA path dispatches to the Triton kernels (imported
            # lazily: Triton is not a dependency of the CPU install).
            from baton.kernels.triton_ops import write_kv_cache as triton_write_kv_cache

            if not kv_written:
                triton_write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            if meta.backend == "flashinfer":
                from baton.kernels.flashinfer_attention import flashinfer_paged_attention

                out = flashinfer_paged_attention(q, k_cache, v_cache, meta.device_plan, self.scale)
            else:
                from baton.kernels.triton_attention import triton_paged_attention

                out = triton_paged_attention(q, k_cache, v_cache, meta.triton_plan, self.scale)
        else:
            if not kv_written:
                write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            out = paged_attention(q, k_cache, v_cache, meta.plan, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def can_fold_prologue(self, meta: AttentionMetadata) -> bool:
        """Whether this CUDA step's decode kernel should do the attention prologue itself
        (forward_folded): Triton backend, a pure decode batch in row order of at most
        FOLD_PROLOGUE_MAX_ROWS sequences, and a power-of-two head_dim."""
        if meta.backend != "triton" or self.head_dim & (self.head_dim - 1):
            return False
        plan = meta.triton_plan
        return bool(
            plan.num_decodes == plan.num_tokens <= FOLD_PROLOGUE_MAX_ROWS
            and plan.decode_rows is None
        )

    def forward_folded(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        prologue: DecodePrologue,
    ) -> torch.Tensor:
        """Decode attention with the prologue folded in (can_fold_prologue must hold): q
        [B, heads, head_dim] and the prologue's k are unrotated, and the step's K/V are not in
        the cache yet (triton_decode.DecodePrologue) → [B, heads*head_dim]."""
        from baton.kernels.triton_decode import paged_decode_attention

        plan = meta.triton_plan
        out = paged_decode_attention(
            q,
            kv_cache[0],
            kv_cache[1],
            plan.decode_block_tables,
            plan.decode_seq_lens,
            self.scale,
            plan.num_splits,
            preload=plan.static_inputs,
            prologue=prologue,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

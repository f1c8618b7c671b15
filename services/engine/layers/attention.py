"""The attention layer: writes this step's K/V into the paged cache, then attends over it.

What crosses the runner → model edge for attention is one frozen AttentionMetadata per step;
layers receive it as an argument (never through a global), together with their own layer's
slice of the KV cache. The metadata carries the engine's attention backend and the plan it
made for this step; the layer calls the backend and never asks which one it is
(services/engine/attention/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic

import torch
from torch import nn

from baton.services.engine.attention.base import AttentionBackend, PlanT
from baton.services.engine.attention.torch_ref import TorchAttentionBackend

if TYPE_CHECKING:  # Triton is not a dependency of the CPU install
    from baton.kernels.triton_decode import DecodePrologue


def _reference_backend() -> AttentionBackend[Any]:
    return TorchAttentionBackend()


@dataclass(frozen=True)
class AttentionMetadata(Generic[PlanT]):
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
    backend: AttentionBackend[PlanT] = field(default_factory=_reference_backend)
    """The engine's attention backend (the torch reference for metadata built by hand)."""
    planned: PlanT | None = None
    """This step's plan, when the caller made it: the runner, once per step, and CUDA graphs
    over their static buffers. None: `plan` makes it from the fields above on first use."""

    @cached_property
    def plan(self) -> PlanT:
        """The backend's plan for this step: made at most once, shared by every layer."""
        if self.planned is not None:
            return self.planned
        return self.backend.plan(
            self.block_tables, self.seq_lens, self.query_start_loc, self.block_size
        )

    @cached_property
    def static_inputs(self) -> bool:
        """Whether slot_mapping, positions and the plan's tables are buffers filled before the
        step's first kernel (a CUDA graph's), which kernels may read early under PDL."""
        return self.backend.static_inputs(self.plan)

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
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        backend = meta.backend
        if not kv_written:
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = backend.forward(q, k_cache, v_cache, meta.plan, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def can_fold_prologue(self, meta: AttentionMetadata) -> bool:
        """Whether this step's decode kernel should do the attention prologue itself
        (forward_folded): the backend's call (attention/triton.py: small pure-decode steps)."""
        return meta.backend.can_fold_prologue(meta.plan)

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
        out = meta.backend.forward_folded(
            q, kv_cache[0], kv_cache[1], meta.plan, self.scale, prologue
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

"""The torch reference backend: kernels/attention_ref in plain torch, the CPU engine's path.

It runs on CUDA too (slowly, eagerly: its plan is host work), as an oracle on the device.
"""

from __future__ import annotations

import torch

from baton.kernels.attention_ref import (
    AttentionPlan,
    paged_attention,
    plan_attention,
    write_kv_cache,
)
from baton.services.engine.attention.base import AttentionBackend, AttentionSpec


class TorchAttentionBackend(AttentionBackend[AttentionPlan]):
    """Decodes as one batched gather and two matmuls, prefills as one SDPA call each
    (attention_ref.plan_attention). Needs no spec: the default of hand-built metadata."""

    name = "torch"
    device_types = ("cpu", "cuda")

    def __init__(
        self, spec: AttentionSpec | None = None, device: torch.device | None = None
    ) -> None:
        """The reference reads every shape from its arguments and keeps nothing: any spec,
        any device, or none."""

    def plan(
        self,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        query_start_loc: list[int],
        block_size: int,
    ) -> AttentionPlan:
        return plan_attention(block_tables, seq_lens, query_start_loc, block_size)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        write_kv_cache(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: AttentionPlan,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, plan, scale)

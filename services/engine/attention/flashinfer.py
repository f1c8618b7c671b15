"""FlashInfer (kernels/flashinfer_attention): a second CUDA backend, eager only.

Its wrappers are re-planned on the host every step, so its steps cannot replay from a CUDA
graph. It owns the float workspace its wrappers are bound to. The K/V write is our Triton
kernel (the cache layout is FlashInfer's "NHD" paged one already).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from baton.kernels.flashinfer_attention import flashinfer_available
from baton.services.engine.attention.base import AttentionBackend, AttentionSpec

if TYPE_CHECKING:
    from baton.kernels.flashinfer_attention import FlashInferPlan

WORKSPACE_BYTES = 128 * 1024**2
"""FlashInfer's recommended float workspace."""


class FlashInferAttentionBackend(AttentionBackend["FlashInferPlan"]):
    """BatchDecode for single-token sequences and BatchPrefill (causal) for the rest, both
    planned once per step on one workspace (flashinfer_attention.plan_flashinfer)."""

    name = "flashinfer"
    device_types = ("cuda",)
    requires = "flashinfer-python"

    @classmethod
    def is_available(cls) -> bool:
        return flashinfer_available()

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        from baton.kernels.flashinfer_attention import flashinfer_paged_attention, plan_flashinfer
        from baton.kernels.triton_ops import write_kv_cache

        self._spec = spec
        # Zeroed before first use and reused by every step; the wrappers are cached by this
        # tensor's identity, so it is made once per engine.
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._plan = plan_flashinfer
        self._attend = flashinfer_paged_attention
        self._write_kv = write_kv_cache

    def plan(
        self,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        query_start_loc: list[int],
        block_size: int,
    ) -> FlashInferPlan:
        """Valid until the next plan (it re-plans the same wrappers): one step at a time."""
        spec = self._spec
        return self._plan(
            block_tables,
            seq_lens,
            query_start_loc,
            block_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            spec.dtype,
            self._workspace,
        )

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        self._write_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: FlashInferPlan,
        scale: float,
    ) -> torch.Tensor:
        return self._attend(q, k_cache, v_cache, plan, scale)

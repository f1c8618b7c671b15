"""Our Triton kernels (kernels/triton_attention): the CUDA default, the backend whose decode
steps replay from CUDA graphs and whose decode kernel can do the attention prologue itself.

The kernels are imported when a backend is constructed, never by importing this module: the
registry reads this class's capabilities on CPU hosts, where Triton must stay unimported.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionSpec

if TYPE_CHECKING:
    from baton.kernels.triton_attention import TritonAttentionMetadata
    from baton.kernels.triton_decode import DecodePrologue

FOLD_PROLOGUE_MAX_ROWS = 4
"""Decode batches up to this size fold the attention prologue into the decode kernel: on a
Llama-3.1-8B step on an H100 -0.053 ms at 1 row, -0.040 at 4, but +0.16 at 16 (docs/perf.md),
where every split program's own q rotation and larger shared memory cost more than the launch
they save."""


class TritonAttentionBackend(AttentionBackend["TritonAttentionMetadata"]):
    """Mixed batches as split-KV decode + tiled prefill launches over one planned set of index
    tensors (one host-to-device copy per step); decode CUDA graphs plan over their buffers."""

    name = "triton"
    device_types = ("cuda",)
    requires = "triton"
    supports_cuda_graphs = True
    folds_prologue = True
    serves_other_devices = True

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("triton") is not None  # without importing it

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        """`device` may be the CPU only under TRITON_INTERPRET=1 (the kernel tests)."""
        from baton.kernels import triton_attention
        from baton.kernels.triton_decode import num_sms_of
        from baton.kernels.triton_ops import write_kv_cache

        self._kernels = triton_attention
        self._num_kv_heads = spec.num_kv_heads
        self._num_sms = num_sms_of(device)
        # The folded decode kernel tiles head_dim whole: a power of two.
        self._head_dim_folds = spec.head_dim & (spec.head_dim - 1) == 0
        # Bound once: the per-layer calls below pay no module lookups.
        self._plan = triton_attention.plan_attention
        self._attend = triton_attention.triton_paged_attention
        self._decode = triton_attention.paged_decode_attention
        self._write_kv = write_kv_cache

    def plan(
        self,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        query_start_loc: list[int],
        block_size: int,
    ) -> TritonAttentionMetadata:
        return self._plan(
            block_tables,
            seq_lens,
            query_start_loc,
            block_size,
            self._num_kv_heads,
            num_sms=self._num_sms,
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
        plan: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return self._attend(q, k_cache, v_cache, plan, scale)

    def static_inputs(self, plan: TritonAttentionMetadata) -> bool:
        return plan.static_inputs

    def plan_static_decode(
        self,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        max_model_len: int,
    ) -> TritonAttentionMetadata:
        """A fixed split-KV count for the bucket, chosen for max_model_len: a split that starts
        past a sequence's end costs one near-empty program, so short contexts lose little."""
        batch = block_tables.shape[0]
        splits = self._kernels.choose_num_splits(
            batch, self._num_kv_heads, max_model_len, self._num_sms
        )
        # Looked up at call time: bench/ablation.py swaps plan_decode to time the non-static path.
        return self._kernels.plan_decode(
            block_tables, seq_lens, block_size, splits, static_inputs=True
        )

    def can_fold_prologue(self, plan: TritonAttentionMetadata) -> bool:
        """A pure decode batch in row order of at most FOLD_PROLOGUE_MAX_ROWS sequences, and a
        power-of-two head_dim."""
        return (
            self._head_dim_folds
            and plan.num_decodes == plan.num_tokens <= FOLD_PROLOGUE_MAX_ROWS
            and plan.decode_rows is None
        )

    def forward_folded(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: TritonAttentionMetadata,
        scale: float,
        prologue: DecodePrologue,
    ) -> torch.Tensor:
        return self._decode(
            q,
            k_cache,
            v_cache,
            plan.decode_block_tables,
            plan.decode_seq_lens,
            scale,
            plan.num_splits,
            preload=plan.static_inputs,
            prologue=prologue,
        )

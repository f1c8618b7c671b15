"""What every model family provides: an architecture config and the CausalLM contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from baton.services.engine.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling ("llama3"); rope_type "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArchConfig:
    """The shape of a decoder-only transformer, independent of where its weights come from."""

    architecture: str = "llama"
    """Family key in the model registry: "llama", "qwen2" or "qwen3"."""
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each head of q and k before RoPE (Qwen3)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over packed ragged batches and a paged KV cache.

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; layer i uses
    kv_cache[i]. forward() must write every new token's K/V into its slot (meta.slot_mapping).
    """

    config: ModelArchConfig

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens] int64 → final hidden states [num_tokens, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] (only the rows that need sampling) → float32 logits [n, vocab]."""

    def pack_for_cpu(self) -> None:
        """Re-lay weights for the CPU matmul kernels after loading (no-op by default)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in HF checkpoints (model.layers.0.self_attn.q_proj.weight)."""

"""Engine configuration: small frozen dataclasses, composed; each component gets only its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from baton.services.config_cli import CHOICES, from_flat
from baton.services.engine.attention.registry import backend_choices, supports_cuda_graphs
from baton.services.engine.dtypes import CHOICES as DTYPE_CHOICES

SCHEDULING_POLICIES = ("fcfs", "priority")
ATTENTION_BACKENDS = backend_choices()
"""The attention backends (`--attention-backend` choices and the check in EngineConfig), as the
attention registry names them: "auto" and every registered backend."""


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block (the unit of allocation, prefix caching and transfer)."""
    num_blocks: int | None = None
    """Blocks in the pool; None sizes the pool from kv_cache_memory_bytes."""
    kv_cache_memory_bytes: int | None = None
    """Memory for the KV pool when num_blocks is None; None = 512 MiB on CPU, and on CUDA what
    gpu_memory_utilization leaves after the weights and a reserve for activations."""
    gpu_memory_utilization: float = 0.9
    """CUDA: fraction of the device's memory this engine may use in all (weights, KV, graphs)."""
    enable_prefix_caching: bool = True
    """Reuse computed blocks across requests by their chained block hash."""
    cache_salt: str = ""
    """Default tenant salt mixed into every block key."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and policy."""

    max_num_seqs: int = 64
    """At most this many requests run at once."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (prefill chunks + decodes)."""
    max_prefill_chunk: int | None = None
    """Cap on one request's prefill tokens per step (chunked prefill); None = budget only."""
    policy: str = field(default="fcfs", metadata={CHOICES: SCHEDULING_POLICIES})
    """"fcfs" or "priority" (lower value first; ties by arrival)."""

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError("max_prefill_chunk must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs."""

    model: str = "smollm2"
    """"smollm2" (the embedded default), a .gguf path, an HF folder, or "dummy:<config.json>"."""
    dtype: str = field(default="auto", metadata={CHOICES: DTYPE_CHOICES})
    """Weights, activations and KV: "auto" (bf16 where native, else float32), "float32",
    "bfloat16" or "float16"."""
    device: str = "cpu"
    """"cpu", "cuda", "cuda:N", or "auto" (CUDA when present)."""
    seed: int = 0
    """Seed for random weights (dummy models) and unseeded sampling."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's context length."""
    attention_backend: str = field(default="triton", metadata={CHOICES: ATTENTION_BACKENDS})
    """Attention kernels: "triton" (ours; decode runs from CUDA graphs), "flashinfer"
    (flashinfer-python when installed; runs eagerly), "torch" (the reference, eager) or "auto";
    on CPU "triton" and "auto" are the torch reference."""
    enforce_eager: bool = False
    """CUDA: run every step eagerly, capturing no CUDA graphs."""
    cuda_graph_max_batch: int | None = None
    """Largest decode batch replayed from a CUDA graph; None = scheduler.max_num_seqs."""
    async_scheduling: bool | None = None
    """Schedule and launch step N+1 while step N runs (outputs trail by one step); None = on
    for CUDA, off on CPU (where the forward runs on the host thread: nothing to overlap)."""
    pdl: bool | None = None
    """CUDA: launch Triton kernels with programmatic dependent launch; None = where supported
    (Hopper and later)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            known = ", ".join(ATTENTION_BACKENDS)
            backend = self.attention_backend
            raise ValueError(f"attention_backend must be one of {known}, got {backend!r}")
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if self.async_scheduling is None:
            object.__setattr__(self, "async_scheduling", self.device.startswith("cuda"))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """From the fields of EngineConfig, CacheConfig and SchedulerConfig by their own names
        (`block_size=32, max_num_seqs=8`); TypeError naming any unknown key."""
        return from_flat(cls, kwargs)

    @property
    def graph_max_batch(self) -> int:
        """Decode CUDA graphs to capture up to this batch (0: none, e.g. on CPU or eager)."""
        if self.enforce_eager or not self.device.startswith("cuda"):
            return 0
        if not supports_cuda_graphs(self.attention_backend):  # e.g. flashinfer: runs eagerly
            return 0
        limit = self.cuda_graph_max_batch
        return self.scheduler.max_num_seqs if limit is None else limit

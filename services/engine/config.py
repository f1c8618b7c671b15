"""Engine configuration: small frozen dataclasses, composed; each component gets only its own."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block (the unit of allocation, prefix caching and transfer)."""
    num_blocks: int | None = None
    """Blocks in the pool; None sizes the pool from kv_cache_memory_bytes."""
    kv_cache_memory_bytes: int = 512 * 1024**2
    """Memory for the KV pool when num_blocks is None."""
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
    policy: str = "fcfs"
    """"fcfs" or "priority" (lower value first; ties by arrival)."""

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
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
    dtype: str = "auto"
    """Weights, activations and KV: "auto" (bf16 where native, else float32), "float32",
    "bfloat16" or "float16"."""
    device: str = "cpu"
    seed: int = 0
    """Seed for random weights (dummy models) and unseeded sampling."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's context length."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

"""What the GPU benches share: the engine they build, the device's limits, decode drivers.

Everything here goes through the engine's public face (LLMEngine, EngineCore); a bench that
needs more asks the face for it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from baton.services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.sampling_params import SamplingParams

GiB = 1024**3
DECODE_CONTEXT = 1024
"""Prompt tokens of every decode measurement."""


def cuda_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn over iters runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    n = 2 * GiB // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    ms = cuda_ms(copy, iters=20)
    return 2 * n * 2 / (ms / 1e3)


def build_engine(model: str, max_num_seqs: int, max_len: int, **options: Any) -> LLMEngine:
    """A bf16 CUDA engine on random weights from a bundled config (dummy:<model>), no prefix
    cache. options: EngineConfig fields (async_scheduling, pdl) for the variants."""
    config = EngineConfig(
        model=f"dummy:{model}",
        dtype="bfloat16",
        device="cuda",
        max_model_len=max_len,
        cache=CacheConfig(block_size=16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192),
        **options,
    )
    return LLMEngine.from_config(config)


def weight_bytes_per_step(engine: LLMEngine) -> int:
    """Bytes a decode step must read: every parameter but the embedding table (one row)."""
    model = engine.core.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.get_parameter("model.embed_tokens.weight")
    tied = engine.arch.tie_word_embeddings
    return total if tied else total - table.numel() * table.element_size()


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes of KV one token of context holds: the KV tensor over its token slots."""
    kv, core = engine.core.kv_cache(), engine.core
    return int(kv.numel() * kv.element_size()) // (core.num_blocks * core.block_size)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (batch, length), generator=g).tolist()


def out_dir() -> Path:
    """Where a bench writes its JSON: $OUT (the device machine's return folder), else
    bench_out/."""
    path = Path(os.environ.get("OUT") or "bench_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


class DecodeDriver:
    """Submits a batch of prompts to an LLMEngine and steps it, counting the tokens the first
    request has produced: with the prompt the bench submitted, that is the context every decode
    step reads (all prompts have one length)."""

    def __init__(self, engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
        assert len({len(p) for p in prompts}) == 1, "one prompt length"
        self.engine = engine
        self.request_ids = [engine.add_request(p, params) for p in prompts]
        self.prompt_len = len(prompts[0])
        self.num_output_tokens = 0

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_output_tokens

    def step(self) -> None:
        for out in self.engine.step():
            if out.request_id == self.request_ids[0]:
                self.num_output_tokens = len(out.outputs[0].token_ids)

    def step_until_decoding(self) -> None:
        """Step until every request runs and has computed its prompt."""
        batch = len(self.request_ids)
        while True:
            stats = self.engine.core.stats()
            if stats.num_running == batch and stats.num_decoding == batch:
                return
            self.step()

    def abort(self) -> None:
        """Abort every request and step until the engine is idle (async scheduling may hold
        one launched step)."""
        self.engine.abort_request(self.request_ids)
        while self.engine.core.has_unfinished():
            self.engine.core.step()

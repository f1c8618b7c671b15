"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed on static buffers.

A decode step of an 8B model launches ~500 kernels; launched one by one from Python they cost
more host time than the GPU spends on them at small batch. Each bucket's graph holds the whole
forward plus the LM head, captured once at start-up. A step copies its inputs into the static
buffers (two host-to-device copies), pads the batch to its bucket, replays, and hands the logits
to the sampler, which runs eagerly (its work depends on the requests' sampling parameters).

Static buffers (all on the device, shared by every bucket; a bucket b uses the first b rows),
filled from pinned host copies without a stream sync:
    ints    [4, max_batch] int64: input_ids | positions | slot_mapping | seq_lens
    tables  [max_batch, max_blocks_per_seq] int32: block tables (columns past a row's length
            are stale, never read: the kernels stop at seq_len)
Padding rows: token 0 at position 0, slot -1 (the KV write skips it), seq_len 0 (attention
returns zeros); their logits are computed and ignored.

Attention inside a graph runs on a plan the backend makes over the static buffers
(AttentionBackend.plan_static_decode: Triton's uses a fixed split-KV count per bucket, chosen
for max_model_len). Buckets are captured largest first into one memory pool, so they share its
memory.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionSpec
from baton.services.engine.attention.registry import create_backend, default_backend
from baton.services.engine.layers.attention import AttentionMetadata
from baton.services.engine.models.base import CausalLM

logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 512)


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to capture: the standard ladder up to max_batch, plus max_batch itself."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    ladder = [b for b in _BUCKETS if b < max_batch]
    return (*ladder, max_batch)


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step's host-side inputs: one token per sequence, every sequence samples."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


class DecodeGraphs:
    """Captured decode forwards for every bucket; `run` replays the smallest that fits."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        *,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        backend: AttentionBackend | None = None,
    ) -> None:
        """backend: the engine's attention backend (supports_cuda_graphs); None makes CUDA's
        default one for this model and cache."""
        device = kv_cache.device
        assert device.type == "cuda", device
        if backend is None:
            cfg = model.config
            spec = AttentionSpec(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_cache.dtype)
            backend = create_backend(default_backend(device.type), spec, device)
        assert backend.supports_cuda_graphs, backend.name
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self._ints = torch.zeros(4, self.max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(
            self.max_batch, self.max_blocks, dtype=torch.int32, device=device
        )
        # Pinned staging, two of each: a step's copies may still be queued behind the step
        # before it when the host fills the next step's (async scheduling keeps one in flight).
        self._host_ints = [
            torch.zeros(4, self.max_batch, dtype=torch.int64, pin_memory=True) for _ in range(2)
        ]
        self._host_tables = [
            torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, pin_memory=True)
            for _ in range(2)
        ]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._metas: dict[int, AttentionMetadata] = {}
        self.num_replays = 0
        """Decode steps served from a graph (a counter for tests and metrics)."""
        for b in self.buckets:
            # The tables and seq_lens are copied in before each replay: static for the graph.
            tables, seq_lens = self._tables[:b], self._ints[3, :b]
            self._metas[b] = AttentionMetadata(
                slot_mapping=self._ints[2, :b],
                block_tables=tables,
                seq_lens=[],
                query_start_loc=[],
                block_size=block_size,
                backend=backend,
                planned=backend.plan_static_decode(tables, seq_lens, block_size, max_model_len),
            )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one shared memory pool."""
        start = time.perf_counter()
        self._ints.zero_()
        self._ints[2].fill_(-1)  # warm-up runs for real: write no KV anywhere
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            self._forward(b)  # compiles Triton kernels and settles cuBLAS before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[b] = self._forward(b)
            self._graphs[b] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s",
            len(self.buckets),
            self.buckets[0],
            self.max_batch,
            time.perf_counter() - start,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        ids, positions = self._ints[0, :bucket], self._ints[1, :bucket]
        hidden = self.model(ids, positions, self.kv_cache, self._metas[bucket])
        return self.model.compute_logits(hidden)

    def bucket_for(self, batch: int) -> int | None:
        """The smallest captured bucket holding `batch` sequences; None when none does."""
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def replay(self, bucket: int) -> None:
        """Replay a bucket on whatever its buffers hold (benchmarks time the graph alone)."""
        self._graphs[bucket].replay()

    def fits(self, batch: DecodeBatch) -> bool:
        return self.bucket_for(len(batch.input_ids)) is not None

    def run(
        self, batch: DecodeBatch, carry: Callable[[torch.Tensor], object] | None = None
    ) -> torch.Tensor:
        """Replay the bucket for this batch; returns its logits [batch, vocab] (fp32).

        `carry`, if given, writes input ids that live on the device (the previous step's
        samples) into the input-id buffer after the host's copy. The returned tensor is the
        graph's output buffer: read it before the next run.
        """
        n = len(batch.input_ids)
        bucket = self.bucket_for(n)
        assert bucket is not None and self._graphs, (n, self.max_batch)
        side = self.num_replays % 2
        ints = self._host_ints[side].numpy()
        ints[0, :n] = batch.input_ids
        ints[1, :n] = batch.positions
        ints[2, :n] = batch.slots
        ints[3, :n] = batch.seq_lens
        ints[:, n:bucket] = ((0,), (0,), (-1,), (0,))  # padding rows
        width = max(len(t) for t in batch.block_tables)
        tables = self._host_tables[side].numpy()
        for row, table in enumerate(batch.block_tables):
            tables[row, : len(table)] = table
        self._ints[:, :bucket].copy_(self._host_ints[side][:, :bucket], non_blocking=True)
        self._tables[:n, :width].copy_(self._host_tables[side][:n, :width], non_blocking=True)
        if carry is not None:
            carry(self._ints[0])
        self._graphs[bucket].replay()
        self.num_replays += 1
        return self._logits[bucket][:n]

"""The executor: runs the model for the engine, on one rank or many, behind one call.

EngineCore knows nothing of ranks, devices or runners. It sizes the KV pool through the
executor (`kv_bytes_per_block`, `available_kv_bytes`: the smallest rank decides), calls
`initialize(num_blocks, ...)` once, then every step `execute(SchedulerOutput) -> PendingStep`
(launched, not waited for) and later `collect(PendingStep) -> ModelRunnerOutput`.

Every rank holds its own paged KV tensor; `kv_layouts()` describes each (its shape, dtype and
which KV heads it holds), and is what a KV transport advertises to a peer, rank by rank.
`UniProcExecutor` runs the single rank in this process on today's ModelRunner; executors with
several ranks (processes, Ray actors) implement the same face, each rank running its own
runner and rank 0 returning the sampled tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from baton.kvstore.transports.base import KVCacheSpec
from baton.services.engine.config import CacheConfig, SchedulerConfig
from baton.services.engine.cuda_graphs import DecodeGraphs
from baton.services.engine.kv_connector import KVConnector, KVConnectorOutput
from baton.services.engine.models.base import CausalLM
from baton.services.engine.runner import ModelRunner, PendingStep, kv_bytes_per_block
from baton.services.engine.step_io import ModelRunnerOutput, SchedulerOutput

CPU_DEFAULT_POOL_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class RankKVLayout:
    """One rank's paged KV tensor: what a peer must know to write blocks into it."""

    rank: int
    spec: KVCacheSpec
    """Layout, dtype and shape of the rank's tensor ([layers, 2, blocks, block_size, heads,
    dim]; its heads are this rank's only)."""
    kv_head_start: int
    """First of the model's KV heads this rank holds (tensor parallel shards heads)."""
    num_kv_heads: int

    @property
    def kv_heads(self) -> range:
        return range(self.kv_head_start, self.kv_head_start + self.num_kv_heads)


@dataclass(frozen=True)
class RunnerOptions:
    """What every rank's runner is built with (EngineConfig resolved for one device)."""

    dtype: torch.dtype
    device: torch.device
    graph_max_batch: int = 0
    """Capture decode CUDA graphs up to this batch (0: none)."""
    attention_backend: str = "triton"
    pdl: bool | None = None


class Executor(ABC):
    """Runs steps on the model's ranks; see the module docstring for the call order."""

    @property
    @abstractmethod
    def num_ranks(self) -> int: ...

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes on the most loaded rank."""

    @abstractmethod
    def available_kv_bytes(self, cache: CacheConfig, scheduler: SchedulerConfig) -> int:
        """KV pool bytes per rank when the config names no size (the smallest rank's)."""

    @abstractmethod
    def initialize(
        self, num_blocks: int, block_size: int, max_model_len: int, connector: KVConnector | None
    ) -> None:
        """Allocate every rank's KV pool, capture graphs, register the pools with the
        connector's worker side. Once, before the first step."""

    @abstractmethod
    def execute(self, scheduled: SchedulerOutput) -> PendingStep | None:
        """Start the connector's loads, launch the step on every rank; None when nothing was
        scheduled. Does not wait for the device."""

    @abstractmethod
    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled tokens (rank 0's)."""

    @abstractmethod
    def finished_transfers(self) -> KVConnectorOutput:
        """The connector's loads and saves that ended, gathered over ranks."""

    @abstractmethod
    def kv_layouts(self) -> tuple[RankKVLayout, ...]:
        """Every rank's KV tensor, in rank order."""

    @abstractmethod
    def kv_cache(self, rank: int = 0) -> torch.Tensor:
        """A rank's KV tensor (ranks of this process only)."""

    # For benchmarks and GPU tests: rank 0's parts.

    @property
    @abstractmethod
    def model(self) -> CausalLM: ...

    @property
    @abstractmethod
    def decode_graphs(self) -> DecodeGraphs | None: ...

    @abstractmethod
    def release_decode_graphs(self) -> None:
        """Drop the captured decode graphs: later steps run eagerly."""

    def shutdown(self) -> None:  # noqa: B027 (optional hook)
        """Stop rank workers; idempotent."""


class UniProcExecutor(Executor):
    """One rank, in this process, on this thread."""

    def __init__(self, model: CausalLM, options: RunnerOptions) -> None:
        self._model = model
        self.options = options
        self._runner: ModelRunner | None = None
        self._connector: KVConnector | None = None

    @property
    def num_ranks(self) -> int:
        return 1

    @property
    def runner(self) -> ModelRunner:
        assert self._runner is not None, "initialize() first"
        return self._runner

    def kv_bytes_per_block(self, block_size: int) -> int:
        return kv_bytes_per_block(self._model.config, block_size, self.options.dtype)

    def available_kv_bytes(self, cache: CacheConfig, scheduler: SchedulerConfig) -> int:
        """512 MiB on CPU; on CUDA, this engine's share of the device (gpu_memory_utilization
        of its memory) minus what this process already holds (weights) and an activation
        reserve, and never more than is free. Several engines on one device each pass their
        own share (baton serve divides it among its workers)."""
        device, dtype = self.options.device, self.options.dtype
        if device.type != "cuda":
            return CPU_DEFAULT_POOL_BYTES
        free, total = torch.cuda.mem_get_info(device)
        arch = self._model.config
        elem = torch.empty((), dtype=dtype).element_size()
        # Peak activations of the largest step (hidden states, qkv, gate_up) plus fp32 logits
        # and the sampler's temporaries for a full decode batch, plus allocator headroom.
        tokens = scheduler.max_num_batched_tokens
        width = 6 * arch.hidden_size + 3 * arch.intermediate_size
        reserve = tokens * width * elem + scheduler.max_num_seqs * arch.vocab_size * 4 * 6
        reserve += 1024**3
        share = int(cache.gpu_memory_utilization * total) - torch.cuda.memory_reserved(device)
        return max(0, min(share, free) - reserve)

    def initialize(
        self, num_blocks: int, block_size: int, max_model_len: int, connector: KVConnector | None
    ) -> None:
        o = self.options
        self._runner = ModelRunner(
            self._model,
            num_blocks,
            block_size,
            o.dtype,
            o.device,
            cuda_graph_max_batch=o.graph_max_batch,
            max_model_len=max_model_len,
            attention_backend=o.attention_backend,
            pdl=o.pdl,
        )
        self._connector = connector
        if connector is not None:
            connector.register_kv_caches(self.kv_layouts(), [self.runner.kv_cache])

    def execute(self, scheduled: SchedulerOutput) -> PendingStep | None:
        connector = self._connector
        if connector is not None:
            connector.start_load_kv(scheduled.kv_connector_metadata)
        pending = self.runner.launch(scheduled)
        if connector is not None:
            connector.wait_for_save()
        return pending

    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        return self.runner.collect(pending)

    def finished_transfers(self) -> KVConnectorOutput:
        if self._connector is None:
            return KVConnectorOutput()
        return self._connector.get_finished()

    def kv_layouts(self) -> tuple[RankKVLayout, ...]:
        kv = self.runner.kv_cache
        arch = self._model.config
        return (RankKVLayout(0, KVCacheSpec.from_tensor(kv), 0, arch.num_kv_heads),)

    def kv_cache(self, rank: int = 0) -> torch.Tensor:
        if rank != 0:
            raise ValueError(f"rank {rank} is not in this process (1 rank)")
        return self.runner.kv_cache

    @property
    def model(self) -> CausalLM:
        return self._model

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        return self.runner.graphs

    def release_decode_graphs(self) -> None:
        self.runner.graphs = None

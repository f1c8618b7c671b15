"""The engine core: owns scheduler, KV cache manager and runner, and runs the step loop."""

from __future__ import annotations

import logging

import torch

from baton.services.engine.config import CacheConfig, SchedulerConfig
from baton.services.engine.kv_cache_manager import KVCacheManager
from baton.services.engine.models.base import CausalLM
from baton.services.engine.outputs import EngineStats
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.runner import ModelRunner, PendingStep, kv_bytes_per_block
from baton.services.engine.scheduler import Scheduler
from baton.services.engine.step_io import EngineCoreOutput, SchedulerOutput

logger = logging.getLogger(__name__)


CPU_DEFAULT_POOL_BYTES = 512 * 1024**2


def _auto_pool_bytes(
    model: CausalLM,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """KV pool size when none is given: 512 MiB on CPU; on CUDA, this engine's share of the
    device (gpu_memory_utilization of its memory) minus what this process already holds
    (weights) and an activation reserve, and never more than is free. Several engines on one
    device each pass their own share (baton serve divides it among its workers)."""
    if device.type != "cuda":
        return CPU_DEFAULT_POOL_BYTES
    free, total = torch.cuda.mem_get_info(device)
    arch = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    # Peak activations of the largest step (hidden states, qkv, gate_up) plus fp32 logits and
    # the sampler's temporaries for a full decode batch, plus headroom for the allocator.
    tokens = scheduler.max_num_batched_tokens
    width = 6 * arch.hidden_size + 3 * arch.intermediate_size
    reserve = tokens * width * elem + scheduler.max_num_seqs * arch.vocab_size * 4 * 6
    reserve += 1024**3
    share = int(cache.gpu_memory_utilization * total) - torch.cuda.memory_reserved(device)
    return max(0, min(share, free) - reserve)


class EngineCore:
    def __init__(
        self,
        model: CausalLM,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        graph_max_batch: int = 0,
        attention_backend: str = "triton",
        async_scheduling: bool = False,
        pdl: bool | None = None,
    ) -> None:
        """graph_max_batch > 0 (CUDA): capture decode CUDA graphs up to that batch size.
        async_scheduling: schedule and launch step N+1 before collecting step N's tokens.
        pdl: launch Triton kernels with programmatic dependent launch (None: where supported)."""
        num_blocks = cache.num_blocks
        if num_blocks is None:
            pool_bytes = cache.kv_cache_memory_bytes
            if pool_bytes is None:
                pool_bytes = _auto_pool_bytes(model, cache, scheduler, dtype, device)
            num_blocks = pool_bytes // kv_bytes_per_block(model.config, cache.block_size, dtype)
            if num_blocks < 1:
                raise ValueError(f"no room for a KV pool ({pool_bytes} bytes available)")
        capacity = num_blocks * cache.block_size
        if max_model_len > capacity:
            logger.warning(
                "max_model_len %d exceeds the KV pool (%d tokens); capping it",
                max_model_len,
                capacity,
            )
            max_model_len = capacity
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler, self.kv, max_model_len)
        self.runner = ModelRunner(
            model,
            num_blocks,
            cache.block_size,
            dtype,
            device,
            cuda_graph_max_batch=min(graph_max_batch, scheduler.max_num_seqs),
            max_model_len=max_model_len,
            attention_backend=attention_backend,
            pdl=pdl,
        )
        self.async_scheduling = async_scheduling
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        """Async scheduling: the launched step whose tokens the next step() collects."""
        self.last_num_scheduled_tokens = 0
        """Tokens the last step launched or collected: 0 means the engine had nothing it
        could run."""

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[Request]:
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> list[EngineCoreOutput]:
        """schedule → launch → collect → update. An empty schedule still tells the runner
        what ended.

        Synchronous: the step's own tokens come back. Async scheduling: this step is launched,
        then the previous one is collected and its tokens come back, so the host's scheduling
        and output work overlaps the GPU's forward (outputs trail by one step; a request that
        stops has computed one token more, which is dropped).
        """
        scheduled = self.scheduler.schedule()
        pending = self.runner.launch(scheduled)
        if not self.async_scheduling:
            self.last_num_scheduled_tokens = scheduled.total_num_scheduled_tokens
            if pending is None:
                return []
            return self.scheduler.update_from_output(scheduled, self.runner.collect(pending))
        previous = self._in_flight
        self._in_flight = None if pending is None else (scheduled, pending)
        self.last_num_scheduled_tokens = scheduled.total_num_scheduled_tokens
        if previous is None:
            return []
        self.last_num_scheduled_tokens += previous[0].total_num_scheduled_tokens
        return self.scheduler.update_from_output(previous[0], self.runner.collect(previous[1]))

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage(),
            num_kv_blocks=self.kv.num_blocks,
            prefix_cache_queries_tokens=self.kv.prefix_queries_tokens,
            prefix_cache_hits_tokens=self.kv.prefix_hits_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_outstanding_tokens=sum(
                r.num_tokens - r.num_computed_tokens + max(r.max_tokens - r.num_output_tokens, 0)
                for r in self.scheduler.requests.values()
            ),
        )

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Block-pool invariants; at idle every block is free or cached and none referenced."""
        self.kv.check_integrity(expect_idle)

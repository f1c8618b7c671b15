"""The engine core: the scheduler, the KV cache manager and an executor, and the step loop.

EngineCore is the engine's only face: services, benchmarks and tests ask it (never its
scheduler, KV manager or runner) for what they need.
"""

from __future__ import annotations

import logging

import torch

from baton.services.engine.config import CacheConfig, SchedulerConfig
from baton.services.engine.cuda_graphs import DecodeGraphs
from baton.services.engine.executor import Executor, RankKVLayout
from baton.services.engine.kv_cache_manager import KVCacheManager
from baton.services.engine.kv_connector import KVConnector
from baton.services.engine.kv_events import (
    CachedBlocks,
    KVEvent,
    KVEventPublisher,
    KVEventsLost,
    StorageTier,
)
from baton.services.engine.models.base import CausalLM
from baton.services.engine.outputs import EngineStats
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.runner import PendingStep
from baton.services.engine.scheduler import Scheduler
from baton.services.engine.step_io import EngineCoreOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_model_len: int,
        *,
        async_scheduling: bool = False,
        kv_connector: KVConnector | None = None,
        worker_id: str = "",
    ) -> None:
        """async_scheduling: schedule and launch step N+1 before collecting step N's tokens.
        kv_connector: loads and saves KV from outside (e.g. a remote prefill); both its roles.
        worker_id: names this engine in its KV events."""
        num_blocks = cache.num_blocks
        if num_blocks is None:
            pool_bytes = cache.kv_cache_memory_bytes
            if pool_bytes is None:
                pool_bytes = executor.available_kv_bytes(cache, scheduler)
            num_blocks = pool_bytes // executor.kv_bytes_per_block(cache.block_size)
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
        self.kv_events = KVEventPublisher(worker_id, StorageTier.DEVICE, cache.block_size)
        """This engine's prefix-cache changes, drained from the pool once per step (bounded)."""
        self.scheduler = Scheduler(scheduler, self.kv, max_model_len, kv_connector)
        self.executor = executor
        executor.initialize(num_blocks, cache.block_size, max_model_len, kv_connector)
        self.async_scheduling = async_scheduling
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        """Async scheduling: the launched step whose tokens the next step() collects."""
        self.last_num_scheduled_tokens = 0
        """Tokens the last step launched or collected: 0 means the engine had nothing it
        could run."""
        self.num_launched_tokens = 0
        """Tokens launched over the engine's life (computed, or dropped when a request ended
        while its step was in flight)."""

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[Request]:
        return self.finish(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests in any state (e.g. on a stop string), freeing what they hold."""
        return self.scheduler.finish_requests(request_ids, status)

    def step(self) -> list[EngineCoreOutput]:
        """transfers → schedule → launch → collect → update. An empty schedule still tells the
        executor what ended and hands the connector its instructions.

        Synchronous: the step's own tokens come back. Async scheduling: this step is launched,
        then the previous one is collected and its tokens come back, so the host's scheduling
        and output work overlaps the GPU's forward (outputs trail by one step; a request that
        stops has computed one token more, which is dropped). First tokens that a connector's
        loads brought (a remote prefill) come back with the step that saw them land.
        """
        outputs = self.scheduler.update_from_connector(self.executor.finished_transfers())
        scheduled = self.scheduler.schedule()
        pending = self.executor.execute(scheduled)
        self.last_num_scheduled_tokens = scheduled.total_num_scheduled_tokens
        self.num_launched_tokens += scheduled.total_num_scheduled_tokens
        done = None if pending is None else (scheduled, pending)
        if self.async_scheduling:  # collect the previous step instead; this one runs on
            done, self._in_flight = self._in_flight, done
            if done is not None:
                self.last_num_scheduled_tokens += done[0].total_num_scheduled_tokens
        if done is not None:
            outputs += self.scheduler.update_from_output(done[0], self.executor.collect(done[1]))
        # Evictions of this schedule and blocks published by this update: one batch per step.
        self._publish_kv_events()
        return outputs

    @property
    def has_step_in_flight(self) -> bool:
        """Async scheduling: a launched step's tokens are not collected yet."""
        return self._in_flight is not None

    def has_unfinished(self) -> bool:
        """Requests to run, a step in flight, or blocks held for a transfer that has not ended."""
        return (
            self.scheduler.num_unfinished > 0
            or self._in_flight is not None
            or self.scheduler.has_pending_transfers
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_decoding=sum(
                r.num_computed_tokens >= r.num_prompt_tokens for r in self.scheduler.running
            ),
            num_waiting=len(self.scheduler.waiting),
            num_loading=len(self.scheduler.loading),
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

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (benchmarks: each run starts cold)."""
        self.kv.reset_prefix_cache()

    # ---- KV events (kv_events.py): what routers learn of this engine's prefix cache ----------

    def kv_events_after(self, event_id: int) -> list[KVEvent]:
        """The KV events published after event_id (0: from the first), oldest first.

        When some of them are no longer held (the ring dropped them unread) it returns every
        event still held: the gap in the ids tells the consumers downstream to resync.
        """
        self._publish_kv_events()
        try:
            return self.kv_events.events_since(event_id)
        except KVEventsLost:
            return self.kv_events.events_since(
                self.kv_events.last_event_id - self.kv_events.num_held
            )

    def cached_block_hashes(self) -> CachedBlocks:
        """Every key findable in the prefix cache, with the id of the last event published:
        taken together, so the keys are what replaying events 1..last_event_id builds."""
        self._publish_kv_events()
        return CachedBlocks(
            self.kv_events.tier, self.kv_events.last_event_id, tuple(self.kv.cached_block_hashes())
        )

    def _publish_kv_events(self) -> None:
        # Between steps only commands (a cache reset, a snapshot request) leave raw events
        # behind; publishing them here makes what a reader sees match the pool now.
        self.kv_events.publish(self.kv.take_events())

    # ---- what the engine runs on -------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def kv_layouts(self) -> tuple[RankKVLayout, ...]:
        """Every rank's KV tensor layout, in rank order (what a KV transport advertises)."""
        return self.executor.kv_layouts()

    def kv_cache(self, rank: int = 0) -> torch.Tensor:
        """A rank's paged KV tensor (ranks of this process only)."""
        return self.executor.kv_cache(rank)

    @property
    def model(self) -> CausalLM:
        """Rank 0's model (benchmarks)."""
        return self.executor.model

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """Rank 0's captured decode CUDA graphs, if any (benchmarks and GPU tests)."""
        return self.executor.decode_graphs

    def release_decode_graphs(self) -> None:
        """Drop the decode graphs: later steps run eagerly (a benchmark captures its own)."""
        self.executor.release_decode_graphs()

    def shutdown(self) -> None:
        self.executor.shutdown()

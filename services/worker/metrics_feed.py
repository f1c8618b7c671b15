"""A worker's Prometheus metrics: per-request observations plus engine state polled twice a second.

Gauges (running, waiting, KV usage) and counters the engine keeps as totals (prefix-cache
queries and hits, preemptions) are read from EngineStats snapshots, so the engine thread never
touches prometheus_client; histograms are observed on the event loop as requests progress.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from prometheus_client import CollectorRegistry

from baton.proto import worker_pb2 as pb
from baton.services.engine.outputs import EngineStats
from baton.services.metrics import Metrics

POLL_S = 0.5


class _StatsSource(Protocol):
    def stats(self) -> EngineStats: ...


class WorkerMetricsFeed:
    def __init__(self, registry: CollectorRegistry, model_id: str, role: str) -> None:
        self.metrics = Metrics(registry, model_id, role)
        self._last: EngineStats | None = None

    # ---- observations from the service (event loop) ------------------------------------------

    def on_first_token(self, ttft: pb.TtftBreakdown, num_prompt_tokens: int) -> None:
        m = self.metrics
        m.request_queue_time.observe(ttft.queue_s)
        m.request_prefill_time.observe(ttft.prefill_s)
        m.prompt_tokens.inc(num_prompt_tokens)
        # The worker's own view of TTFT (from its receipt of the request) and its split.
        m.time_to_first_token.observe(
            ttft.queue_s + ttft.prefill_s + ttft.transfer_s + ttft.first_decode_s
        )
        m.ttft_prefill.observe(ttft.prefill_s)
        m.ttft_transfer.observe(ttft.transfer_s)
        m.ttft_first_decode.observe(ttft.first_decode_s)

    def on_tokens(self, num_tokens: int) -> None:
        self.metrics.generation_tokens.inc(num_tokens)

    def on_transfer(self, num_bytes: int, seconds: float) -> None:
        self.metrics.kv_transfer_bytes.observe(num_bytes)
        self.metrics.kv_transfer_time.observe(seconds)

    # ---- polled engine state -----------------------------------------------------------------

    def update(self, stats: EngineStats) -> None:
        m = self.metrics
        m.num_requests_running.set(stats.num_running)
        m.num_requests_waiting.set(stats.num_waiting)
        m.kv_cache_usage.set(stats.kv_cache_usage)
        last = self._last
        if last is not None:
            m.prefix_cache_queries.inc(
                max(stats.prefix_cache_queries_tokens - last.prefix_cache_queries_tokens, 0)
            )
            m.prefix_cache_hits.inc(
                max(stats.prefix_cache_hits_tokens - last.prefix_cache_hits_tokens, 0)
            )
            m.num_preemptions.inc(max(stats.num_preemptions - last.num_preemptions, 0))
        else:
            m.prefix_cache_queries.inc(stats.prefix_cache_queries_tokens)
            m.prefix_cache_hits.inc(stats.prefix_cache_hits_tokens)
            m.num_preemptions.inc(stats.num_preemptions)
        self._last = stats

    async def run(self, source: _StatsSource) -> None:
        while True:
            self.update(source.stats())
            await asyncio.sleep(POLL_S)

"""The worker's side of KV events on a tiny random-weight engine: what the engine reports as its
cache is what its events build, and the stream says so through a Redis outage."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from baton.proto import worker_pb2 as pb
from baton.router.kv_events_reader import stream_key
from baton.router.prefix_index import PrefixIndex
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.config import CacheConfig, EngineConfig
from baton.services.engine.engine_core import EngineCore
from baton.services.engine.kv_events import (
    DEFAULT_CAPACITY,
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
)
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.redis_server import RedisServer, free_port
from baton.services.worker.kv_event_stream import KVEventStream, KVEventStreamConfig

CONFIGS = Path(__file__).resolve().parents[2] / "services/engine/models/configs"
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    config = json.loads((CONFIGS / "llama-3.1-8b.json").read_text()) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
    }
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(config))
    return f"dummy:{path}"


def engine(model: str, num_blocks: int = 12) -> LLMEngine:
    config = EngineConfig(
        model=model,
        dtype="float32",
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
    )
    return LLMEngine.from_config(config, worker_id="w")


def prompts(rng: random.Random, n: int) -> list[list[int]]:
    roots = [[rng.randrange(512) for _ in range(12)] for _ in range(3)]
    return [rng.choice(roots)[: rng.randrange(13)] + [rng.randrange(512)] * 5 for _ in range(n)]


def replay(events: list[KVEvent], index: PrefixIndex | None = None) -> set[bytes]:
    """What a router builds from the events (the module docstring of kv_events.py)."""
    if index is None:  # (an empty PrefixIndex is falsy: it has a length)
        index = PrefixIndex()
    for e in events:
        if isinstance(e.data, BlocksStored):
            index.store("w", e.tier.value, e.data.block_hashes)
        elif isinstance(e.data, BlocksRemoved):
            index.remove("w", e.tier.value, e.data.block_hashes)
        else:
            assert isinstance(e.data, AllBlocksCleared)
            index.clear("w", e.tier.value)
    return index.keys_of("w").get("device", set())


def test_the_cached_keys_are_what_replaying_the_events_up_to_their_id_builds(
    tiny_model: str,
) -> None:
    llm = engine(tiny_model)
    rng = random.Random(7)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    index = PrefixIndex()
    seen = 0
    for prompt in prompts(rng, 30):
        llm.add_request(prompt, params)
        while llm.has_unfinished_requests():
            llm.step()
        cached = llm.core.cached_block_hashes()
        new = llm.core.kv_events_after(seen)
        seen = cached.last_event_id
        if new:
            assert [e.event_id for e in new] == list(range(new[0].event_id, seen + 1))
        assert replay(new, index) == set(cached.block_hashes)
    assert llm.core.kv_events_after(0)[0].event_id == 1
    # A reset between steps leaves its CLEARED in the pool; the snapshot reports it taken.
    llm.core.reset_prefix_cache()
    cached = llm.core.cached_block_hashes()
    assert cached.block_hashes == () and cached.last_event_id == seen + 1
    assert replay(llm.core.kv_events_after(seen), index) == set()


async def entries(redis: aioredis.Redis, key: str) -> list[pb.KVEventBatch]:
    out = []
    for _, fields in await redis.xrange(key):
        batch = pb.KVEventBatch()
        batch.ParseFromString(fields[b"data"])
        assert fields[b"seq"] == str(batch.seq).encode() and fields[b"epoch"] == b"e1"
        out.append(batch)
    return out


def test_the_stream_spends_a_seq_on_every_batch_redis_refused_and_goes_on(
    tiny_model: str,
) -> None:
    redis_server = RedisServer(port=free_port()).start()
    llm = engine(tiny_model)
    rng = random.Random(3)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def serve(async_engine: AsyncEngine, n: int) -> None:
        for i, prompt in enumerate(prompts(rng, n)):
            async for _ in async_engine.generate(f"r{rng.random()}{i}", prompt, params):
                pass

    async def main() -> None:
        redis = aioredis.Redis.from_url(redis_server.url, socket_connect_timeout=1.0)
        async_engine = AsyncEngine(llm.core, llm.sequences)
        async_engine.start()
        stream = KVEventStream(async_engine, redis, "w", "e1", KVEventStreamConfig(0.01))
        await stream.start()
        try:
            await serve(async_engine, 6)
            await stream.stop()  # flushes
            written = await entries(redis, stream_key("w"))
            assert [b.seq for b in written] == list(range(1, len(written) + 1))
            events: list[Any] = [e for b in written for e in b.events]
            assert [e.event_id for e in events] == list(range(1, len(events) + 1))

            await stream.start()
            redis_server.stop()  # an outage: every batch now is lost, and counted
            await serve(async_engine, 4)
            await stream.stop()
            assert stream.num_batches_lost >= 1 and stream.num_events_lost >= 1
            redis_server.start()  # the same port, empty
            await stream.start()
            await serve(async_engine, 4)
            await stream.stop()
            after = await entries(redis, stream_key("w"))
            assert after, "the stream wrote nothing after the outage"
            assert after[0].seq == len(written) + stream.num_batches_lost + 1
            assert after[0].events[0].event_id > events[-1].event_id + 1  # a hole: resync
            cached = await async_engine.call(EngineCore.cached_block_hashes)
            assert after[-1].events[-1].event_id == cached.last_event_id
        finally:
            await stream.stop()
            await async_engine.stop()
            await redis.aclose()

    try:
        asyncio.run(main())
    finally:
        redis_server.stop()


def overflow_the_ring(core: EngineCore) -> None:
    """More events than the engine's ring holds, with nobody reading (a reset at idle is one
    AllBlocksCleared each)."""
    for _ in range(DEFAULT_CAPACITY + 10):
        core.reset_prefix_cache()
        core.cached_block_hashes()


def test_events_the_engine_dropped_unread_spend_a_seq_and_leave_a_hole(tiny_model: str) -> None:
    llm = engine(tiny_model)

    async def main(redis_server: RedisServer) -> None:
        redis = aioredis.Redis.from_url(redis_server.url)
        async_engine = AsyncEngine(llm.core, llm.sequences)
        async_engine.start()
        stream = KVEventStream(async_engine, redis, "w", "e1")
        try:
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            async for _ in async_engine.generate("r", list(range(9)), params):
                pass
            assert await stream.publish_once() == 1
            await async_engine.call(overflow_the_ring)
            assert await stream.publish_once() == DEFAULT_CAPACITY // 1024
            assert stream.num_batches_lost == 1 and stream.num_events_lost == 10
            first, second, *rest = await entries(redis, stream_key("w"))
            assert second.seq == first.seq + 2  # one spent on the dropped events
            assert second.events[0].event_id == first.events[-1].event_id + 11
            assert [b.seq for b in rest] == list(range(second.seq + 1, second.seq + 1 + len(rest)))
        finally:
            await async_engine.stop()
            await redis.aclose()

    with RedisServer() as redis_server:
        asyncio.run(main(redis_server))

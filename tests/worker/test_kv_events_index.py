"""Real workers → KV events in a real Redis → the router's index, equal to every worker's cache.

Two real `Worker`s (CPU engine, SmolLM2, float32) with a 64-block KV pool, so random workloads
of prompts that share random prefixes both hit and evict. After each workload quiesces the
reader's index of each worker must equal the worker's own GetCachedBlocks; the same after a
Redis restart (streams and registry gone) and after a worker restart (same id, new epoch), where
nothing of the old run may remain. The gateway's block keys for a prompt (kvstore/block_hash.py
over the registry's model name) must be keys the index holds for the worker that served it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

import pytest

from baton.kvstore.block_hash import BlockHashExtra, hash_blocks
from baton.proto import worker_pb2 as pb
from baton.router.kv_events_reader import (
    KVEventsReader,
    KVEventsReaderConfig,
    ResyncReason,
    Snapshot,
    snapshot_from_pb,
)
from baton.router.prefix_index import PrefixIndex
from baton.router.registry import WorkerInfo, connect, list_workers
from baton.services.cluster_auth import CLUSTER_TOKEN_ENV
from baton.services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.services.redis_server import RedisServer, free_port
from baton.services.wire import ChannelPool
from baton.services.worker.server import Worker, WorkerConfig

pytestmark = pytest.mark.slow

TOKEN = "kv-events-test-token"
BLOCK_SIZE = 16
NUM_BLOCKS = 64
SEED = 20250611
ENGINE = EngineConfig(
    dtype="float32",
    cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
)
QUIESCE_TIMEOUT_S = 30.0
"""How long an idle cluster may take to agree (it takes well under a second)."""


class Cluster:
    """Two in-process workers, their reader, and the snapshot the reader resyncs from."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        self.redis = connect(redis_server.url)
        self.pool = ChannelPool(token=TOKEN)
        self.workers: dict[str, Worker] = {}
        self.reader = KVEventsReader(
            self.redis,
            PrefixIndex(),
            self.snapshot,
            KVEventsReaderConfig(block_ms=50, missing_check_interval_s=0.2),
        )

    async def snapshot(self, info: WorkerInfo) -> Snapshot:
        return snapshot_from_pb(await self.cached_blocks(info.address))

    async def cached_blocks(self, address: str) -> pb.CachedBlocks:
        stub = self.pool.stub(address)
        reply: pb.CachedBlocks = await stub.GetCachedBlocks(pb.CachedBlocksRequest(), timeout=5)
        return reply

    async def start_worker(self, worker_id: str) -> Worker:
        config = WorkerConfig(worker_id=worker_id, redis_url=self.redis_server.url)
        worker = Worker(config, ENGINE)
        await worker.start()
        self.workers[worker_id] = worker
        return worker

    async def registered(self) -> list[WorkerInfo]:
        """The registry's entries, once it names the running workers as they are now."""
        want = {w.worker_id: w.address for w in self.workers.values()}

        def current(infos: Sequence[WorkerInfo]) -> bool:
            return {i.worker_id: i.address for i in infos} == want

        infos: list[WorkerInfo] = []
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        while time.monotonic() < deadline:
            infos = await list_workers(self.redis, token=TOKEN)
            if current(infos):
                return infos
            await asyncio.sleep(0.1)
        raise AssertionError(f"the registry never named {want}: {infos}")

    async def generate(self, worker: Worker, prompt: list[int], max_tokens: int) -> None:
        request = pb.GenerateRequest(
            request_id=f"r{random.getrandbits(64):x}",
            prompt_token_ids=prompt,
            params=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        )
        async for _ in self.pool.stub(worker.address).Generate(request, timeout=60):
            pass

    async def agreed(self) -> dict[str, set[bytes]]:
        """Wait until the reader's index of every worker equals its cache; returns the caches."""
        caches: dict[str, set[bytes]] = {}
        last_diff = ""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        while time.monotonic() < deadline:
            last_diff = ""
            for worker_id, worker in self.workers.items():
                cached = await self.cached_blocks(worker.address)
                (tier,) = cached.tiers
                assert tier.tier == pb.KV_TIER_DEVICE and cached.epoch == worker.epoch
                caches[worker_id] = set(tier.block_hashes)
                indexed = self.reader.index.keys_of(worker_id).get("device", set())
                status = self.reader.status(worker_id)
                if status is None or not status.synced or status.epoch != worker.epoch:
                    last_diff += f"{worker_id}: not synced ({status}); "
                elif status.last_event_ids.get("device") != tier.last_event_id:
                    last_diff += f"{worker_id}: at event {status.last_event_ids} "
                    last_diff += f"of {tier.last_event_id}; "
                elif indexed != caches[worker_id]:
                    extra, missing = indexed - caches[worker_id], caches[worker_id] - indexed
                    last_diff += f"{worker_id}: {len(extra)} stale, {len(missing)} missing; "
            if not last_diff:
                return caches
            await asyncio.sleep(0.05)
        raise AssertionError(f"the index never agreed with the workers: {last_diff}")

    async def close(self) -> None:
        await self.reader.stop()
        for worker in self.workers.values():
            await worker.drain_and_stop()
        await self.pool.close()
        await self.redis.aclose()


def workload(rng: random.Random, num_requests: int) -> list[tuple[int, list[int], int]]:
    """(worker index, prompt, max_tokens): prompts share random prefixes of a few roots, long
    enough that a handful of them in flight (plus what they leave cached) overflow 64 blocks."""
    roots = [[rng.randrange(100, 40_000) for _ in range(rng.randrange(16, 120))] for _ in range(5)]
    out = []
    for _ in range(num_requests):
        root = rng.choice(roots)
        shared = root[: rng.randrange(0, len(root) + 1)]
        suffix = [rng.randrange(100, 40_000) for _ in range(rng.randrange(1, 80))]
        out.append((rng.randrange(2), shared + suffix, rng.randrange(1, 4)))
    return out


async def run_load(
    cluster: Cluster, ids: Sequence[str], load: Sequence[tuple[int, list[int], int]]
) -> None:
    queue: asyncio.Queue[tuple[int, list[int], int]] = asyncio.Queue()
    for item in load:
        queue.put_nowait(item)

    async def client() -> None:
        while not queue.empty():
            index, prompt, max_tokens = queue.get_nowait()
            await cluster.generate(cluster.workers[ids[index]], prompt, max_tokens)

    await asyncio.gather(*(client() for _ in range(6)))


async def gateway_keys_are_indexed(cluster: Cluster, rng: random.Random) -> None:
    """A prompt served last on each worker: the keys the gateway computes from the registry
    entry alone (model name, block size, the default salt) are all in the index for it."""
    infos = {i.worker_id: i for i in await cluster.registered()}
    prompts: dict[str, list[int]] = {}
    for worker_id, worker in cluster.workers.items():
        prompt = [rng.randrange(100, 40_000) for _ in range(3 * BLOCK_SIZE + 5)]
        await cluster.generate(worker, prompt, 1)
        prompts[worker_id] = prompt
    await cluster.agreed()
    for worker_id, prompt in prompts.items():
        info = infos[worker_id]
        assert info.model == cluster.workers[worker_id].model_id
        keys = hash_blocks(prompt, info.block_size, BlockHashExtra(info.model, "").encode())
        assert len(keys) == 3
        indexed = cluster.reader.index.keys_of(worker_id)["device"]
        assert set(keys) <= indexed
        match = cluster.reader.index.match(keys)
        assert match[worker_id].num_blocks == 3


def test_the_index_follows_two_workers_through_redis_and_worker_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CLUSTER_TOKEN_ENV, TOKEN)
    rng = random.Random(SEED)

    async def main(redis_server: RedisServer) -> None:
        cluster = Cluster(redis_server)
        try:
            await cluster.start_worker("w0")
            await cluster.start_worker("w1")
            cluster.reader.set_workers(await cluster.registered())
            await cluster.reader.start()
            ids = ["w0", "w1"]

            await run_load(cluster, ids, workload(rng, 60))
            caches = await cluster.agreed()
            assert all(caches.values()), "the workload left nothing cached"
            await gateway_keys_are_indexed(cluster, rng)

            # Redis goes down under load and comes back empty on its port: streams, registry
            # and every batch written meanwhile are lost. (It starts again between loads: its
            # Popen runs a preexec_fn, which can crash the forked child of a process whose
            # threads are busy; Python's docs warn of it.)
            load = asyncio.create_task(run_load(cluster, ids, workload(rng, 48)))
            await asyncio.sleep(0.5)
            redis_server.stop()
            await load
            redis_server.start()
            await run_load(cluster, ids, workload(rng, 12))
            await cluster.agreed()

            # A worker restarts under its id: a new epoch, nothing of the old run kept.
            old = cluster.workers["w1"]
            old_keys = cluster.reader.index.keys_of("w1")["device"]
            await old.drain_and_stop()
            del cluster.workers["w1"]
            new = await cluster.start_worker("w1")
            assert new.epoch != old.epoch
            cluster.reader.set_workers(await cluster.registered())
            caches = await cluster.agreed()  # before any load: no batch told of the restart
            stale = old_keys - caches["w1"]
            assert stale and not stale & cluster.reader.index.keys_of("w1").get("device", set())
            await run_load(cluster, ids, workload(rng, 48))
            await cluster.agreed()
            await gateway_keys_are_indexed(cluster, rng)

            stats = cluster.reader.stats
            assert stats.resyncs.get(ResyncReason.FIRST_SEEN) == 2
            assert stats.resyncs.get(ResyncReason.WORKER_CHANGED) == 1
            lost = stats.resyncs.get(ResyncReason.SEQ_GAP, 0) + stats.resyncs.get(
                ResyncReason.STREAM_MISSING, 0
            )
            assert lost >= 1, stats.resyncs  # the outage was seen and healed
            assert stats.events_by_kind.get("removed", 0) > 0, "the workloads never evicted"
        finally:
            await cluster.close()

    with RedisServer(port=free_port()) as redis_server:  # a port of its own: it restarts
        asyncio.run(main(redis_server))

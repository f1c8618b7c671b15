"""KV events: identity, batching, bounded buffers, and replay rebuilding the pool's own index.

The oracles: block keys computed independently with kvstore.block_hash, and the pool's own
cache contents, which replaying the published events must reproduce exactly.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterator

import pytest

from baton.kvstore.block_hash import BlockHash, hash_blocks
from baton.services.engine.block_pool import BlockPool
from baton.services.engine.kv_cache_manager import KVCacheManager
from baton.services.engine.kv_events import (
    AllBlocksCleared,
    BlockEvent,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    KVEventKind,
    KVEventPublisher,
    KVEventsLost,
    StorageTier,
    batch_block_events,
)
from baton.services.engine.request import Request
from baton.services.engine.sampling_params import SamplingParams

BS = 4
EXTRA = b"model-x"


def req(rid: str, tokens: list[int]) -> Request:
    return Request(
        rid,
        tokens,
        SamplingParams(max_tokens=1),
        block_size=BS,
        hash_extra=EXTRA,
        max_model_len=4096,
    )


def compute(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> None:
    """Admit (with its prefix hit) or extend a request, then mark its tokens computed, as a
    step of the scheduler would."""
    end = request.num_tokens if num_tokens is None else num_tokens
    if kv.num_held(request) == 0:
        hit = kv.find_prefix(request)
        assert kv.allocate(request, end - hit.num_tokens, hit) is not None
        request.num_computed_tokens = hit.num_tokens
    else:
        assert kv.allocate(request, end - request.num_computed_tokens) is not None
    request.num_computed_tokens = end
    kv.cache_computed(request)


def replay(events: list[KVEvent], index: dict[BlockHash, BlockHash | None]) -> None:
    """A consumer's index: key -> parent key, rebuilt from events only."""
    for event in events:
        data = event.data
        if isinstance(data, BlocksStored):
            parent = data.parent_hash
            for key in data.block_hashes:
                index[key] = parent
                parent = key
        elif isinstance(data, BlocksRemoved):
            for key in data.block_hashes:
                del index[key]  # a removal of a key never stored would be a bug: KeyError
        else:
            index.clear()


def pool_index(pool: BlockPool) -> dict[BlockHash, BlockHash | None]:
    return {b.block_hash: b.parent_hash for b in pool.blocks if b.block_hash is not None}


def publisher(capacity: int = 1024) -> KVEventPublisher:
    return KVEventPublisher("w0", StorageTier.DEVICE, BS, capacity=capacity)


# ---- stored


def test_a_requests_blocks_are_one_stored_event_chained_from_the_root() -> None:
    kv, pub = KVCacheManager(16, BS), publisher()
    tokens = list(range(100, 114))  # 3 full blocks and a partial one, which has no key
    compute(kv, req("a", tokens))
    (event,) = pub.publish(kv.take_events())
    assert event.event_id == 1 and event.worker_id == "w0" and event.tier is StorageTier.DEVICE
    assert event.kind is KVEventKind.STORED
    assert event.data == BlocksStored(None, tuple(hash_blocks(tokens, BS, EXTRA)), BS)
    assert event.data.num_tokens == 12


def test_a_prefix_hit_stores_only_the_new_blocks_under_the_shared_parent() -> None:
    kv, pub = KVCacheManager(16, BS), publisher()
    shared = list(range(8))
    compute(kv, req("a", [*shared, 50, 51, 52, 53, 54]))
    pub.publish(kv.take_events())
    b_tokens = [*shared, 60, 61, 62, 63, 64, 65, 66, 67, 68]
    compute(kv, req("b", b_tokens))
    (event,) = pub.publish(kv.take_events())
    keys = hash_blocks(b_tokens, BS, EXTRA)
    assert event.data == BlocksStored(keys[1], (keys[2], keys[3]), BS)


def test_one_stored_event_per_chain_per_step_and_chunks_continue_their_chain() -> None:
    kv, pub = KVCacheManager(32, BS), publisher()
    a_tokens, b_tokens = list(range(16)), list(range(500, 508))
    a, b = req("a", a_tokens), req("b", b_tokens)
    compute(kv, a, 8)  # a's first chunk and all of b in one step
    compute(kv, b)
    a_keys, b_keys = hash_blocks(a_tokens, BS, EXTRA), hash_blocks(b_tokens, BS, EXTRA)
    assert [e.data for e in pub.publish(kv.take_events())] == [
        BlocksStored(None, (a_keys[0], a_keys[1]), BS),
        BlocksStored(None, tuple(b_keys), BS),
    ]
    compute(kv, a)  # the next chunk hangs off the last block of the first
    assert [e.data for e in pub.publish(kv.take_events())] == [
        BlocksStored(a_keys[1], (a_keys[2], a_keys[3]), BS)
    ]


# ---- removed, cleared


def test_evictions_in_one_step_are_one_removed_event_with_exactly_the_evicted_keys() -> None:
    kv, pub = KVCacheManager(6, BS), publisher()
    a_tokens, b_tokens = list(range(12)), list(range(200, 212))
    a, b = req("a", a_tokens), req("b", b_tokens)
    compute(kv, a)
    compute(kv, b)
    kv.free(a)  # tail first: the queue is a2 a1 a0 b2 b1 b0
    kv.free(b)
    pub.publish(kv.take_events())
    a_keys, b_keys = hash_blocks(a_tokens, BS, EXTRA), hash_blocks(b_tokens, BS, EXTRA)
    c = req("c", list(range(900, 916)))
    assert kv.allocate(c, 16) is not None  # 4 blocks: evicts a2 a1 a0 b2
    (event,) = pub.publish(kv.take_events())
    assert event.data == BlocksRemoved((a_keys[2], a_keys[1], a_keys[0], b_keys[2]))
    assert pool_index(kv.pool) == {b_keys[0]: None, b_keys[1]: b_keys[0]}


def test_reset_is_one_cleared_event_that_supersedes_undrained_ones() -> None:
    kv, pub = KVCacheManager(8, BS), publisher()
    a = req("a", list(range(12)))
    compute(kv, a)
    assert not kv.reset_prefix_cache()  # a holds its blocks: nothing changes
    assert [e.kind for e in kv.pool.take_events()] == [KVEventKind.STORED] * 3
    compute(kv, b := req("b", list(range(40, 48))))
    kv.free(a)
    kv.free(b)
    assert kv.reset_prefix_cache() and kv.pool.num_cached_blocks == 0
    (event,) = pub.publish(kv.take_events())  # b's stored blocks are gone with the rest
    assert event.data == AllBlocksCleared() and event.kind is KVEventKind.CLEARED
    kv.check_integrity(expect_idle=True)


def test_batching_merges_only_adjacent_runs_and_keeps_their_order() -> None:
    x, y, z, w = (bytes([i]) * 16 for i in range(4))
    stored, removed = KVEventKind.STORED, KVEventKind.REMOVED
    raw = [
        BlockEvent(removed, x, None),
        BlockEvent(removed, y, None),
        BlockEvent(stored, x, None),  # x comes back after its removal: order matters
        BlockEvent(stored, z, x),
        BlockEvent(stored, w, y),  # not z's child: a new chain
        BlockEvent(removed, z, None),
        BlockEvent(KVEventKind.CLEARED, None, None),
        BlockEvent(stored, y, None),
    ]
    assert batch_block_events(raw, BS) == [
        BlocksRemoved((x, y)),
        BlocksStored(None, (x, z), BS),
        BlocksStored(y, (w,), BS),
        BlocksRemoved((z,)),
        AllBlocksCleared(),
        BlocksStored(None, (y,), BS),
    ]
    assert batch_block_events([], BS) == []


# ---- identity and the ring


def workload(
    kv: KVCacheManager, pub: KVEventPublisher, num_steps: int, seed: int = 0
) -> Iterator[list[KVEvent]]:
    """Random requests over a few shared prefixes, chunked, freed at random: hits, evictions,
    chains of every length. Publishes once per step, as the engine does, and yields each
    step's events."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(4 * BS)] for _ in range(5)]
    live: list[Request] = []
    for step in range(num_steps):
        if rng.random() < 0.5 and live:
            kv.free(live.pop(rng.randrange(len(live))))
        elif kv.pool.num_free_blocks >= 8:
            prefix = rng.choice(prefixes)[: rng.randrange(0, 4 * BS + 1)]
            tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 3 * BS))]
            request = req(f"r{step}", prefix + tail)
            compute(kv, request, rng.randrange(1, request.num_tokens + 1))
            live.append(request)
        for request in live:  # continue chunked prefills
            if request.num_computed_tokens < request.num_tokens and kv.pool.num_free_blocks > 4:
                compute(kv, request)
        yield pub.publish(kv.take_events())


def test_event_ids_are_monotonic_per_worker_without_gaps() -> None:
    kv, pub = KVCacheManager(24, BS), publisher(capacity=100_000)
    assert pub.last_event_id == 0 and pub.publish([]) == []  # an empty step takes no id
    events = [e for step in workload(kv, pub, 400) for e in step]
    assert {e.kind for e in events} == {KVEventKind.STORED, KVEventKind.REMOVED}
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    assert pub.last_event_id == len(events) and pub.num_dropped == 0


def test_replaying_the_events_rebuilds_the_pools_index_after_every_step() -> None:
    kv, pub = KVCacheManager(24, BS), publisher()
    index: dict[BlockHash, BlockHash | None] = {}
    num_removed = 0
    for events in workload(kv, pub, 600, seed=1):
        replay(events, index)
        assert index == pool_index(kv.pool)
        num_removed += sum(
            len(e.data.block_hashes) for e in events if isinstance(e.data, BlocksRemoved)
        )
        kv.check_integrity()
    assert num_removed > 50 and kv.prefix_hits_tokens > 0  # evictions and hits both happened


def test_the_ring_drops_the_oldest_counts_them_and_serves_exact_suffixes() -> None:
    kv, pub = KVCacheManager(64, BS), publisher(capacity=4)
    published = []
    for i in range(10):
        compute(kv, req(f"r{i}", [i * 100 + t for t in range(BS)]))
        published += pub.publish(kv.take_events())
    assert [e.event_id for e in published] == list(range(1, 11))
    assert pub.num_held == 4 and pub.num_dropped == 6 and pub.last_event_id == 10
    assert pub.events_since(6) == published[6:]
    assert pub.events_since(8) == published[8:]
    assert pub.events_since(10) == []
    with pytest.raises(KVEventsLost):
        pub.events_since(5)  # event 6 was dropped
    with pytest.raises(KVEventsLost):
        pub.events_since(11)  # a cursor from an earlier run of the worker
    assert pub.take() == published[6:] and pub.num_held == 0
    assert pub.events_since(10) == []
    with pytest.raises(KVEventsLost):
        pub.events_since(9)  # taken


def test_a_consumer_that_lost_events_resyncs_from_a_snapshot() -> None:
    kv, pub = KVCacheManager(24, BS), publisher(capacity=8)
    for _ in workload(kv, pub, 200):
        pass
    assert pub.num_dropped > 0
    with pytest.raises(KVEventsLost):
        pub.events_since(0)
    kv.request_snapshot()
    snapshot = pub.publish(kv.take_events())
    assert snapshot[0].data == AllBlocksCleared()
    # each chain of the snapshot is one event, parents before children
    assert len(snapshot) - 1 <= kv.pool.num_cached_blocks
    index: dict[BlockHash, BlockHash | None] = {b"stale": None}
    replay(pub.events_since(snapshot[0].event_id - 1), index)
    assert index == pool_index(kv.pool)


def test_an_undrained_pool_collapses_its_buffer_into_an_equivalent_snapshot() -> None:
    kv = KVCacheManager(8, BS)
    bound = kv.pool.max_pending_events
    for i in range(2000):  # nobody drains: 4 stored + up to 4 removed events a cycle
        request = req(f"r{i}", [i * 16 + t for t in range(16)])
        compute(kv, request)
        kv.free(request)
        assert kv.pool.num_pending_events <= bound
    assert kv.pool.num_collapses > 0
    index: dict[BlockHash, BlockHash | None] = {}
    replay(publisher().publish(kv.take_events()), index)
    assert index == pool_index(kv.pool) and len(index) == 8
    kv.check_integrity(expect_idle=True)


# ---- memory


def test_memory_stays_flat_over_10k_publish_evict_cycles() -> None:
    kv, pub = KVCacheManager(32, 16), KVEventPublisher("w0", StorageTier.DEVICE, 16, capacity=256)

    def cycle(i: int) -> None:
        tokens = [(i * 64 + t) % 2**31 for t in range(64)]  # unique: always a miss
        request = Request(
            f"r{i}", tokens, SamplingParams(max_tokens=1), block_size=16, hash_extra=EXTRA,
            max_model_len=4096,
        )  # fmt: skip
        hit = kv.find_prefix(request)
        assert kv.allocate(request, request.num_tokens, hit) is not None  # evicts 4 blocks
        request.num_computed_tokens = request.num_tokens
        kv.cache_computed(request)
        kv.free(request)
        pub.publish(kv.take_events())

    tracemalloc.start()
    try:
        for i in range(1000):
            cycle(i)
        gc.collect()
        after_1k, _ = tracemalloc.get_traced_memory()
        for i in range(1000, 10_000):
            cycle(i)
        gc.collect()
        after_10k, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = after_10k - after_1k
    print(f"traced after 1k cycles {after_1k} B, after 10k {after_10k} B, growth {growth} B")
    # Unbounded (capacity 100,000) this grows by 5.8 MB: 18,000 events of the last 9,000 cycles.
    assert growth < 16 * 1024, (after_1k, after_10k)
    assert pub.num_held == pub.capacity and pub.last_event_id == 8 + 2 * (
        10_000 - 8
    )  # no eviction while 8 fit
    assert pub.num_dropped == pub.last_event_id - pub.capacity
    kv.check_integrity(expect_idle=True)

"""Block keys and the block pool: chaining, tenant separation, LRU eviction, events, invariants."""

from __future__ import annotations

import pytest

from baton.kvstore.block_hash import BlockHashExtra, hash_block, hash_blocks
from baton.services.engine.block_pool import BlockPool
from baton.services.engine.kv_events import BlockEvent, KVEventKind


def test_keys_chain_over_parent_tokens_and_extra() -> None:
    extra = BlockHashExtra("m").encode()
    tokens = list(range(40))
    keys = hash_blocks(tokens, 16, extra)
    assert len(keys) == 2  # the partial third block has no key
    assert keys[0] == hash_block(None, tokens[:16], extra)
    assert keys[1] == hash_block(keys[0], tokens[16:32], extra)
    # same tokens after a different prefix → a different key
    other = hash_blocks([999, *tokens[1:]], 16, extra)
    assert other[0] != keys[0] and other[1] != keys[1]
    # extending from a known parent gives the same keys as hashing from scratch
    assert hash_blocks(tokens + [1] * 8, 16, extra, parent=keys[1], start_block=2) == [
        hash_blocks(tokens + [1] * 8, 16, extra)[2]
    ]
    assert len(keys[0]) == 16 and isinstance(keys[0], bytes)


def test_extra_separates_models_tenants_and_adapters() -> None:
    tokens = list(range(16))
    variants = [
        BlockHashExtra("m"),
        BlockHashExtra("m2"),
        BlockHashExtra("m", cache_salt="tenant"),
        BlockHashExtra("m", adapter="lora"),
        BlockHashExtra("ma", cache_salt=""),  # length-prefixing: ("ma","") != ("m","a")
        BlockHashExtra("m", cache_salt="a"),
    ]
    keys = {hash_block(None, tokens, v.encode()) for v in variants}
    assert len(keys) == len(variants)


def test_keys_are_stable_across_processes() -> None:
    # Pinned value: a change here breaks every stored index and KV store, on purpose visible.
    key = hash_block(None, [1, 2, 3, 4], BlockHashExtra("smollm2").encode())
    assert key.hex() == "6ce363e41de5c9cf8cf070764725fc5e"
    import subprocess
    import sys

    code = (
        "from baton.kvstore.block_hash import *;"
        "print(hash_block(None,[1,2,3,4],BlockHashExtra('smollm2').encode()).hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key.hex()


def test_lru_eviction_and_events() -> None:
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    for i, blk in enumerate((a, b, c, d)):
        pool.cache(blk, bytes([i]) * 16, bytes([i - 1]) * 16 if i else None)
    assert pool.take_events() == [
        BlockEvent(KVEventKind.STORED, bytes([i]) * 16, bytes([i - 1]) * 16 if i else None)
        for i in range(4)
    ]
    assert pool.take_events() == []  # taken once
    pool.release([c])
    pool.release([a])
    pool.release([d, b])
    # free queue order: c, a, d, b (least recently released first)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 4
    hit = pool.lookup(bytes([0]) * 16)
    assert hit is a
    pool.take([a])  # a prefix hit pulls a out of the queue: it can no longer be evicted
    (first,) = pool.allocate(1)
    assert first is c and pool.lookup(bytes([2]) * 16) is None
    (second,) = pool.allocate(1)
    assert second is d
    assert pool.take_events() == [
        BlockEvent(KVEventKind.REMOVED, bytes([2]) * 16, None),
        BlockEvent(KVEventKind.REMOVED, bytes([3]) * 16, None),
    ]
    pool.release([a, first, second])
    pool.check_integrity(expect_idle=True)


def test_duplicate_cache_keeps_the_first_block() -> None:
    pool = BlockPool(2)
    x, y = pool.allocate(2)
    pool.cache(x, b"k" * 16, None)
    pool.cache(y, b"k" * 16, None)
    assert pool.lookup(b"k" * 16) is x and y.block_hash is None
    assert [e.kind for e in pool.take_events()] == [KVEventKind.STORED]  # one, not two
    pool.release([x, y])
    pool.check_integrity(expect_idle=True)


def test_release_more_than_taken_is_an_error() -> None:
    pool = BlockPool(1)
    (x,) = pool.allocate(1)
    pool.release([x])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([x])
    with pytest.raises(RuntimeError, match="asked for 2"):
        pool.allocate(2)


def test_reset_prefix_cache_only_when_idle_and_records_one_cleared_event() -> None:
    pool = BlockPool(2)
    x, y = pool.allocate(2)
    pool.cache(x, b"z" * 16, None)
    pool.cache(y, b"w" * 16, b"z" * 16)
    assert not pool.reset_prefix_cache()
    assert pool.num_pending_events == 2  # a refused reset records nothing
    pool.release([y, x])
    assert pool.reset_prefix_cache() and pool.num_cached_blocks == 0
    # one CLEARED, no removal per block, and the undrained stores it supersedes are gone
    assert pool.take_events() == [BlockEvent(KVEventKind.CLEARED, None, None)]
    assert pool.lookup(b"z" * 16) is None and x.parent_hash is None and y.parent_hash is None
    pool.check_integrity(expect_idle=True)


def test_the_event_buffer_is_bounded_without_a_drain() -> None:
    pool = BlockPool(2, max_pending_events=5)
    for i in range(20):
        blocks = pool.allocate(2)  # evicts the previous round's two blocks
        pool.cache(blocks[0], bytes([i, 0]) * 8, None)
        pool.cache(blocks[1], bytes([i, 1]) * 8, bytes([i, 0]) * 8)
        pool.release(blocks[::-1])
        assert pool.num_pending_events <= 5
        pool.check_integrity(expect_idle=True)
    assert pool.num_collapses > 0
    # what is left replays to the pool's contents: a snapshot plus what followed it
    events = pool.take_events()
    assert events[0] == BlockEvent(KVEventKind.CLEARED, None, None)
    last = [bytes([19, 0]) * 8, bytes([19, 1]) * 8]
    index: dict[bytes, bytes | None] = {}
    for kind, key, parent in events:
        if kind is KVEventKind.CLEARED:
            index.clear()
        elif kind is KVEventKind.STORED:
            assert key is not None
            index[key] = parent
        else:
            assert key is not None
            del index[key]
    assert index == {last[0]: None, last[1]: last[0]}
    with pytest.raises(ValueError, match="must exceed a snapshot"):
        BlockPool(4, max_pending_events=5)

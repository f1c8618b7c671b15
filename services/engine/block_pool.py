"""The block pool: every physical KV block, its reference count, and the prefix-cache map.

Region map of a block's life:
    free & uncached  --allocate-->  in use (ref >= 1)  --last release-->  free & cached (if full
    and hashed) or free & uncached.  free & cached  --hit-->  in use  |  --evicted on allocate-->
    free & uncached.
Free blocks sit in one LRU queue (least recently released first). Allocation takes from its
head, evicting the head's cache entry if it has one; a prefix hit takes a block out of the
queue wherever it is. So cached blocks are evicted LRU and only when no uncached block is left
ahead of them in the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from baton.kvstore.block_hash import BlockHash


class KVBlock:
    """One physical block of the KV cache."""

    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        key = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={key})"


@dataclass(frozen=True)
class BlockEvent:
    """A change of the prefix cache's contents: what KV events (DESIGN.md §3) are made of."""

    kind: str
    """"stored" or "removed"."""
    block_hash: BlockHash
    parent_hash: BlockHash | None = None


class BlockPool:
    """Owns blocks; knows nothing of requests. Callers hold lists of KVBlock and release them."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._events: list[BlockEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take (free uncached + evictable cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def take(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (a prefix hit), pulling free ones out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take num_blocks free blocks (ref 1), evicting LRU cached ones as needed."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; a block reaching zero joins the queue's tail.

        Callers pass a request's blocks tail-first so that its last blocks (the least likely to
        be shared) are evicted before its prefix.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"{block} released more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: KVBlock, block_hash: BlockHash, parent: BlockHash | None) -> None:
        """Publish a full, computed block under its key so later requests can hit it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            # Another request computed the same block first; keep that one, this block stays
            # private to its request and becomes plain free space when released.
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._events.append(BlockEvent("stored", block_hash, parent))

    def reset_prefix_cache(self) -> bool:
        """Drop every cache entry; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in list(self._cached.values()):
            self._evict(block)
        return True

    def take_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Assert the pool's invariants; with expect_idle, also that no request holds a block."""
        assert len(self._free) <= self.num_blocks
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            in_queue = block.block_id in self._free
            assert in_queue == (block.ref_cnt == 0), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, block
        assert all(b.block_hash == h for h, b in self._cached.items())
        if expect_idle:
            held = [b for b in self.blocks if b.ref_cnt != 0]
            assert not held, f"blocks still referenced at idle: {held[:4]}"

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        self._events.append(BlockEvent("removed", block.block_hash))
        block.block_hash = None

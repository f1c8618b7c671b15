"""The block pool: every physical KV block, its reference count, and the prefix-cache map.

Region map of a block's life:
    free & uncached  --allocate-->  in use (ref >= 1)  --last release-->  free & cached (if full
    and hashed) or free & uncached.  free & cached  --hit-->  in use  |  --evicted on allocate-->
    free & uncached.
Free blocks sit in one LRU queue (least recently released first). Allocation takes from its
head, evicting the head's cache entry if it has one; a prefix hit takes a block out of the
queue wherever it is. So cached blocks are evicted LRU and only when no uncached block is left
ahead of them in the queue.

Every change of what is findable is recorded as a raw BlockEvent (kv_events.py) for the engine to
drain once per step. The buffer is bounded even if nobody drains: past max_pending_events it
collapses into a snapshot (CLEARED, then every cached block as STORED, parents first), which
leaves a consumer's replayed index exactly where replaying the dropped events would have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from baton.kvstore.block_hash import BlockHash
from baton.services.engine.kv_events import BlockEvent, KVEventKind

_CLEARED = BlockEvent(KVEventKind.CLEARED, None, None)


class KVBlock:
    """One physical block of the KV cache."""

    __slots__ = ("block_hash", "block_id", "parent_hash", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.parent_hash: BlockHash | None = None
        """The key before block_hash in its sequence, while cached (for snapshots)."""

    def __repr__(self) -> str:
        key = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={key})"


class BlockPool:
    """Owns blocks; knows nothing of requests. Callers hold lists of KVBlock and release them."""

    def __init__(
        self, num_blocks: int, enable_caching: bool = True, max_pending_events: int | None = None
    ) -> None:
        """max_pending_events: undrained raw events kept before collapsing them into a
        snapshot (default 2 * num_blocks + 64, which a snapshot of at most num_blocks + 1 events
        always fits under with room to spare, so collapses stay rare)."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._events: list[BlockEvent] = []
        self.max_pending_events = (
            2 * num_blocks + 64 if max_pending_events is None else max_pending_events
        )
        if self.max_pending_events <= num_blocks + 1:
            raise ValueError(
                f"max_pending_events ({self.max_pending_events}) must exceed a snapshot's "
                f"size (num_blocks + 1 = {num_blocks + 1})"
            )
        self.num_collapses = 0
        """Times the undrained buffer was replaced by a snapshot."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take (free uncached + evictable cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_pending_events(self) -> int:
        """Raw events recorded and not yet taken (at most max_pending_events)."""
        return len(self._events)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> list[BlockHash]:
        """Every key findable now (the prefix-cache map's keys, in no particular order)."""
        return list(self._cached)

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
        block.parent_hash = parent
        self._cached[block_hash] = block
        self._record(BlockEvent(KVEventKind.STORED, block_hash, parent))

    def reset_prefix_cache(self) -> bool:
        """Drop every cache entry; only possible when no block is in use. Records one CLEARED
        (not a removal per block) in place of every undrained event, which it supersedes."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = block.parent_hash = None
        self._cached.clear()
        self._events = [_CLEARED]
        return True

    def take_events(self) -> list[BlockEvent]:
        """The raw events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def request_snapshot(self) -> None:
        """Replace the undrained events by a snapshot, so that the next take_events() lets a
        consumer that lost its place rebuild this pool's index from nothing."""
        self._events = self._snapshot()

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Assert the pool's invariants; with expect_idle, also that no request holds a block."""
        assert len(self._free) <= self.num_blocks
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            in_queue = block.block_id in self._free
            assert in_queue == (block.ref_cnt == 0), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, block
            else:
                assert block.parent_hash is None, block
        assert len(self._events) <= self.max_pending_events
        assert all(b.block_hash == h for h, b in self._cached.items())
        if expect_idle:
            held = [b for b in self.blocks if b.ref_cnt != 0]
            assert not held, f"blocks still referenced at idle: {held[:4]}"

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        self._record(BlockEvent(KVEventKind.REMOVED, block.block_hash, None))
        block.block_hash = block.parent_hash = None

    def _record(self, event: BlockEvent) -> None:
        self._events.append(event)
        if len(self._events) > self.max_pending_events:
            # Nobody drained for a long while: the snapshot says the same in fewer events.
            self._events = self._snapshot()
            self.num_collapses += 1

    def _snapshot(self) -> list[BlockEvent]:
        """CLEARED, then every cached block as STORED in depth-first order from the blocks
        whose parent is not cached, so each chain comes out as one run, parents first. A block
        whose parent was evicted before it keeps that parent's key, as its live event did."""
        children: dict[BlockHash, list[BlockHash]] = {}
        roots: list[BlockHash] = []
        for key, block in self._cached.items():
            parent = block.parent_hash
            if parent is not None and parent in self._cached:
                children.setdefault(parent, []).append(key)
            else:
                roots.append(key)
        events = [_CLEARED]
        stack = roots[::-1]
        while stack:
            key = stack.pop()
            events.append(BlockEvent(KVEventKind.STORED, key, self._cached[key].parent_hash))
            stack.extend(reversed(children.get(key, ())))
        return events

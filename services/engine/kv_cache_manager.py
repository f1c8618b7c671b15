"""Maps requests to KV blocks: prefix-cache lookup, slot allocation, publishing and freeing.

Region map of one request's blocks (block_size tokens each):
    [ hit blocks (shared, cached) | computed blocks | blocks for this step's tokens ]
    |<------------ num_computed_tokens ----------->|<------ num_new_tokens ------->|
Only full blocks whose tokens are computed get published to the prefix cache, and only after
the step that computed them ran (cache_computed): a block is never findable before its KV exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from baton.kvstore.block_hash import BlockHash
from baton.services.engine.block_pool import BlockPool, KVBlock
from baton.services.engine.kv_events import BlockEvent
from baton.services.engine.request import Request


@dataclass(frozen=True)
class PrefixHit:
    """Blocks a waiting request can reuse, and the tokens they cover."""

    blocks: tuple[KVBlock, ...]
    num_tokens: int


class KVCacheManager:
    """One job: which blocks each request holds. The pool knows blocks, this knows requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_published: dict[str, int] = {}
        self.prefix_queries_tokens = 0
        """Prompt tokens looked up in the prefix cache (baton:prefix_cache_queries_total)."""
        self.prefix_hits_tokens = 0
        """Of those, tokens found."""

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest run of the request's leading full blocks present in the cache.

        At least one token is always left to compute: the step that samples the next token needs
        the last position's logits.
        """
        if not self.pool.enable_caching:
            return PrefixHit((), 0)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block)
        self.prefix_queries_tokens += request.num_tokens
        self.prefix_hits_tokens += len(hit) * self.block_size
        return PrefixHit(tuple(hit), len(hit) * self.block_size)

    def can_allocate(
        self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None
    ) -> bool:
        return self._num_needed(request, num_new_tokens, hit) <= self._num_allocatable(hit)

    def allocate(
        self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None
    ) -> list[KVBlock] | None:
        """Hold the hit blocks and enough new blocks for num_new_tokens more tokens.

        Returns the newly allocated blocks (possibly none), or None, changing nothing, when the
        pool is short.
        """
        num_needed = self._num_needed(request, num_new_tokens, hit)
        if num_needed > self._num_allocatable(hit):
            return None
        held = self._blocks.setdefault(request.request_id, [])
        if hit is not None and hit.blocks:
            assert not held, "a prefix hit is only applied to a request holding no blocks"
            self.pool.take(hit.blocks)
            held.extend(hit.blocks)
            self._num_published[request.request_id] = len(hit.blocks)
        new = self.pool.allocate(max(num_needed, 0))
        held.extend(new)
        return new

    def cache_computed(self, request: Request, num_computed: int | None = None) -> None:
        """Publish the request's full blocks whose KV has been computed: its first
        `num_computed` tokens (default: request.num_computed_tokens, which also counts tokens
        of steps still in flight)."""
        held = self._blocks.get(request.request_id)
        if held is None:
            return
        if num_computed is None:
            num_computed = request.num_computed_tokens
        start = self._num_published.get(request.request_id, 0)
        end = min(num_computed // self.block_size, len(request.block_hashes), len(held))
        for i in range(start, end):
            parent = request.block_hashes[i - 1] if i > 0 else None
            self.pool.cache(held[i], request.block_hashes[i], parent)
        self._num_published[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Release everything the request holds (tail first, so its prefix is evicted last)."""
        held = self._blocks.pop(request.request_id, [])
        self._num_published.pop(request.request_id, None)
        self.pool.release(reversed(held))

    def block_ids(self, request: Request) -> list[int]:
        return [b.block_id for b in self._blocks.get(request.request_id, ())]

    def num_held(self, request: Request) -> int:
        return len(self._blocks.get(request.request_id, ()))

    # ---- KV events (kv_events.py): drained by the engine once per step

    def take_events(self) -> list[BlockEvent]:
        """The pool's raw block events since the last call, oldest first."""
        return self.pool.take_events()

    def cached_block_hashes(self) -> list[BlockHash]:
        """Every key findable in the prefix cache now."""
        return self.pool.cached_hashes()

    def request_snapshot(self) -> None:
        """Make the next take_events() a snapshot (CLEARED, then every cached block): what a
        consumer that lost its place resyncs from."""
        self.pool.request_snapshot()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (an AllBlocksCleared event); False, changing nothing,
        while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    def check_integrity(self, expect_idle: bool = False) -> None:
        self.pool.check_integrity(expect_idle)
        counts: dict[int, int] = {}
        for blocks in self._blocks.values():
            for b in blocks:
                counts[b.block_id] = counts.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == counts.get(block.block_id, 0), block
        if expect_idle:
            assert not self._blocks, f"requests still hold blocks: {list(self._blocks)[:4]}"

    def _num_needed(self, request: Request, num_new_tokens: int, hit: PrefixHit | None) -> int:
        num_hit_tokens = hit.num_tokens if hit is not None else 0
        total = request.num_computed_tokens + num_hit_tokens + num_new_tokens
        num_hit_blocks = len(hit.blocks) if hit is not None else 0
        return self.blocks_for(total) - self.num_held(request) - num_hit_blocks

    def _num_allocatable(self, hit: PrefixHit | None) -> int:
        # A hit block that sits in the free queue stops being allocatable once taken.
        blocks: Sequence[KVBlock] = hit.blocks if hit is not None else ()
        return self.pool.num_free_blocks - sum(1 for b in blocks if b.ref_cnt == 0)

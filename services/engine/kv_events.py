"""KV events (docs/design.md §3): what a worker tells routers about its prefix cache, as data.

Two layers:
    BlockPool --BlockEvent (raw, one per block)--> KVEventPublisher --KVEvent (typed, with
    identity)--> a consumer (the worker's services/worker/kv_event_stream.py, which writes them
    to its Redis Stream for routers: router/kv_events_reader.py).
The pool records raw events as blocks become findable or stop being so; the engine drains them
once per step (`KVCacheManager.take_events()`) into the publisher, which batches one step's raw
events into KVEvents, numbers them and keeps the newest in a bounded ring. Consumers outside the
engine ask EngineCore: `kv_events_after(id)` and `cached_block_hashes()` (a CachedBlocks).

A consumer's index is rebuilt by replaying events in id order:
    BlocksStored   add each block under its parent (the first block's parent is `parent_hash`,
                   each later one's the block before it); every block is full, block_size tokens.
    BlocksRemoved  drop these keys.
    AllBlocksCleared  drop every key of this worker and tier.
Keys are the chained block keys of `baton.kvstore.block_hash` (docs/design.md §1), the same function
the router and the store compute, so an event carries keys only, never token ids.

Nothing here grows without bound: the pool collapses an undrained buffer into a snapshot and the
publisher's ring drops its oldest events (counting them). A consumer that misses events (dropped,
or from an earlier run of the worker) cannot patch its index; it must resync: take a
CachedBlocks and apply only the events after its last_event_id (what routers do, through the
worker's GetCachedBlocks), or replay from an AllBlocksCleared, which
`KVCacheManager.request_snapshot()` makes the engine publish, followed by the whole cache as
BlocksStored.

Pure Python: no I/O, no torch.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import ClassVar, NamedTuple

from baton.kvstore.block_hash import BlockHash


class KVEventKind(enum.Enum):
    """What changed in a prefix cache."""

    STORED = "stored"
    """A full, computed block became findable under its key."""
    REMOVED = "removed"
    """A block's key stopped being findable (evicted)."""
    CLEARED = "cleared"
    """Every key stopped being findable (reset, or the start of a snapshot)."""


class StorageTier(enum.Enum):
    """Where the KV of the blocks an event names lives, fastest first."""

    DEVICE = "device"
    """The engine's own paged KV pool, the blocks attention reads in place: GPU memory on CUDA,
    and the same pool in host memory when the engine runs on CPU. "Device" names the role (the
    tier a request can use with no copy), not the hardware."""
    HOST = "host"
    """A worker's DRAM offload tier: KV copied out of the device pool, loaded back before use."""
    DISK = "disk"
    """SSD (a worker's or the cluster store's): slowest, largest."""


class BlockEvent(NamedTuple):
    """One raw change of a block pool's cache, recorded as it happens (compact: a tuple)."""

    kind: KVEventKind
    block_hash: BlockHash | None
    """The block's key; None for CLEARED."""
    parent_hash: BlockHash | None
    """STORED: the key of the block before it in its sequence (None for a first block)."""


# ---- typed events


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Consecutive blocks of one chain became findable: block_hashes[0]'s parent is
    parent_hash, each later block's parent is the one before it."""

    kind: ClassVar[KVEventKind] = KVEventKind.STORED
    parent_hash: BlockHash | None
    """None: block_hashes[0] is the first block of a sequence."""
    block_hashes: tuple[BlockHash, ...]
    block_size: int
    """Tokens per block (every stored block is full): a router turns matched blocks into
    matched tokens with it, and rejects a worker whose block size differs from its own."""

    @property
    def num_tokens(self) -> int:
        return len(self.block_hashes) * self.block_size


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """These keys stopped being findable."""

    kind: ClassVar[KVEventKind] = KVEventKind.REMOVED
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every key of this worker and tier stopped being findable."""

    kind: ClassVar[KVEventKind] = KVEventKind.CLEARED


KVEventData = BlocksStored | BlocksRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change of one worker's cache in one tier, with its place in that worker's stream."""

    event_id: int
    """1, 2, 3, ... per publisher (worker and tier), no gaps: a consumer that sees a gap, or ids
    starting over (the worker restarted), has missed events and must resync."""
    worker_id: str
    tier: StorageTier
    data: KVEventData

    @property
    def kind(self) -> KVEventKind:
        return self.data.kind


@dataclass(frozen=True, slots=True)
class CachedBlocks:
    """One tier's cache at one moment, with its place in the event stream: exactly what
    replaying that tier's events 1..last_event_id builds, and none after. A consumer that
    resyncs from it applies only the events after last_event_id."""

    tier: StorageTier
    last_event_id: int
    block_hashes: tuple[BlockHash, ...]


def batch_block_events(raw: Iterable[BlockEvent], block_size: int) -> list[KVEventData]:
    """One step's raw events as typed payloads, in order: a run of stored blocks where each is
    the child of the one before becomes one BlocksStored; a run of removals one BlocksRemoved.

    Only adjacent events merge. The manager publishes a request's blocks together and the
    scheduler evicts while allocating, so a step's chains and removals are runs already; keeping
    the order otherwise matters, since "remove X, store X" and "store X, remove X" leave
    different indexes.
    """
    out: list[KVEventData] = []
    run: list[BlockHash] = []
    run_kind: KVEventKind | None = None
    run_parent: BlockHash | None = None

    def flush() -> None:
        if run_kind is KVEventKind.STORED:
            out.append(BlocksStored(run_parent, tuple(run), block_size))
        elif run_kind is KVEventKind.REMOVED:
            out.append(BlocksRemoved(tuple(run)))
        run.clear()

    for event in raw:
        if event.kind is KVEventKind.CLEARED:
            flush()
            run_kind = None
            out.append(AllBlocksCleared())
            continue
        assert event.block_hash is not None, event
        extends = run_kind is event.kind and (
            event.kind is KVEventKind.REMOVED or event.parent_hash == run[-1]
        )
        if not extends:
            flush()
            run_kind, run_parent = event.kind, event.parent_hash
        run.append(event.block_hash)
    flush()
    return out


# ---- the publisher


class KVEventsLost(LookupError):
    """A consumer asked for events the publisher no longer holds (dropped, taken, or from an
    earlier run): its index cannot be patched, it must resync."""


DEFAULT_CAPACITY = 8192
"""Events the ring holds. At 10k tok/s and 16-token blocks a worker stores about 625 blocks a
second, which batch into a few events per step: minutes of history in well under 10 MiB."""


class KVEventPublisher:
    """Numbers one worker's events for one tier and keeps the newest `capacity` of them.

    The engine calls publish() once per step with the pool's raw events; a consumer reads with
    events_since(its last id) or take(). When the ring is full the oldest events are dropped and
    counted (num_dropped) instead of growing: a consumer that far behind has lost its place in
    any case and resyncs from an AllBlocksCleared (see the module docstring).
    """

    def __init__(
        self,
        worker_id: str,
        tier: StorageTier,
        block_size: int,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.worker_id = worker_id
        self.tier = tier
        self.block_size = block_size
        self.capacity = capacity
        self._ring: deque[KVEvent] = deque(maxlen=capacity)
        self._last_id = 0
        self.num_dropped = 0
        """Events pushed out of the full ring before anyone read them."""

    @property
    def last_event_id(self) -> int:
        """Id of the newest event published (0: none yet)."""
        return self._last_id

    @property
    def num_held(self) -> int:
        return len(self._ring)

    def publish(self, raw: Iterable[BlockEvent]) -> list[KVEvent]:
        """Batch one step's raw pool events, number them, keep them; returns the new events."""
        events = []
        for data in batch_block_events(raw, self.block_size):
            self._last_id += 1
            events.append(KVEvent(self._last_id, self.worker_id, self.tier, data))
        self.num_dropped += max(0, len(self._ring) + len(events) - self.capacity)
        self._ring.extend(events)  # maxlen drops from the left
        return events

    def events_since(self, event_id: int) -> list[KVEvent]:
        """Every event after event_id (0: from the first), oldest first.

        Raises KVEventsLost when some of them are no longer held, or event_id is newer than
        anything published (the consumer's cursor belongs to an earlier run of this worker).
        """
        first_held = self._last_id - len(self._ring) + 1
        if event_id > self._last_id or event_id < first_held - 1:
            raise KVEventsLost(
                f"events after {event_id} asked of {self.worker_id}/{self.tier.value}, which "
                f"holds {first_held}..{self._last_id}: resync"
            )
        return list(islice(self._ring, event_id - first_held + 1, None))

    def take(self) -> list[KVEvent]:
        """Every held event, oldest first, removing them (for a single consumer)."""
        events = list(self._ring)
        self._ring.clear()
        return events

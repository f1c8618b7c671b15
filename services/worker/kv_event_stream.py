"""The worker's KV events → its Redis Stream, for routers (docs/design.md §3).

Every poll_interval_s a task takes the events published since the last batch from the engine
(on its thread, between steps: an idle engine answers at once, a busy one after its current
step), packs them into one KVEventBatch and XADDs it to `baton:kv-events:<worker_id>` with an
approximate MAXLEN. The format and how readers use it: router/kv_events_reader.py.

Losses are announced, never hidden. A batch Redis refused (restarting, unreachable) is dropped
and its seq spent, and a ring overflow on the engine (events dropped before they were read)
spends one seq as well and leaves a hole in the event ids: a reader sees the gap and resyncs
from GetCachedBlocks. A failure never ends the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from baton.proto import worker_pb2 as pb
from baton.router.kv_events_reader import DATA_FIELD, EPOCH_FIELD, SEQ_FIELD, stream_key
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.kv_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    CachedBlocks,
    KVEvent,
    StorageTier,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

TIER_TO_PB = {
    StorageTier.DEVICE: pb.KV_TIER_DEVICE,
    StorageTier.HOST: pb.KV_TIER_HOST,
    StorageTier.DISK: pb.KV_TIER_DISK,
}


@dataclass(frozen=True)
class KVEventStreamConfig:
    poll_interval_s: float = 0.02
    """How often new events are taken from the engine."""
    max_stream_len: int = 10_000
    """Batches the stream keeps (approximately): a reader further behind resyncs."""
    max_events_per_batch: int = 1024
    """A longer run of events (a snapshot of a large cache) goes out as several batches."""
    stop_timeout_s: float = 2.0
    """On stop: how long the last flush may take."""


def event_to_pb(event: KVEvent) -> pb.KVEvent:
    msg = pb.KVEvent(event_id=event.event_id, tier=TIER_TO_PB[event.tier])
    data = event.data
    if isinstance(data, BlocksStored):
        msg.stored.block_hashes.extend(data.block_hashes)
        msg.stored.block_size = data.block_size
        if data.parent_hash is not None:
            msg.stored.parent_hash = data.parent_hash
    elif isinstance(data, BlocksRemoved):
        msg.removed.block_hashes.extend(data.block_hashes)
    else:
        assert isinstance(data, AllBlocksCleared), data
        msg.cleared.SetInParent()
    return msg


def cached_blocks_to_pb(
    worker_id: str, epoch: str, block_size: int, tiers: Sequence[CachedBlocks]
) -> pb.CachedBlocks:
    return pb.CachedBlocks(
        worker_id=worker_id,
        epoch=epoch,
        block_size=block_size,
        tiers=[
            pb.TierBlocks(
                tier=TIER_TO_PB[t.tier],
                last_event_id=t.last_event_id,
                block_hashes=list(t.block_hashes),
            )
            for t in tiers
        ],
    )


class KVEventStream:
    """One worker run's batches into its stream: start() after registering, stop() in drain
    (before the engine stops: it asks the engine thread)."""

    def __init__(
        self,
        engine: AsyncEngine,
        redis: Redis,
        worker_id: str,
        epoch: str,
        config: KVEventStreamConfig | None = None,
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.worker_id = worker_id
        self.epoch = epoch
        self.config = config or KVEventStreamConfig()
        self.key = stream_key(worker_id)
        self._last_event_id = 0
        """The newest event taken from the engine (written or lost)."""
        self._seq = 0
        """The last seq spent (written or lost)."""
        self.num_batches_written = 0
        self.num_batches_lost = 0
        self.num_events_lost = 0
        """Events readers will never see in the stream: refused by Redis or dropped unread."""
        self._failing = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the KV event stream already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"kv-events:{self.worker_id}")

    async def stop(self) -> None:
        """Stop polling and write what is left (within stop_timeout_s, best effort)."""
        if self._task is None:
            return
        # The flag as well as the cancel: redis-py can swallow a cancellation that lands as a
        # reply does (redis/redis-py#2028).
        self._stopping = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            async with asyncio.timeout(self.config.stop_timeout_s):
                await self.publish_once()
        except Exception as e:
            logger.info("KV events of %s: last flush skipped (%s)", self.worker_id, e)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the stream must outlive any one failure
                logger.exception("KV events of %s: publishing failed", self.worker_id)
            await asyncio.sleep(self.config.poll_interval_s)

    async def publish_once(self) -> int:
        """Take the new events from the engine and write them; returns the batches written."""
        after = self._last_event_id
        events = await self.engine.call(lambda core: core.kv_events_after(after))
        if not events:
            return 0
        published_unix_s = time.time()
        if events[0].event_id != after + 1:
            # The engine's ring dropped events before they were read: a seq spent on them
            # (and the hole in the ids) sends every reader to a resync.
            lost = events[0].event_id - after - 1
            logger.warning("KV events of %s: %d events dropped unread", self.worker_id, lost)
            self._seq += 1
            self.num_batches_lost += 1
            self.num_events_lost += lost
        self._last_event_id = events[-1].event_id
        written = 0
        step = self.config.max_events_per_batch
        for start in range(0, len(events), step):
            written += await self._write(events[start : start + step], published_unix_s)
        return written

    async def _write(self, events: Sequence[KVEvent], published_unix_s: float) -> int:
        self._seq += 1
        batch = pb.KVEventBatch(
            worker_id=self.worker_id,
            epoch=self.epoch,
            seq=self._seq,
            published_unix_s=published_unix_s,
            events=[event_to_pb(e) for e in events],
        )
        fields: dict[Any, Any] = {
            EPOCH_FIELD: self.epoch,
            SEQ_FIELD: str(self._seq),
            DATA_FIELD: batch.SerializeToString(),
        }
        try:
            await self.redis.xadd(
                self.key, fields, maxlen=self.config.max_stream_len, approximate=True
            )
        except (RedisError, OSError) as e:
            self.num_batches_lost += 1
            self.num_events_lost += len(events)
            if not self._failing:  # once per outage, not once per batch
                logger.warning(
                    "KV events of %s: Redis refused a batch (%s); dropping batches until it "
                    "answers (readers resync)",
                    self.worker_id,
                    e,
                )
                self._failing = True
            return 0
        if self._failing:
            logger.info("KV events of %s: Redis answers again", self.worker_id)
            self._failing = False
        self.num_batches_written += 1
        return 1

"""The KV events reader's resync decisions, against a real Redis with hand-written batches.

`HandWorker` plays a worker: it keeps the truth (its keys and last event id), writes batches to
its stream as the worker does (services/worker/kv_event_stream.py) and answers snapshots. After
every scenario the reader's index must equal the truth, whatever it took to get there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from baton.proto import worker_pb2 as pb
from baton.router.kv_events_reader import (
    KVEventsReader,
    KVEventsReaderConfig,
    ResyncReason,
    Snapshot,
    stream_key,
)
from baton.router.prefix_index import PrefixIndex
from baton.router.registry import WorkerInfo
from baton.services.redis_server import RedisServer

FAST = KVEventsReaderConfig(block_ms=20, resync_backoff_s=0.01, missing_check_interval_s=0.05)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


Body = Callable[[aioredis.Redis], Awaitable[None]]


def with_redis(body: Body) -> Callable[[RedisServer], None]:
    """A test running `body` on its own event loop with a client of an emptied Redis."""

    def test(redis_server: RedisServer) -> None:
        async def main() -> None:
            client = aioredis.Redis.from_url(redis_server.url)
            await client.flushdb()
            try:
                await body(client)
            finally:
                await client.aclose()

        asyncio.run(main())

    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


def info(worker_id: str, started_unix_s: float = 1.0) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address="127.0.0.1:1",
        role="mixed",
        model="m",
        num_kv_blocks=64,
        block_size=16,
        transport="tcp",
        started_unix_s=started_unix_s,
    )


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


class HandWorker:
    """One worker's truth and its stream, written by hand."""

    def __init__(self, redis: aioredis.Redis, worker_id: str, epoch: str = "e1") -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.epoch = epoch
        self.keys: set[bytes] = set()
        self.last_event_id = 0
        self.seq = 0
        self.num_snapshots = 0
        self.fail_snapshots = 0
        self.during_snapshot: Callable[[], Awaitable[None]] | None = None

    def restart(self, epoch: str) -> None:
        self.epoch, self.keys, self.last_event_id, self.seq = epoch, set(), 0, 0

    def store(self, *ids: int) -> pb.KVEvent:
        self.keys.update(key(i) for i in ids)
        return self._event(stored=pb.KVBlocksStored(block_hashes=[key(i) for i in ids]))

    def remove(self, *ids: int) -> pb.KVEvent:
        self.keys.difference_update(key(i) for i in ids)
        return self._event(removed=pb.KVBlocksRemoved(block_hashes=[key(i) for i in ids]))

    def clear(self) -> pb.KVEvent:
        self.keys.clear()
        return self._event(cleared=pb.KVAllBlocksCleared())

    def _event(self, **data: object) -> pb.KVEvent:
        self.last_event_id += 1
        return pb.KVEvent(event_id=self.last_event_id, tier=pb.KV_TIER_DEVICE, **data)  # type: ignore[arg-type]

    async def write(self, *events: pb.KVEvent, seq: int | None = None, entry_id: str = "*") -> None:
        self.seq = self.seq + 1 if seq is None else seq
        batch = pb.KVEventBatch(
            worker_id=self.worker_id,
            epoch=self.epoch,
            seq=self.seq,
            published_unix_s=time.time(),
            events=events,
        )
        fields = {"epoch": self.epoch, "seq": str(self.seq), "data": batch.SerializeToString()}
        await self.redis.xadd(stream_key(self.worker_id), fields, id=entry_id)  # type: ignore[arg-type]

    async def snapshot(self, worker: WorkerInfo) -> Snapshot:
        assert worker.worker_id == self.worker_id
        self.num_snapshots += 1
        if self.fail_snapshots:
            self.fail_snapshots -= 1
            raise ConnectionError("worker unreachable")
        taken = Snapshot(
            self.worker_id,
            self.epoch,
            16,
            {"device": self.last_event_id},
            {"device": frozenset(self.keys)},
        )
        if self.during_snapshot is not None:
            await self.during_snapshot()
        return taken


async def eventually(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert cond()


def in_step(reader: KVEventsReader, worker: HandWorker) -> Callable[[], bool]:
    """The reader has caught up with the worker and agrees with it."""

    def check() -> bool:
        status = reader.status(worker.worker_id)
        return (
            status is not None
            and status.synced
            and status.epoch == worker.epoch
            and status.last_event_ids.get("device", 0) == worker.last_event_id
            and reader.index.keys_of(worker.worker_id).get("device", set()) == worker.keys
        )

    return check


async def started(redis: aioredis.Redis, worker: HandWorker) -> KVEventsReader:
    reader = KVEventsReader(redis, PrefixIndex(), worker.snapshot, FAST)
    reader.set_workers([info(worker.worker_id)])
    await reader.start()
    await eventually(in_step(reader, worker))
    return reader


@with_redis
async def test_a_new_worker_is_synced_from_its_snapshot_then_follows_its_stream(
    client: aioredis.Redis,
) -> None:
    w = HandWorker(client, "w")
    await w.write(w.store(1, 2), w.remove(1))
    reader = await started(client, w)
    assert reader.index.keys_of("w") == {"device": {key(2)}}
    await w.write(w.store(3, 4))
    await w.write(w.remove(2), w.store(5))
    await eventually(in_step(reader, w))
    assert w.num_snapshots == 1
    assert reader.stats.resyncs == {ResyncReason.FIRST_SEEN: 1}
    await reader.stop()


@with_redis
async def test_events_written_while_the_snapshot_is_taken_are_applied_once(
    client: aioredis.Redis,
) -> None:
    """The position is read before the snapshot: a batch that lands during the snapshot and
    holds events on both sides of its id is applied from the snapshot's id on."""
    w = HandWorker(client, "w")
    await w.write(w.store(1))
    pending = [w.store(2), w.remove(1)]  # reflected in the snapshot, not yet in the stream

    async def the_worker_writes_meanwhile() -> None:
        w.during_snapshot = None
        await w.write(*pending, w.store(7))

    w.during_snapshot = the_worker_writes_meanwhile
    reader = await started(client, w)
    assert reader.index.keys_of("w") == {"device": {key(2), key(7)}}
    assert w.num_snapshots == 1
    await reader.stop()


@with_redis
async def test_a_lost_batch_makes_a_seq_gap_and_a_resync(client: aioredis.Redis) -> None:
    w = HandWorker(client, "w")
    reader = await started(client, w)
    await w.write(w.store(1))
    await eventually(in_step(reader, w))
    w.store(2)  # this batch (seq 2) never reached Redis
    w.seq += 1
    await w.write(w.store(3))
    await eventually(in_step(reader, w))
    assert reader.stats.resyncs.get(ResyncReason.SEQ_GAP) == 1
    assert w.num_snapshots == 2
    await reader.stop()


@with_redis
async def test_dropped_events_make_an_event_gap_and_a_resync(client: aioredis.Redis) -> None:
    w = HandWorker(client, "w")
    reader = await started(client, w)
    w.store(1)  # dropped from the worker's ring before it was written: the seqs run on
    await w.write(w.remove(9), w.store(2))
    await eventually(in_step(reader, w))
    assert reader.stats.resyncs.get(ResyncReason.EVENT_GAP) == 1
    assert reader.index.keys_of("w") == {"device": {key(1), key(2)}}
    await reader.stop()


@with_redis
async def test_a_new_epoch_resyncs_and_keeps_nothing_of_the_old_run(
    client: aioredis.Redis,
) -> None:
    w = HandWorker(client, "w")
    await w.write(w.store(1, 2, 3))
    reader = await started(client, w)
    w.restart("e2")
    await w.write(w.store(4))
    await eventually(in_step(reader, w))
    assert reader.index.keys_of("w") == {"device": {key(4)}}
    assert reader.stats.resyncs.get(ResyncReason.EPOCH) == 1
    await reader.stop()


@with_redis
async def test_a_restarted_registry_entry_resyncs_before_any_batch(
    client: aioredis.Redis,
) -> None:
    w = HandWorker(client, "w")
    await w.write(w.store(1, 2))
    reader = await started(client, w)
    w.restart("e2")  # an idle new run: it writes nothing, but its entry is new
    reader.set_workers([info("w", started_unix_s=2.0)])
    await eventually(in_step(reader, w))
    assert reader.index.keys_of("w") == {}
    assert reader.stats.resyncs.get(ResyncReason.WORKER_CHANGED) == 1
    await reader.stop()


@with_redis
async def test_a_stream_trimmed_past_the_cursor_resyncs(client: aioredis.Redis) -> None:
    w = HandWorker(client, "w")
    reader = await started(client, w)
    await w.write(w.store(1))
    await eventually(in_step(reader, w))
    await reader.stop()  # the reader falls behind ...
    for i in range(2, 12):
        await w.write(w.store(i), w.remove(i - 1))
    await client.xtrim(stream_key("w"), maxlen=3, approximate=False)  # ... past the trim
    await reader.start()
    await eventually(in_step(reader, w))
    assert reader.index.keys_of("w") == {"device": {key(11)}}
    assert reader.stats.resyncs.get(ResyncReason.SEQ_GAP) == 1
    await reader.stop()


@with_redis
async def test_a_stream_that_vanished_resyncs(client: aioredis.Redis) -> None:
    """What a Redis restart does to a stream (the restart itself: the slow worker test)."""
    w = HandWorker(client, "w")
    reader = await started(client, w)
    await w.write(w.store(1))
    await eventually(in_step(reader, w))
    await client.delete(stream_key("w"))
    w.store(2)  # its batch was written, then lost with the stream: no later batch tells
    await eventually(lambda: w.num_snapshots == 2)
    await eventually(in_step(reader, w))
    assert reader.stats.resyncs.get(ResyncReason.STREAM_MISSING) == 1
    await w.write(w.store(3), seq=w.seq + 1)  # the new stream goes on with the old seqs
    await eventually(in_step(reader, w))
    await reader.stop()


@with_redis
async def test_a_stream_made_again_with_older_ids_resyncs(client: aioredis.Redis) -> None:
    """A Redis on another clock: the new stream's ids sit below the cursor, so XREAD from it
    would wait for them forever."""
    w = HandWorker(client, "w")
    reader = await started(client, w)
    await w.write(w.store(1), entry_id="99999999999999-0")
    await eventually(in_step(reader, w))
    await client.delete(stream_key("w"))
    await w.write(w.store(2))  # seq 2, at the present time: older than the cursor
    await eventually(in_step(reader, w))
    assert reader.stats.resyncs.get(ResyncReason.STREAM_MISSING) == 1
    await reader.stop()


@with_redis
async def test_an_entry_that_does_not_decode_resyncs(client: aioredis.Redis) -> None:
    w = HandWorker(client, "w")
    reader = await started(client, w)
    await client.xadd(stream_key("w"), {"epoch": "e1", "seq": "1", "data": b"\xff\x00junk"})
    w.seq = 1
    w.store(1)
    await eventually(in_step(reader, w))
    assert reader.stats.resyncs.get(ResyncReason.DECODE_ERROR) == 1
    await reader.stop()


@with_redis
async def test_a_batch_written_twice_is_applied_once(client: aioredis.Redis) -> None:
    w = HandWorker(client, "w")
    reader = await started(client, w)
    stored = w.store(1)
    await w.write(stored)
    await w.write(stored, seq=1)  # a retried XADD
    await w.write(w.remove(1))
    await eventually(in_step(reader, w))
    assert reader.stats.duplicates_skipped == 1
    assert set(reader.stats.resyncs) == {ResyncReason.FIRST_SEEN}
    await reader.stop()


@with_redis
async def test_an_unreachable_worker_is_retried_and_holds_no_keys_meanwhile(
    client: aioredis.Redis,
) -> None:
    w = HandWorker(client, "w")
    w.store(1)
    w.fail_snapshots = 2
    reader = await started(client, w)
    assert w.num_snapshots == 3
    assert reader.stats.snapshot_failures == 2
    await reader.stop()


@with_redis
async def test_workers_that_left_leave_the_index_and_others_stay(
    client: aioredis.Redis,
) -> None:
    a, b = HandWorker(client, "a"), HandWorker(client, "b")
    a.store(1)
    b.store(2)

    async def snapshot(worker: WorkerInfo) -> Snapshot:
        return await (a if worker.worker_id == "a" else b).snapshot(worker)

    reader = KVEventsReader(client, PrefixIndex(), snapshot, FAST)
    reader.set_workers([info("a"), info("b")])
    await reader.start()
    await eventually(lambda: in_step(reader, a)() and in_step(reader, b)())
    await b.write(b.store(3), seq=1)
    await eventually(in_step(reader, b))
    reader.set_workers([info("b")])
    assert reader.index.keys_of("a") == {}
    assert reader.index.workers == ["b"]
    await b.write(b.remove(2))
    await eventually(in_step(reader, b))
    await reader.stop()

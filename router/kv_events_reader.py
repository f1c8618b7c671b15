"""Workers' KV event streams in Redis → the router's PrefixIndex (docs/design.md §3, §4).

The stream (written by services/worker/kv_event_stream.py), one per worker:
    key    baton:kv-events:<worker_id>          capped by an approximate MAXLEN
    entry  epoch  the worker run's id (new at every start)
           seq    the batch's number, 1, 2, 3, ... per epoch, one per batch written *or lost*
           data   a KVEventBatch (proto/worker.proto): worker_id, epoch, seq, a wall-clock
                  timestamp and the events, each with its event_id (1, 2, 3, ... per epoch and
                  tier, no gaps) and tier
Events are applied in order: stored → PrefixIndex.store, removed → remove, cleared → clear.

A worker's view is trusted only while it follows from a snapshot without a hole. It resyncs
(from GetCachedBlocks, through the `snapshot` callable) when the worker is first seen or its
registry entry changed, a batch comes from another epoch, a seq or event_id is skipped (a batch
lost, the stream trimmed past the cursor, the worker's event ring overflowed), the stream
vanished (Redis restarted), or an entry does not decode. A resync
    1. reads the stream's last entry P,
    2. takes the snapshot: keys per tier and the last event_id each reflects,
    3. replaces the worker's index entries with it and reads on after P, applying only events
       past the snapshot's ids (the first must be the very next id).
Any event after the snapshot was made after P was read, so it sits after P: nothing between is
lost or applied twice. Entries with a seq already seen (a retried XADD) are skipped.

One event loop, one XREAD over every synced worker's stream; resyncs run as their own tasks, and
a generation number per worker discards what a superseded read or resync brings back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from baton.proto import worker_pb2 as pb
from baton.router.prefix_index import BlockKey, PrefixIndex
from baton.router.registry import WorkerInfo

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

STREAM_PREFIX = "baton:kv-events:"
EPOCH_FIELD, SEQ_FIELD, DATA_FIELD = "epoch", "seq", "data"
"""The fields of a stream entry."""

TIER_NAMES: Mapping[int, str] = {
    pb.KV_TIER_DEVICE: "device",
    pb.KV_TIER_HOST: "host",
    pb.KV_TIER_DISK: "disk",
}
"""proto KVTier → the PrefixIndex's tier names."""


def stream_key(worker_id: str) -> str:
    return STREAM_PREFIX + worker_id


@dataclass(frozen=True)
class Snapshot:
    """A worker's whole cache at one moment (GetCachedBlocks)."""

    worker_id: str
    epoch: str
    block_size: int
    last_event_ids: Mapping[str, int]
    """Per tier: every event up to this id is reflected in keys_by_tier, none after."""
    keys_by_tier: Mapping[str, frozenset[BlockKey]]


SnapshotFn = Callable[[WorkerInfo], Awaitable[Snapshot]]
"""Asks one worker for its Snapshot (the gateway's GetCachedBlocks call)."""


def snapshot_from_pb(msg: pb.CachedBlocks) -> Snapshot:
    """A GetCachedBlocks reply as a Snapshot; ValueError on a tier this router does not know."""
    ids: dict[str, int] = {}
    keys: dict[str, frozenset[BlockKey]] = {}
    for tier in msg.tiers:
        name = _tier_name(tier.tier)
        ids[name] = tier.last_event_id
        keys[name] = frozenset(tier.block_hashes)
    return Snapshot(msg.worker_id, msg.epoch, msg.block_size, ids, keys)


class ResyncReason(enum.Enum):
    FIRST_SEEN = "first_seen"
    WORKER_CHANGED = "worker_changed"
    """Its registry entry changed (a restart: new start time or address)."""
    EPOCH = "epoch"
    SEQ_GAP = "seq_gap"
    """A batch lost, or the stream trimmed past the cursor."""
    EVENT_GAP = "event_gap"
    """An event_id skipped (the worker's ring overflowed, or a batch lost)."""
    STREAM_MISSING = "stream_missing"
    DECODE_ERROR = "decode_error"


@dataclass(frozen=True)
class AppliedBatch:
    """What the lag hook hears for every batch applied."""

    worker_id: str
    seq: int
    num_events: int
    lag_s: float
    """Wall clock from the worker taking the events from its engine to their being indexed."""


@dataclass(frozen=True)
class WorkerStreamStatus:
    synced: bool
    epoch: str
    last_event_ids: Mapping[str, int]
    """Per tier: the newest event reflected in the index (from the snapshot or applied)."""


@dataclass
class ReaderStats:
    batches_applied: int = 0
    events_applied: int = 0
    events_by_kind: dict[str, int] = field(default_factory=dict)
    """Applied events by kind: "stored", "removed", "cleared"."""
    duplicates_skipped: int = 0
    resyncs: dict[ResyncReason, int] = field(default_factory=dict)
    snapshot_failures: int = 0
    redis_errors: int = 0


@dataclass(frozen=True)
class KVEventsReaderConfig:
    block_ms: int = 100
    """XREAD waits this long for a new entry before looking again (new workers, missing
    streams)."""
    max_entries_per_read: int = 1000
    """Entries one XREAD takes from each stream."""
    snapshot_timeout_s: float = 5.0
    resync_backoff_s: float = 0.2
    """First wait after a failed resync, doubling up to resync_backoff_max_s; also the least
    time between two resyncs of one worker (a worker that keeps breaking its stream)."""
    resync_backoff_max_s: float = 5.0
    missing_check_interval_s: float = 1.0
    """How often the streams are checked for existence (a Redis that restarted lost them)."""


@dataclass
class _Cursor:
    """One worker's place in its stream (mutable; the reader's own)."""

    info: WorkerInfo
    generation: int = 0
    """Bumped by every resync and removal: a read or resync started under an older one is void."""
    synced: bool = False
    epoch: str = ""
    entry_id: bytes = b"0-0"
    """The last entry applied (or the stream's end when the snapshot was taken)."""
    next_seq: int | None = None
    """None: unknown (the stream held none of this epoch at the resync)."""
    last_event_ids: dict[str, int] = field(default_factory=dict)
    last_resync_s: float = float("-inf")
    task: asyncio.Task[None] | None = None


class KVEventsReader:
    """Keeps `index` equal to every known worker's cache; see the module docstring.

    set_workers() says who to follow (the gateway's registry view); start()/stop() run the
    read loop. on_applied, if given, hears every applied batch (lag metrics, benchmarks).
    """

    def __init__(
        self,
        redis: Redis,
        index: PrefixIndex,
        snapshot: SnapshotFn,
        config: KVEventsReaderConfig | None = None,
        on_applied: Callable[[AppliedBatch], None] | None = None,
    ) -> None:
        self.redis = redis
        self.index = index
        self.snapshot = snapshot
        self.config = config or KVEventsReaderConfig()
        self.on_applied = on_applied
        self.stats = ReaderStats()
        self._workers: dict[str, _Cursor] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._last_missing_check_s = 0.0

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("reader already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="kv-events-reader")
        for worker_id, cursor in self._workers.items():
            if not cursor.synced:
                self._spawn_resync(worker_id, cursor)

    async def stop(self) -> None:
        """Stop reading; the index and every synced cursor stay (a later start() reads on)."""
        # The flag as well as the cancel: redis-py's blocking reads can swallow a cancellation
        # that lands as the reply does (redis/redis-py#2028; seen here about 1 in 15 XREADs).
        self._stopping = True
        tasks = [c.task for c in self._workers.values() if c.task is not None]
        for cursor in self._workers.values():
            cursor.task = None
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def set_workers(self, workers: Sequence[WorkerInfo]) -> None:
        """Follow exactly these workers: new ones are synced, those gone leave the index, one
        whose entry changed (restarted) is synced again."""
        given = {w.worker_id: w for w in workers}
        for worker_id in [w for w in self._workers if w not in given]:
            gone = self._workers.pop(worker_id)
            gone.generation += 1
            if gone.task is not None:
                gone.task.cancel()
            self.index.clear(worker_id)
        for worker_id, info in given.items():
            cursor = self._workers.get(worker_id)
            if cursor is None:
                self._workers[worker_id] = _Cursor(info)
                self._resync(worker_id, ResyncReason.FIRST_SEEN)
            elif cursor.info != info:
                cursor.info = info
                self._resync(worker_id, ResyncReason.WORKER_CHANGED)

    def status(self, worker_id: str) -> WorkerStreamStatus | None:
        cursor = self._workers.get(worker_id)
        if cursor is None:
            return None
        return WorkerStreamStatus(cursor.synced, cursor.epoch, dict(cursor.last_event_ids))

    # ---- the read loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff_s = self.config.resync_backoff_s
        while not self._stopping:
            synced = {w: c for w, c in self._workers.items() if c.synced}
            if not synced:
                self._wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that meets its inner wait's end, and stop() would then wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.block_ms / 1000):
                        await self._wake.wait()
                continue
            generations = {w: c.generation for w, c in synced.items()}
            streams: dict[Any, Any] = {stream_key(w): c.entry_id for w, c in synced.items()}
            try:
                reply: Any = await self.redis.xread(
                    streams, count=self.config.max_entries_per_read, block=self.config.block_ms
                )
                await self._check_missing(synced)
            except (RedisError, OSError) as e:
                self.stats.redis_errors += 1
                logger.warning("KV events: reading the streams failed (%s); retrying", e)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, self.config.resync_backoff_max_s)
                continue
            backoff_s = self.config.resync_backoff_s
            if isinstance(reply, dict):  # RESP3 answers a map
                reply = list(reply.items())
            for key, entries in reply or ():
                worker_id = _text(key)[len(STREAM_PREFIX) :]
                cursor = self._workers.get(worker_id)
                for entry_id, fields in entries:
                    if cursor is None or cursor.generation != generations.get(worker_id):
                        break  # left, or resyncing meanwhile: this read is void for it
                    self._apply_entry(worker_id, cursor, entry_id, fields)

    async def _check_missing(self, synced: Mapping[str, _Cursor]) -> None:
        """A stream this reader had entries of that no longer exists, or whose newest entry is
        older than the cursor (made again by a Redis on another clock): Redis lost it, and with
        it perhaps entries not yet read."""
        now = time.monotonic()
        if now - self._last_missing_check_s < self.config.missing_check_interval_s:
            return
        self._last_missing_check_s = now
        watched = [(w, c.generation, c.entry_id) for w, c in synced.items() if c.entry_id != b"0-0"]
        if not watched:
            return
        pipe = self.redis.pipeline(transaction=False)
        for worker_id, _, _ in watched:
            pipe.xrevrange(stream_key(worker_id), count=1)
        newest = await pipe.execute()
        for (worker_id, generation, entry_id), last in zip(watched, newest, strict=True):
            cursor = self._workers.get(worker_id)
            if cursor is None or cursor.generation != generation:
                continue
            if not last or _entry_order(last[0][0]) < _entry_order(entry_id):
                self._resync(worker_id, ResyncReason.STREAM_MISSING)

    def _apply_entry(self, worker_id: str, cursor: _Cursor, entry_id: Any, fields: Any) -> None:
        try:
            batch = _decode(worker_id, fields)
        except ValueError as e:
            logger.warning("KV events of %s: bad entry %s (%s)", worker_id, _text(entry_id), e)
            self._resync(worker_id, ResyncReason.DECODE_ERROR)
            return
        if batch.epoch != cursor.epoch:
            self._resync(worker_id, ResyncReason.EPOCH)
            return
        if cursor.next_seq is not None and batch.seq < cursor.next_seq:
            self.stats.duplicates_skipped += 1  # a retried XADD wrote it twice
            cursor.entry_id = _bytes(entry_id)
            return
        if cursor.next_seq is not None and batch.seq != cursor.next_seq:
            self._resync(worker_id, ResyncReason.SEQ_GAP)
            return
        num_applied = 0
        for event in batch.events:
            tier = TIER_NAMES.get(event.tier)
            if tier is None:
                self._resync(worker_id, ResyncReason.DECODE_ERROR)
                return
            last = cursor.last_event_ids.get(tier, 0)
            if event.event_id <= last:
                continue  # reflected in the snapshot already
            if event.event_id != last + 1:
                self._resync(worker_id, ResyncReason.EVENT_GAP)
                return
            kind = event.WhichOneof("data")
            if kind == "stored":
                self.index.store(worker_id, tier, event.stored.block_hashes)
            elif kind == "removed":
                self.index.remove(worker_id, tier, event.removed.block_hashes)
            elif kind == "cleared":
                self.index.clear(worker_id, tier)
            else:
                self._resync(worker_id, ResyncReason.DECODE_ERROR)
                return
            cursor.last_event_ids[tier] = event.event_id
            self.stats.events_by_kind[kind] = self.stats.events_by_kind.get(kind, 0) + 1
            num_applied += 1
        cursor.entry_id = _bytes(entry_id)
        cursor.next_seq = batch.seq + 1
        self.stats.batches_applied += 1
        self.stats.events_applied += num_applied
        if self.on_applied is not None:
            lag_s = time.time() - batch.published_unix_s
            self.on_applied(AppliedBatch(worker_id, batch.seq, len(batch.events), lag_s))

    # ---- resync -----------------------------------------------------------------------------

    def _resync(self, worker_id: str, reason: ResyncReason) -> None:
        """Stop trusting the worker's stream and rebuild its entries from a snapshot."""
        cursor = self._workers[worker_id]
        cursor.generation += 1
        cursor.synced = False
        self.stats.resyncs[reason] = self.stats.resyncs.get(reason, 0) + 1
        if reason not in (ResyncReason.FIRST_SEEN, ResyncReason.WORKER_CHANGED):
            logger.info("KV events of %s: resync (%s)", worker_id, reason.value)
        self._spawn_resync(worker_id, cursor)

    def _spawn_resync(self, worker_id: str, cursor: _Cursor) -> None:
        if cursor.task is not None:
            cursor.task.cancel()
            cursor.task = None
        if self._task is None:
            return  # not started: start() resyncs every worker not synced
        cursor.task = asyncio.create_task(
            self._resync_until_done(worker_id, cursor, cursor.generation),
            name=f"kv-events-resync:{worker_id}",
        )

    async def _resync_until_done(self, worker_id: str, cursor: _Cursor, generation: int) -> None:
        backoff_s = self.config.resync_backoff_s
        wait_s = cursor.last_resync_s + self.config.resync_backoff_s - time.monotonic()
        while not self._stopping:
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            cursor.last_resync_s = time.monotonic()
            try:
                await self._resync_once(worker_id, cursor, generation)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the worker is down or Redis is: try again later
                self.stats.snapshot_failures += 1
                logger.info("KV events of %s: resync failed (%s); retrying", worker_id, e)
                if cursor.generation != generation:
                    return
                # Its contents are unknown until a snapshot lands: stale keys would only
                # mislead placement (each costs a recompute, §4), so none is kept.
                self.index.clear(worker_id)
                wait_s = backoff_s
                backoff_s = min(2 * backoff_s, self.config.resync_backoff_max_s)

    async def _resync_once(self, worker_id: str, cursor: _Cursor, generation: int) -> None:
        # 1. the stream's position first, 2. then the snapshot: see the module docstring.
        last: Any = await self.redis.xrevrange(stream_key(worker_id), count=1)
        position: bytes = b"0-0"
        position_fields: Mapping[Any, Any] = {}
        if last:
            entry_id, position_fields = last[0]
            position = _bytes(entry_id)
        async with asyncio.timeout(self.config.snapshot_timeout_s):
            snap = await self.snapshot(cursor.info)
        if snap.worker_id != worker_id:
            raise ValueError(f"the snapshot is of {snap.worker_id!r}")
        if cursor.generation != generation or self._stopping:
            return  # superseded meanwhile
        self.index.replace(worker_id, snap.keys_by_tier)
        cursor.epoch = snap.epoch
        cursor.last_event_ids = dict(snap.last_event_ids)
        cursor.entry_id = position
        # The entry at P is of this epoch: the next must follow it (else any seq may come).
        epoch, seq = _field(position_fields, EPOCH_FIELD), _field(position_fields, SEQ_FIELD)
        same_epoch = epoch is not None and _text(epoch) == snap.epoch
        cursor.next_seq = None
        if same_epoch and seq is not None and _text(seq).isdigit():
            cursor.next_seq = int(seq) + 1
        cursor.synced = True
        cursor.task = None
        self._wake.set()


def _decode(worker_id: str, fields: Any) -> pb.KVEventBatch:
    data = _field(fields, DATA_FIELD)
    epoch = _field(fields, EPOCH_FIELD)
    seq = _field(fields, SEQ_FIELD)
    if data is None or epoch is None or seq is None:
        raise ValueError("missing fields")
    batch = pb.KVEventBatch()
    try:
        batch.ParseFromString(_bytes(data))
    except DecodeError as e:
        raise ValueError(f"not a KVEventBatch: {e}") from e
    if batch.worker_id != worker_id or batch.epoch != _text(epoch) or str(batch.seq) != _text(seq):
        raise ValueError("the batch disagrees with its entry")
    return batch


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as something that compares in stream order."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _tier_name(tier: int) -> str:
    name = TIER_NAMES.get(tier)
    if name is None:
        raise ValueError(f"unknown KV tier {tier}")
    return name


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value

"""The prefill → decode handoff as a KV connector (docs/design.md §2: decode owns the destination).

Decode side. A request that arrives with `PullFromPrefill` (the router named a prefill worker)
and misses at least `min_tokens` prompt tokens in the local prefix cache is admitted with every
prompt block allocated (`num_matched_tokens` → the scheduler's asynchronous load). The worker
side then calls `Prefill` on the prefill worker, naming the blocks past the local hit and, per
rank, where they live; the reply carries the first token, sampled there. A failed or timed-out
prefill is reported as a failed load: the request is prefilled locally and never offered again.
An aborted request keeps its blocks until the RPC has returned (the prefill worker may still be
writing into them).

Who may write (docs/design.md §11): each Prefill RPC gets a fresh transfer token, granted on
every rank's transport for exactly the destination's block ids before the RPC is sent, and
revoked when the RPC has ended, on every path (reply, error, deadline, cancellation), and before
the load is reported: once it is, the engine may prefill into those blocks locally or free them.
On tcp the revoke also stops a write still in flight (the prefill worker goes on writing after
our deadline); on the one-sided transports it is bookkeeping (kvstore/transports/grants.py).

Prefill side. A `Prefill` request runs as a one-token request carrying `SendToDecode`. When it
finishes, `request_finished` holds its blocks; the next step's metadata tells the worker side to
write them into the decode worker's blocks (each local rank into the decode rank that holds the
same KV heads), on a thread; when the write ends the blocks are released and the waiting RPC
handler gets the transfer's stats (or its error).

Threads: the scheduler side and `start_load_kv` / `get_finished` run on the engine thread; the
Prefill RPC runs on the worker's event loop and the writes on a thread pool. They hand results
back through a locked queue and wake the engine thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from baton.kvstore.transports.base import (
    KV_LAYOUT,
    KVTransport,
    TransferStats,
    TransportConfig,
    TransportError,
)
from baton.kvstore.transports.grants import new_transfer_token
from baton.kvstore.transports.registry import create_transport
from baton.proto import worker_pb2 as pb
from baton.services.engine.executor import RankKVLayout
from baton.services.engine.kv_connector import (
    FinishedLoad,
    KVConnector,
    KVConnectorMetadata,
    KVConnectorOutput,
)
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.sequence_ids import parse_sequence_id
from baton.services.wire import ChannelPool, logprob_from_pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullFromPrefill:
    """Decode side, per request: the prefill worker that may compute its prompt."""

    address: str
    """host:port of the prefill worker's gRPC server."""
    params: pb.SamplingParams
    """The request's sampling parameters (the first token is sampled on the prefill worker)."""
    cache_salt: str = ""


@dataclass(frozen=True)
class SendToDecode:
    """Prefill side, per request: where its KV goes once computed."""

    destination: pb.KVDestination


@dataclass(frozen=True)
class RemotePrefillConfig:
    worker_id: str
    transport: str = "tcp"
    """KV transport: "tcp" | "nixl" | "mooncake" (kvstore/transports/registry.py)."""
    min_tokens: int = 32
    """Conditional disaggregation: fewer missing prompt tokens than this are prefilled here."""
    prefill_timeout_s: float = 120.0
    """Deadline of one Prefill RPC, compute and transfer included."""
    transport_host: str = "127.0.0.1"
    """Where the transport listens for peers' writes (tcp, mooncake): the worker's bind address;
    0.0.0.0 listens everywhere and advertises this machine's address (cross-host handoff)."""


@dataclass
class Handoff:
    """A decode-side request's remote prefill: when it started and what it cost."""

    started_s: float = field(default_factory=time.monotonic)
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    kv_bytes: int = 0
    kv_ready_s: float | None = None
    """Set once the KV and the first token are here (a successful remote prefill)."""


@dataclass(frozen=True)
class _Load:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    num_cached_tokens: int
    block_ids: tuple[int, ...]
    source: PullFromPrefill


@dataclass(frozen=True)
class _Send:
    request_id: str
    block_ids: tuple[int, ...]
    destination: pb.KVDestination


@dataclass(frozen=True)
class RemotePrefillMetadata(KVConnectorMetadata):
    loads: tuple[_Load, ...] = ()
    """Decode side: Prefill RPCs to start."""
    sends: tuple[_Send, ...] = ()
    """Prefill side: held blocks to write into decode workers."""


class RemotePrefillConnector(KVConnector):
    def __init__(self, config: RemotePrefillConfig, channels: ChannelPool | None = None) -> None:
        self.config = config
        self._channels = channels or ChannelPool()
        # scheduler side (engine thread)
        self._loads: list[_Load] = []
        self._sends: list[_Send] = []
        self._failed: set[str] = set()
        """Requests whose remote prefill failed: prefilled locally from now on."""
        # worker side
        self._layouts: tuple[RankKVLayout, ...] = ()
        self._transports: list[KVTransport] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Future[None]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="baton-kv-send")
        self._lock = threading.Lock()
        self._finished_loads: list[FinishedLoad] = []
        self._finished_saves: list[str] = []
        self._send_results: dict[str, concurrent.futures.Future[TransferStats]] = {}
        self.handoffs: dict[str, Handoff] = {}
        """Decode side: remote prefills by user request id, until the service takes them."""
        self.kv_bytes_sent = 0
        self.kv_bytes_received = 0
        self.on_transfer: Callable[[int, float], None] | None = None
        """Called with (bytes, seconds) after every transfer, from any thread."""

    def bind(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """The worker's event loop (Prefill RPCs run there) and the engine's wake-up call."""
        self._loop = loop
        self._wake = wake

    @property
    def transport_name(self) -> str:
        return self.config.transport

    # ---- scheduler side --------------------------------------------------------------------

    def num_matched_tokens(self, request: Request, num_local_hit_tokens: int) -> int:
        source = request.kv_transfer
        if not isinstance(source, PullFromPrefill) or request.request_id in self._failed:
            return 0
        if request.num_output_tokens > 0:
            return 0  # resumed after preemption: it has outputs, recompute here
        missing = request.num_prompt_tokens - num_local_hit_tokens
        return missing if missing >= max(self.config.min_tokens, 1) else 0

    def after_allocation(
        self, request: Request, block_ids: Sequence[int], num_local_hit_tokens: int, num: int
    ) -> None:
        source = request.kv_transfer
        assert isinstance(source, PullFromPrefill)
        assert num_local_hit_tokens + num == request.num_prompt_tokens, "the whole prompt"
        self._loads.append(
            _Load(
                request.request_id,
                tuple(request.prompt_token_ids),
                num_local_hit_tokens,
                tuple(block_ids),
                source,
            )
        )

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        self._failed.discard(request.request_id)
        target = request.kv_transfer
        if not isinstance(target, SendToDecode):
            return False
        if request.status is RequestStatus.FINISHED_ABORTED:
            self._resolve_send(request.request_id, error=TransportError("prefill was aborted"))
            return False
        self._sends.append(_Send(request.request_id, tuple(block_ids), target.destination))
        return True

    def build_metadata(self) -> KVConnectorMetadata | None:
        if not self._loads and not self._sends:
            return None
        meta = RemotePrefillMetadata(tuple(self._loads), tuple(self._sends))
        self._loads, self._sends = [], []
        return meta

    # ---- worker side -----------------------------------------------------------------------

    def register_kv_caches(
        self, layouts: Sequence[RankKVLayout], kv_caches: Sequence[torch.Tensor]
    ) -> None:
        assert not self._transports, "register_kv_caches is called once"
        self._layouts = tuple(layouts)
        for layout, kv in zip(layouts, kv_caches, strict=True):
            name = self.config.worker_id
            if len(layouts) > 1:
                name = f"{name}/rank{layout.rank}"
            config = TransportConfig(host=self.config.transport_host)
            self._transports.append(create_transport(self.config.transport, kv, name, config))

    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        if not isinstance(metadata, RemotePrefillMetadata):
            return
        for send in metadata.sends:
            self._pool.submit(self._send, send)
        for load in metadata.loads:
            user_request = parse_sequence_id(load.request_id)[0]
            self.handoffs.setdefault(user_request, Handoff())
            if self._loop is None:
                logger.error("no event loop bound: prefilling %s locally", load.request_id)
                self._finish_load(FinishedLoad(load.request_id, ok=False))
                continue
            self._loop.call_soon_threadsafe(self._spawn, load)

    def get_finished(self) -> KVConnectorOutput:
        with self._lock:
            loads, self._finished_loads = self._finished_loads, []
            saves, self._finished_saves = self._finished_saves, []
        return KVConnectorOutput(tuple(loads), tuple(saves))

    def close(self) -> None:
        """Wait for writes in flight, then close the transports."""
        self._pool.shutdown(wait=True)
        for transport in self._transports:
            transport.close()
        self._transports = []

    async def aclose(self) -> None:
        """close(), and the channels to prefill workers (on the loop they were opened on)."""
        await asyncio.to_thread(self.close)
        await self._channels.close()

    # ---- what the worker's service asks ----------------------------------------------------

    def check_destination(self, dest: pb.KVDestination) -> str | None:
        """Why this worker cannot write into `dest` (None: it can)."""
        if dest.transport != self.config.transport:
            return (
                f"destination wants transport {dest.transport!r}; "
                f"this worker has {self.config.transport!r}"
            )
        for layout in self._layouts:
            if _matching_rank(dest, layout) is None:
                have = [(r.kv_head_start, r.num_kv_heads) for r in dest.ranks]
                return (
                    f"no decode rank holds KV heads {list(layout.kv_heads)} of prefill rank "
                    f"{layout.rank} (decode ranks hold (start, count) {have}): the two workers' "
                    "tensor-parallel layouts differ"
                )
        if not dest.transfer_token:
            # Refused before the prefill is computed: no decode worker accepts a tokenless write.
            return "destination carries no transfer token (docs/design.md §11)"
        return None

    def expect_send(self, request_id: str) -> concurrent.futures.Future[TransferStats]:
        """Prefill side: a future that resolves when `request_id`'s blocks have been written."""
        future: concurrent.futures.Future[TransferStats] = concurrent.futures.Future()
        with self._lock:
            self._send_results[request_id] = future
        return future

    def forget_send(self, request_id: str) -> None:
        with self._lock:
            self._send_results.pop(request_id, None)

    def take_handoff(self, user_request_id: str) -> Handoff | None:
        return self.handoffs.pop(user_request_id, None)

    def destination(self, load: _Load) -> pb.KVDestination:
        """Decode side: where the prefill worker writes `load`'s missing blocks, rank by rank,
        under a fresh transfer token granted on every rank for exactly those blocks.

        The caller owns the grant: `revoke(dest.transfer_token)` once no write may land any more.
        """
        spec = self._layouts[0].spec
        block_size = spec.block_shape[0]
        first = load.num_cached_tokens // block_size
        block_ids = list(load.block_ids[first:])
        token = new_transfer_token()
        try:
            for transport in self._transports:
                transport.grant(token, block_ids)
        except BaseException:
            self.revoke(token)
            raise
        return pb.KVDestination(
            worker_id=self.config.worker_id,
            transport=self.config.transport,
            block_size=block_size,
            first_block_index=first,
            block_ids=block_ids,
            layout=KV_LAYOUT,
            dtype=spec.dtype,
            transfer_token=token,
            ranks=[
                pb.KVRankDestination(
                    rank=layout.rank,
                    kv_head_start=layout.kv_head_start,
                    num_kv_heads=layout.num_kv_heads,
                    kv_shape=list(layout.spec.shape),
                    transport_metadata=transport.metadata(),
                )
                for layout, transport in zip(self._layouts, self._transports, strict=True)
            ],
        )

    def revoke(self, token: str) -> None:
        """Decode side: end a destination's grant on every rank (idempotent).

        On tcp it waits for a segment being scattered under the token (about a millisecond).
        """
        for transport in self._transports:
            transport.revoke(token)

    # ---- decode side: the Prefill RPC (event loop) -------------------------------------------

    def _spawn(self, load: _Load) -> None:
        task = asyncio.ensure_future(self._remote_prefill(load))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _remote_prefill(self, load: _Load) -> None:
        source = load.source
        handoff = self.handoffs.setdefault(parse_sequence_id(load.request_id)[0], Handoff())
        handoff.started_s = time.monotonic()
        destination = self.destination(load)
        try:
            resp = await self._channels.stub(source.address).Prefill(
                pb.PrefillRequest(
                    request_id=load.request_id,
                    prompt_token_ids=list(load.prompt_token_ids),
                    params=source.params,
                    cache_salt=source.cache_salt,
                    destination=destination,
                ),
                timeout=self.config.prefill_timeout_s,
            )
        except Exception as e:  # any failure of the RPC costs a local prefill, not the request
            if isinstance(e, grpc.aio.AioRpcError):
                why = f"{e.code().name}: {e.details()}"
            else:
                why = repr(e)
            logger.warning(
                "remote prefill of %s on %s failed (%s): prefilling locally",
                load.request_id,
                source.address,
                why,
            )
            self._failed.add(load.request_id)
            resp = None
        finally:
            # Before the load is reported (below): from then on the blocks may be prefilled here
            # or freed, and no write of this transfer may land in them. Cancellation too.
            self.revoke(destination.transfer_token)
        if resp is None:
            self._finish_load(FinishedLoad(load.request_id, ok=False))
            return
        handoff.prefill_s = resp.prefill_s
        handoff.transfer_s = resp.transfer_s
        handoff.kv_bytes = resp.kv_bytes
        handoff.kv_ready_s = time.monotonic()
        self.kv_bytes_received += resp.kv_bytes
        if self.on_transfer is not None:
            self.on_transfer(resp.kv_bytes, resp.transfer_s)
        logprob = logprob_from_pb(resp.first_logprob) if resp.HasField("first_logprob") else None
        self._finish_load(FinishedLoad(load.request_id, True, resp.first_token_id, logprob))

    def _finish_load(self, load: FinishedLoad) -> None:
        with self._lock:
            self._finished_loads.append(load)
        self._wake()

    # ---- prefill side: the write (thread pool) -----------------------------------------------

    def _send(self, send: _Send) -> None:
        dest = send.destination
        first = dest.first_block_index
        src = list(send.block_ids[first : first + len(dest.block_ids)])
        total = TransferStats(0, 0.0)
        error: BaseException | None = None
        try:
            for layout, transport in zip(self._layouts, self._transports, strict=True):
                rank = _matching_rank(dest, layout)
                if rank is None:
                    raise TransportError(f"no decode rank holds KV heads {list(layout.kv_heads)}")
                stats = transport.write_blocks(
                    rank.transport_metadata,
                    send.request_id,
                    src,
                    list(dest.block_ids),
                    token=dest.transfer_token,
                )
                total = TransferStats(
                    total.num_bytes + stats.num_bytes, max(total.seconds, stats.seconds)
                )
        except Exception as e:  # any failure of the write fails the RPC, not the worker
            error = e
        else:
            self.kv_bytes_sent += total.num_bytes
            if self.on_transfer is not None:
                self.on_transfer(total.num_bytes, total.seconds)
        # The blocks are released only now that no thread reads them any more.
        with self._lock:
            self._finished_saves.append(send.request_id)
        self._resolve_send(send.request_id, total, error)
        self._wake()

    def _resolve_send(
        self,
        request_id: str,
        stats: TransferStats | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            future = self._send_results.pop(request_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert stats is not None
            future.set_result(stats)


def _matching_rank(dest: pb.KVDestination, layout: RankKVLayout) -> pb.KVRankDestination | None:
    """The decode rank holding exactly the KV heads of this prefill rank."""
    rank: pb.KVRankDestination
    for rank in dest.ranks:
        if (rank.kv_head_start, rank.num_kv_heads) == (layout.kv_head_start, layout.num_kv_heads):
            return rank
    return None

"""The worker's gRPC service: Generate (stream), Prefill (KV handoff), Abort, Health, load.

Roles: "mixed" serves whole requests; "decode" also asks a prefill worker to compute a prompt
(when the gateway named one and enough of the prompt misses its prefix cache) and receives the
KV straight into the blocks it allocated; "prefill" computes prompts and writes their KV into a
decode worker's blocks (it can serve Generate too, which the router does not ask of it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from baton.kvstore.transports.base import KVTransport
from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pb_grpc
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.step_io import RemotePrefillStart
from baton.services.worker.convert import (
    delta_to_pb,
    logprob_from_pb,
    logprob_to_pb,
    params_from_pb,
)

logger = logging.getLogger(__name__)


class WorkerObserver(Protocol):
    """Receives the worker's per-request observations (the metrics feed implements it)."""

    def on_first_token(self, ttft: pb.TtftBreakdown, num_prompt_tokens: int) -> None: ...
    def on_tokens(self, num_tokens: int) -> None: ...
    def on_transfer(self, num_bytes: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    worker_id: str
    role: str = "mixed"
    """"prefill" | "decode" | "mixed"."""
    model_id: str = ""
    remote_prefill_min_tokens: int = 32
    """Conditional disaggregation: fewer missing prompt tokens than this are prefilled here."""
    prefill_timeout_s: float = 120.0
    max_queued_requests: int = 256
    """Refuse new requests (RESOURCE_EXHAUSTED → HTTP 429) while this many wait to be admitted."""


@dataclass
class _Handoff:
    """A decode-side request's remote prefill: where from, and what it cost."""

    source: pb.GenerateRequest
    received_s: float = field(default_factory=time.monotonic)
    started_s: float | None = None
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    kv_ready_s: float | None = None
    kv_bytes: int = 0
    remote: bool = False


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self, engine: AsyncEngine, config: ServiceConfig, transport: KVTransport | None
    ) -> None:
        self.engine = engine
        self.config = config
        self.transport = transport
        self.draining = False
        self.kv_bytes_sent = 0
        self.kv_bytes_received = 0
        self._handoffs: dict[str, _Handoff] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.observer: WorkerObserver | None = None
        engine.on_remote_prefill = self._remote_prefill

    # ---- Generate --------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        if self.engine.stats().num_waiting >= self.config.max_queued_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.config.max_queued_requests} requests are already queued on this worker",
            )
        try:
            params = params_from_pb(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remote_min = None
        handoff = _Handoff(request)
        if request.HasField("prefill") and request.prefill.address and self.transport:
            remote_min = self.config.remote_prefill_min_tokens
        self._handoffs[request.request_id] = handoff
        first = True
        try:
            stream = self.engine.generate(
                request.request_id,
                list(request.prompt_token_ids),
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
                remote_prefill_min_tokens=remote_min,
            )
            async for outs in stream:
                msg = pb.GenerateResponse(
                    request_id=request.request_id, sequences=[delta_to_pb(o) for o in outs]
                )
                if first:
                    first = False
                    msg.num_prompt_tokens = len(request.prompt_token_ids)
                    msg.num_cached_tokens = outs[0].num_cached_tokens
                    msg.prefilled_remotely = handoff.remote
                    msg.kv_bytes_received = handoff.kv_bytes
                    msg.ttft.CopyFrom(self._ttft(request, handoff, outs[0].first_scheduled_s))
                    if self.observer is not None:
                        self.observer.on_first_token(msg.ttft, msg.num_prompt_tokens)
                if self.observer is not None:
                    self.observer.on_tokens(sum(len(o.new_token_ids) for o in outs))
                yield msg
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._handoffs.pop(request.request_id, None)

    def _ttft(
        self, request: pb.GenerateRequest, h: _Handoff, scheduled_s: float | None
    ) -> pb.TtftBreakdown:
        now = time.monotonic()
        admitted = h.started_s or scheduled_s or h.received_s
        routing = 0.0
        if request.arrival_unix_s and request.routed_unix_s:
            routing = max(request.routed_unix_s - request.arrival_unix_s, 0.0)
        if h.remote and h.kv_ready_s is not None:
            return pb.TtftBreakdown(
                queue_s=admitted - h.received_s,
                routing_s=routing,
                prefill_s=h.prefill_s,
                transfer_s=h.transfer_s,
                first_decode_s=max(now - h.kv_ready_s, 0.0),
            )
        return pb.TtftBreakdown(
            queue_s=max(admitted - h.received_s, 0.0),
            routing_s=routing,
            prefill_s=max(now - admitted, 0.0),
        )

    # ---- decode side of the handoff --------------------------------------------------------

    async def _remote_prefill(self, start: RemotePrefillStart) -> None:
        seq_id = start.request_id
        handoff = self._handoffs.get(seq_id.rpartition("#")[0] or seq_id) or self._handoffs.get(
            seq_id
        )
        if handoff is None or self.transport is None:
            await self.engine.remote_kv_failed(seq_id)
            return
        handoff.started_s = time.monotonic()
        source = handoff.source
        kv = self.engine.core.runner.kv_cache
        block_size = kv.shape[3]
        first_block = start.num_cached_tokens // block_size
        dest = pb.KVDestination(
            worker_id=self.config.worker_id,
            transport=self.transport.name,
            transport_metadata=self.transport.metadata(),
            block_size=block_size,
            first_block_index=first_block,
            block_ids=list(start.block_ids[first_block:]),
            layout="LT2BSHD",
            dtype=str(kv.dtype).removeprefix("torch."),
            kv_shape=list(kv.shape),
        )
        params = source.params
        prefill = pb.PrefillRequest(
            request_id=seq_id,
            prompt_token_ids=list(start.prompt_token_ids),
            params=params,
            cache_salt=source.cache_salt,
            destination=dest,
        )
        stub = pb_grpc.WorkerStub(self._channel(source.prefill.address))  # type: ignore[no-untyped-call]
        try:
            resp = await stub.Prefill(prefill, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as e:
            logger.warning(
                "remote prefill of %s on %s failed (%s: %s): prefilling locally",
                seq_id,
                source.prefill.address,
                e.code().name,
                e.details(),
            )
            await self.engine.remote_kv_failed(seq_id)
            return
        handoff.remote = True
        handoff.prefill_s = resp.prefill_s
        handoff.transfer_s = resp.transfer_s
        handoff.kv_bytes = resp.kv_bytes
        handoff.kv_ready_s = time.monotonic()
        self.kv_bytes_received += resp.kv_bytes
        if self.observer is not None:
            self.observer.on_transfer(resp.kv_bytes, resp.transfer_s)
        logprob = logprob_from_pb(resp.first_logprob) if resp.HasField("first_logprob") else None
        await self.engine.remote_kv_ready(seq_id, resp.first_token_id, logprob)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    # ---- prefill side of the handoff -------------------------------------------------------

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        dest = request.destination
        if self.transport is None or dest.transport != self.transport.name:
            have = self.transport.name if self.transport else "none"
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"destination wants transport {dest.transport!r}; this worker has {have!r}",
            )
        assert self.transport is not None
        try:
            params = params_from_pb(request.params)
            params = dataclasses.replace(
                params, n=1, max_tokens=1, min_tokens=min(params.min_tokens, 1)
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        seq_id = f"{request.request_id}@prefill"
        t0 = time.monotonic()
        last = None
        try:
            async for outs in self.engine.generate(
                seq_id,
                list(request.prompt_token_ids),
                params,
                cache_salt=request.cache_salt or None,
                hold_blocks=True,
            ):
                last = outs[-1]
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if last is None or last.finish_reason == "abort":
            await context.abort(grpc.StatusCode.ABORTED, "prefill was aborted")
        assert last is not None
        prefill_s = time.monotonic() - t0
        held = await self.engine.call(lambda core: core.scheduler.held_block_ids(seq_id))
        first = dest.first_block_index
        src = list(held[first : first + len(dest.block_ids)])
        transport = self.transport
        transfer = asyncio.ensure_future(
            asyncio.to_thread(
                transport.write_blocks,
                dest.transport_metadata,
                request.request_id,
                src,
                list(dest.block_ids),
            )
        )

        def release(_: object) -> None:
            # Only once the bytes are out (even if this RPC was cancelled meanwhile): until then
            # the transport thread reads these blocks.
            task = asyncio.ensure_future(
                self.engine.call(lambda core: core.scheduler.release_held(seq_id))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        transfer.add_done_callback(release)
        try:
            stats = await asyncio.shield(transfer)
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {e}")
        self.kv_bytes_sent += stats.num_bytes
        if self.observer is not None:
            self.observer.on_transfer(stats.num_bytes, stats.seconds)
        resp = pb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=last.new_token_ids[-1],
            kv_bytes=stats.num_bytes,
            prefill_s=prefill_s,
            transfer_s=stats.seconds,
            num_cached_tokens=last.num_cached_tokens,
        )
        if last.new_logprobs:
            resp.first_logprob.CopyFrom(logprob_to_pb(last.new_logprobs[-1]))
        return resp

    # ---- control ---------------------------------------------------------------------------

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        self.engine.abort(list(request.request_ids))
        return pb.AbortResponse(num_aborted=len(request.request_ids))

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        return pb.HealthResponse(
            status="draining" if self.draining else "serving",
            worker_id=self.config.worker_id,
            role=self.config.role,
            model=self.config.model_id,
        )

    async def GetLoadStats(
        self, request: pb.LoadStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadStats:
        s = self.engine.stats()
        return pb.LoadStats(
            worker_id=self.config.worker_id,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_outstanding_tokens=s.num_outstanding_tokens,
            kv_cache_usage=s.kv_cache_usage,
            num_kv_blocks=s.num_kv_blocks,
            num_free_kv_blocks=round((1.0 - s.kv_cache_usage) * s.num_kv_blocks),
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

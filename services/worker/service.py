"""The worker's gRPC service: RPC glue around one AsyncEngine.

Generate (stream), Prefill (compute a prompt and write its KV into a decode worker's blocks),
Abort, Health, load. The prefill → decode handoff itself is the engine's KV connector
(connectors/remote_prefill.py): Generate only tells the engine which prefill worker may compute
the prompt, Prefill only runs a one-token request that the connector sends when it finishes.
Roles: "mixed" serves whole requests; "decode" may have prompts prefilled elsewhere; "prefill"
computes prompts for decode workers (it can serve Generate too, which the router does not ask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pb_grpc
from baton.services.cluster_auth import CALLER_METADATA_KEY
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.engine_core import EngineCore
from baton.services.engine.sampling_params import SamplingParams
from baton.services.wire import delta_to_pb, logprob_to_pb, params_from_pb
from baton.services.worker.admission import Admission
from baton.services.worker.connectors.remote_prefill import (
    Handoff,
    PullFromPrefill,
    RemotePrefillConnector,
    SendToDecode,
)
from baton.services.worker.kv_event_stream import cached_blocks_to_pb

logger = logging.getLogger(__name__)


class WorkerObserver(Protocol):
    """Receives the worker's per-request observations (the metrics feed implements it)."""

    def on_first_token(self, ttft: pb.TtftBreakdown, num_prompt_tokens: int) -> None: ...
    def on_tokens(self, num_tokens: int) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    worker_id: str
    role: str = "mixed"
    """"prefill" | "decode" | "mixed"."""
    model_id: str = ""
    max_queued_requests: int = 256
    """Refuse a request (RESOURCE_EXHAUSTED → HTTP 429) whose sequences would make more than
    this many wait to be admitted; past half of it, also one from a caller that holds more than
    its fair share of the worker's sequences (callers: cluster_auth.CALLER_METADATA_KEY)."""
    max_n: int = 128
    """Most sequences one request may ask for (the gateway's limit too)."""
    epoch: str = ""
    """This run of the worker (new at every start), in its KV events and GetCachedBlocks."""


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        config: ServiceConfig,
        connector: RemotePrefillConnector | None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.connector = connector
        self.draining = False
        self.observer: WorkerObserver | None = None
        self.admission = Admission(config.max_queued_requests)

    # ---- Generate --------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        try:
            params = params_from_pb(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if params.n > self.config.max_n:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"n must be between 1 and {self.config.max_n}, got {params.n}",
            )
        caller = _caller(context)
        stats = self.engine.stats()  # the engine thread's last snapshot; admitted since: held
        waiting = max(stats.num_waiting, self.admission.total - stats.num_running)
        refusal = self.admission.refusal(caller, params.n, waiting)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        self.admission.add(caller, params.n)
        try:
            async for msg in self._generate(request, params):
                yield msg
        except ValueError as e:  # raised before the first message: a request the engine refuses
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.admission.remove(caller, params.n)

    async def _generate(
        self, request: pb.GenerateRequest, params: SamplingParams
    ) -> AsyncIterator[pb.GenerateResponse]:
        source = None
        if request.HasField("prefill") and request.prefill.address and self.connector:
            source = PullFromPrefill(request.prefill.address, request.params, request.cache_salt)
        received_s = time.monotonic()
        first = True
        try:
            stream = self.engine.generate(
                request.request_id,
                list(request.prompt_token_ids),
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
                kv_transfer=source,
                resumed_output_token_ids=list(request.resume_output_token_ids),
            )
            async for outs in stream:
                msg = pb.GenerateResponse(
                    request_id=request.request_id, sequences=[delta_to_pb(o) for o in outs]
                )
                if first:
                    first = False
                    handoff = self._take_handoff(request.request_id)
                    msg.num_prompt_tokens = len(request.prompt_token_ids)
                    msg.num_cached_tokens = outs[0].num_cached_tokens
                    msg.prefilled_remotely = handoff is not None
                    msg.kv_bytes_received = handoff.kv_bytes if handoff else 0
                    ttft = _ttft(request, received_s, outs[0].first_scheduled_s, handoff)
                    msg.ttft.CopyFrom(ttft)
                    if self.observer is not None:
                        self.observer.on_first_token(msg.ttft, msg.num_prompt_tokens)
                if self.observer is not None:
                    self.observer.on_tokens(sum(len(o.new_token_ids) for o in outs))
                yield msg
        finally:
            self._take_handoff(request.request_id)

    def _take_handoff(self, request_id: str) -> Handoff | None:
        """The request's remote prefill, if it had a successful one."""
        if self.connector is None:
            return None
        handoff = self.connector.take_handoff(request_id)
        return handoff if handoff is not None and handoff.kv_ready_s is not None else None

    # ---- Prefill (for a decode worker) -----------------------------------------------------

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        connector = self.connector
        if connector is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this worker has no KV transport"
            )
        assert connector is not None
        problem = connector.check_destination(request.destination)
        if problem is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        try:
            params = params_from_pb(request.params)
            params = dataclasses.replace(
                params, n=1, max_tokens=1, min_tokens=min(params.min_tokens, 1)
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        seq_id = f"{request.request_id}@prefill"
        sent = connector.expect_send(seq_id)
        t0 = time.monotonic()
        last = None
        try:
            async for outs in self.engine.generate(
                seq_id,
                list(request.prompt_token_ids),
                params,
                cache_salt=request.cache_salt or None,
                kv_transfer=SendToDecode(request.destination),
            ):
                last = outs[-1]
        except ValueError as e:
            connector.forget_send(seq_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if last is None or last.finish_reason == "abort":
            connector.forget_send(seq_id)
            await context.abort(grpc.StatusCode.ABORTED, "prefill was aborted")
        assert last is not None
        prefill_s = time.monotonic() - t0
        try:
            # Shielded: if this RPC is cancelled the write goes on, and the engine releases the
            # blocks only once it has ended.
            stats = await asyncio.shield(asyncio.wrap_future(sent))
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {e}")
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
            draining=self.draining,
        )

    async def GetCachedBlocks(
        self, request: pb.CachedBlocksRequest, context: grpc.aio.ServicerContext
    ) -> pb.CachedBlocks:
        """The prefix cache whole, with the last KV event it reflects (a router resyncs)."""
        cached = await self.engine.call(EngineCore.cached_block_hashes)
        return cached_blocks_to_pb(
            self.config.worker_id, self.config.epoch, self.engine.core.block_size, [cached]
        )


def _caller(context: grpc.aio.ServicerContext) -> str:
    """Who calls: the caller id the cluster's clients send, else the peer's host."""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_METADATA_KEY:
            return str(value)
    peer: str = context.peer() or ""
    return peer.rpartition(":")[0] or peer


def _ttft(
    request: pb.GenerateRequest,
    received_s: float,
    scheduled_s: float | None,
    handoff: Handoff | None,
) -> pb.TtftBreakdown:
    now = time.monotonic()
    admitted = scheduled_s or received_s
    routing = 0.0
    if request.arrival_unix_s and request.routed_unix_s:
        routing = max(request.routed_unix_s - request.arrival_unix_s, 0.0)
    if handoff is not None and handoff.kv_ready_s is not None:
        return pb.TtftBreakdown(
            queue_s=max(admitted - received_s, 0.0),
            routing_s=routing,
            prefill_s=handoff.prefill_s,
            transfer_s=handoff.transfer_s,
            first_decode_s=max(now - handoff.kv_ready_s, 0.0),
        )
    return pb.TtftBreakdown(
        queue_s=max(admitted - received_s, 0.0),
        routing_s=routing,
        prefill_s=max(now - admitted, 0.0),
    )

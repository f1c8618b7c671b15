"""The gateway's backend over the cluster: router placement, then gRPC to the decode worker.

The decode worker owns the request (docs/design.md §2): the gateway sends Generate to it, naming the
prefill worker the router chose; the decode worker decides (conditional disaggregation) whether
to use it. Load for the router comes from each worker's GetLoadStats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from baton.proto import worker_pb2 as pb
from baton.router.kv_events_reader import KVEventsReader, Snapshot, snapshot_from_pb
from baton.router.kv_policy import RouteDecision
from baton.router.policy import DEFAULT_POLICY, NoWorkerAvailable, WorkerLoad
from baton.router.prefix_index import PrefixIndex
from baton.router.registry import WorkerInfo, connect
from baton.router.router import FirstTokenReport, Router
from baton.services.cluster_auth import REDIS_URL_ENV, cluster_token_from_env
from baton.services.engine.sequence_ids import parse_sequence_id
from baton.services.gateway.backend import (
    Backend,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    InvalidRequest,
)
from baton.services.gateway.deadlines import StreamDeadlines
from baton.services.gateway.replay import StreamReplay
from baton.services.metrics import Metrics
from baton.services.wire import ChannelPool

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
"""Placements tried for one request: its first, and one per worker that failed under it."""


class GrpcBackend(Backend):
    def __init__(
        self,
        redis_url: str,
        model: str | None = None,
        policy: str = DEFAULT_POLICY,
        deadlines: StreamDeadlines | None = None,
        token: str | None = None,
        metrics: Metrics | None = None,
    ):
        """redis_url: the registry ("": $BATON_REDIS_URL). token: the cluster token (None:
        $BATON_CLUSTER_TOKEN), sent on every call and only to workers whose registry entry
        proves it (services/cluster_auth.py). metrics: where routing decisions are counted."""
        self.deadlines = deadlines or StreamDeadlines()
        redis_url = redis_url or os.environ.get(REDIS_URL_ENV, "")
        if not redis_url:
            raise ValueError(f"no Redis for the registry: give its URL or set ${REDIS_URL_ENV}")
        self._redis = connect(redis_url)
        if token is None:
            token = cluster_token_from_env()
        caller = f"gateway-{socket.gethostname()}-{os.getpid()}"
        self._channels = ChannelPool(token=token, caller=caller)
        self.metrics = metrics
        self.index = PrefixIndex()
        self.router = Router(
            self._redis,
            self._fetch_load,
            model=model,
            policy=policy,
            token=token,
            index=self.index,
        )
        self.events = KVEventsReader(self._redis, self.index, self._fetch_snapshot)
        self.router.on_workers = self.events.set_workers
        self._routes: dict[str, str] = {}
        """request id → its routing decision's header value, while it streams."""
        self._owners: dict[str, str] = {}
        """request id → address of the decode worker serving it (for abort)."""
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.router.start()
            await self.events.start()

    async def _fetch_snapshot(self, worker: WorkerInfo) -> Snapshot:
        msg = await self._channels.stub(worker.address).GetCachedBlocks(
            pb.CachedBlocksRequest(), timeout=10.0
        )
        return snapshot_from_pb(msg)

    def route(self, request_id: str) -> str:
        return self._routes.get(request_id, "")

    async def _fetch_load(self, worker: WorkerInfo) -> WorkerLoad:
        s = await self._channels.stub(worker.address).GetLoadStats(
            pb.LoadStatsRequest(), timeout=1.0
        )
        return WorkerLoad(
            worker_id=worker.worker_id,
            num_outstanding_tokens=s.num_outstanding_tokens,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            draining=s.draining,
        )

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream from the decode worker the router picks, surviving its failure.

        A worker that is unreachable before the first message (dead, restarting, its registry
        entry not yet expired) is marked unhealthy and the request placed again: nothing was
        streamed, so nothing is lost. One that fails after it (killed, frozen past a deadline,
        cut off by its drain) hands the stream to another worker by token replay (replay.py):
        the client's stream goes on. Up to MAX_ATTEMPTS placements per request."""
        await self.start()
        try:
            async with contextlib.aclosing(self._generate(request)) as stream:
                async for msg in stream:
                    yield msg
        finally:
            self._routes.pop(request.request_id, None)

    async def _generate(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        replay = StreamReplay(request)
        attempt_request = request
        for attempt in range(1, MAX_ATTEMPTS + 1):
            started = False
            try:
                # aclosing: a client that leaves closes this generator, and the inner one must
                # close now too (it cancels the worker's call), not when it is collected.
                async with contextlib.aclosing(self._generate_once(attempt_request)) as stream:
                    async for msg in stream:
                        started = True
                        yield replay.deliver(msg)
                return
            except BackendUnavailable as e:
                if attempt == MAX_ATTEMPTS or (replay.delivered and not replay.can_resume()):
                    raise
                if replay.delivered or started:
                    attempt_request = replay.resume()
                    logger.warning(
                        "%s: %s continues on another worker from its %d streamed tokens",
                        e,
                        request.request_id,
                        len(replay.delivered),
                    )
                else:
                    logger.warning("%s: placing %s again", e, request.request_id)

    async def _generate_once(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        request_id = request.request_id
        # A resumed request's worker prefills the prompt and the tokens streamed so far.
        tokens = [*request.prompt_token_ids, *request.resume_output_token_ids]
        try:
            decision = await self.router.place(tokens, request_id, request.cache_salt)
        except NoWorkerAvailable as e:
            raise BackendUnavailable(f"no worker can serve this model now: {e}") from e
        placed_s = time.monotonic()
        placement = decision.placement
        self._routes[request_id] = decision.header()
        if self.metrics is not None:
            self.metrics.observe_route(
                decision.policy,
                not decision.local_prefill,
                decision.decode_matched_blocks,
                decision.num_prompt_blocks,
            )
        request.routed_unix_s = time.time()
        request.ClearField("prefill")
        if placement.prefill is not None:
            request.prefill.worker_id = placement.prefill.worker_id
            request.prefill.address = placement.prefill.address
        decode = placement.decode
        self._owners[request_id] = decode.address
        call = self._channels.stub(decode.address).Generate(request)
        done = False
        first = True
        try:
            while True:
                d = self.deadlines
                timeout_s = d.first_token_timeout_s if first else d.inter_token_timeout_s
                try:
                    msg = await asyncio.wait_for(call.read(), timeout_s)
                except TimeoutError:
                    self.router.mark_unhealthy(decode.worker_id)
                    which = "first-token" if first else "inter-token"
                    raise BackendUnavailable(
                        f"worker {decode.worker_id} sent nothing for {timeout_s:g} s "
                        f"(the {which} deadline)"
                    ) from None
                if msg is grpc.aio.EOF:
                    break
                assert isinstance(msg, pb.GenerateResponse)
                if first:
                    self._first_message(decision, msg, time.monotonic() - placed_s)
                first = False
                yield msg
            done = True
        except grpc.aio.AioRpcError as e:
            raise self._map_error(e, decode) from e
        finally:
            if not done:
                call.cancel()  # the worker's handler is cancelled: it aborts the request
            self._owners.pop(request_id, None)
            self.router.release(request_id)

    def _first_message(
        self, decision: RouteDecision, msg: pb.GenerateResponse, ttft_s: float
    ) -> None:
        """The worker answered: its breaker closes, the cost model learns, the prediction is
        scored against what happened (from placement to the first token)."""
        self.router.report_success(decision.placement.decode.worker_id)
        if not msg.HasField("ttft"):
            return  # a resumed stream's continuation: not a first token
        self.router.observe(
            decision,
            FirstTokenReport(
                num_prompt_tokens=msg.num_prompt_tokens,
                num_cached_tokens=msg.num_cached_tokens,
                prefilled_remotely=msg.prefilled_remotely,
                queue_s=msg.ttft.queue_s,
                prefill_s=msg.ttft.prefill_s,
                transfer_s=msg.ttft.transfer_s,
                kv_bytes_received=msg.kv_bytes_received,
            ),
        )
        if self.metrics is not None:
            self.metrics.router_ttft_error.observe(decision.predicted_ttft_s - ttft_s)

    def _map_error(self, e: grpc.aio.AioRpcError, worker: WorkerInfo) -> BackendError:
        code = e.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(e.details() or "invalid request")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return BackendOverloaded(e.details() or "worker overloaded")
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,  # cancelled by the worker: its server stopped (drain)
        ):
            self.router.mark_unhealthy(worker.worker_id)
            return BackendUnavailable(f"worker {worker.worker_id} unavailable: {e.details()}")
        return BackendError(f"worker {worker.worker_id} failed: {code.name}: {e.details()}")

    async def abort(self, request_ids: list[str]) -> None:
        by_worker: dict[str, list[str]] = {}
        for rid in request_ids:
            # "r1#2" (one of r1's sequences: a stop string hit it) goes where r1 went.
            address = self._owners.get(parse_sequence_id(rid)[0])
            if address is not None:
                by_worker.setdefault(address, []).append(rid)
        for address, ids in by_worker.items():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._channels.stub(address).Abort(
                    pb.AbortRequest(request_ids=ids), timeout=2.0
                )

    async def ready(self) -> bool:
        await self.start()
        return any(w.role in ("decode", "mixed") for w in self.router.healthy_workers())

    async def close(self) -> None:
        await self.events.stop()
        await self.router.stop()
        await self._channels.close()
        await self._redis.aclose()

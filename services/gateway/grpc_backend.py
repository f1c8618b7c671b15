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
from baton.router.policy import NoWorkerAvailable, WorkerLoad
from baton.router.registry import WorkerInfo, connect
from baton.router.router import Router
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
from baton.services.wire import ChannelPool

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
"""Placements tried for one request: its first, and one per worker that failed under it."""


class GrpcBackend(Backend):
    def __init__(
        self,
        redis_url: str,
        model: str | None = None,
        policy: str = "least_load",
        deadlines: StreamDeadlines | None = None,
        token: str | None = None,
    ):
        """redis_url: the registry ("": $BATON_REDIS_URL). token: the cluster token (None:
        $BATON_CLUSTER_TOKEN), sent on every call and only to workers whose registry entry
        proves it (services/cluster_auth.py)."""
        self.deadlines = deadlines or StreamDeadlines()
        redis_url = redis_url or os.environ.get(REDIS_URL_ENV, "")
        if not redis_url:
            raise ValueError(f"no Redis for the registry: give its URL or set ${REDIS_URL_ENV}")
        self._redis = connect(redis_url)
        if token is None:
            token = cluster_token_from_env()
        caller = f"gateway-{socket.gethostname()}-{os.getpid()}"
        self._channels = ChannelPool(token=token, caller=caller)
        self.router = Router(self._redis, self._fetch_load, model=model, policy=policy, token=token)
        self._owners: dict[str, str] = {}
        """request id → address of the decode worker serving it (for abort)."""
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.router.start()

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
        try:
            placement = await self.router.place(len(request.prompt_token_ids), request_id)
        except NoWorkerAvailable as e:
            raise BackendUnavailable(f"no worker can serve this model now: {e}") from e
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
                    self.router.report_success(decode.worker_id)
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
        await self.router.stop()
        await self._channels.close()
        await self._redis.aclose()

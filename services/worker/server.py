"""`baton worker`: one engine behind a gRPC server, registered in Redis, with /metrics.

Lifecycle: load the model → start the engine thread → serve gRPC → register (key with TTL,
heartbeat) and stream KV events (kv_event_stream.py) → on SIGTERM/SIGINT drain: deregister,
refuse new requests, let running ones finish (up to drain_timeout_s), stop the server, write the
last KV events, stop the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from baton.proto import worker_pb2_grpc as pb_grpc
from baton.router.registry import WorkerInfo, WorkerRegistration, connect
from baton.services.cluster_auth import REDIS_URL_ENV, cluster_token_from_env, server_interceptors
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.config import EngineConfig
from baton.services.engine.llm_engine import LLMEngine
from baton.services.worker.connectors.remote_prefill import (
    RemotePrefillConfig,
    RemotePrefillConnector,
)
from baton.services.worker.kv_event_stream import KVEventStream, KVEventStreamConfig
from baton.services.worker.metrics_feed import WorkerMetricsFeed
from baton.services.worker.service import ServiceConfig, WorkerService

logger = logging.getLogger("baton.worker")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024**2),
    ("grpc.max_send_message_length", 256 * 1024**2),
]


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process (its engine's settings are an EngineConfig of their own)."""

    role: str = field(default="mixed", metadata={"choices": ("prefill", "decode", "mixed")})
    """"prefill" (prompts; hands the KV on), "decode" (takes the KV over) or "mixed" (both)."""
    host: str = "127.0.0.1"
    """Address the gRPC server, the /metrics endpoint and the KV listener bind (cluster-internal:
    keep it off public interfaces)."""
    advertise_host: str = ""
    """Address announced in the registry; empty: `host`, or this machine's address when `host`
    is 0.0.0.0."""
    port: int = 0
    """gRPC port; 0 picks a free one (announced through the registry)."""
    worker_id: str = ""
    """Empty: "<role>-<host>-<random>"."""
    redis_url: str = ""
    """The registry (may carry a password: prefer $BATON_REDIS_URL, which is used when this is
    empty); neither: do not register (a worker used directly, e.g. in tests)."""
    # the names of kvstore/transports/registry.py (tests/unit/test_cli_flags.py checks they agree)
    transport: str = field(default="tcp", metadata={"choices": ("tcp", "nixl", "mooncake")})
    """KV transport for the prefill → decode handoff."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port; None: no metrics server, 0: a free port."""
    remote_prefill_min_tokens: int = 32
    """Conditional disaggregation: a prompt missing fewer tokens than this (after the prefix
    cache) is prefilled on the decode worker, not handed to a prefill worker."""
    max_queued_requests: int = 256
    """Refuse new requests (HTTP 429) while this many wait to be admitted (shared fairly among
    callers once half full: services/worker/admission.py)."""
    max_n: int = 128
    """Most sequences one request may ask for."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long running requests may take to finish before the worker stops."""
    registry_ttl_s: float = 6.0
    """Lifetime of the registry key the heartbeat renews (a dead worker vanishes after it)."""
    kv_events_max_len: int = 10_000
    """Batches of KV events the worker's Redis Stream keeps (approximately); a router further
    behind resyncs from the worker's snapshot."""


class Worker:
    """A started worker; `serve_forever` runs until a signal, then drains and stops."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        self.config = config
        self.engine_config = engine_config
        self.worker_id = config.worker_id or (
            f"{config.role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        )
        self.address = ""
        self.epoch = uuid.uuid4().hex
        """This run (KV events: a reader that sees a new epoch resyncs)."""
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.connector: RemotePrefillConnector | None = None
        if self.config.role in ("prefill", "decode"):
            self.connector = RemotePrefillConnector(
                RemotePrefillConfig(
                    worker_id=self.worker_id,
                    transport=self.config.transport,
                    min_tokens=self.config.remote_prefill_min_tokens,
                    transport_host=self.config.host,
                )
            )
        llm = await asyncio.to_thread(
            LLMEngine.from_config, self.engine_config, self.connector, self.worker_id
        )
        self.engine = AsyncEngine(llm.core, llm.sequences)
        self.engine.start()
        if self.connector is not None:
            self.connector.bind(asyncio.get_running_loop(), self.engine.wake)
        self.model_id = llm.model_id
        self.service = WorkerService(
            self.engine,
            ServiceConfig(
                worker_id=self.worker_id,
                role=self.config.role,
                model_id=llm.model_id,
                max_queued_requests=self.config.max_queued_requests,
                max_n=self.config.max_n,
                epoch=self.epoch,
            ),
            self.connector,
        )
        token = cluster_token_from_env()
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=server_interceptors(token))
        pb_grpc.add_WorkerServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        advertised = advertise_host(self.config)
        self.address = f"{advertised}:{port}"
        await self.server.start()
        self.registry = CollectorRegistry()
        self.feed = WorkerMetricsFeed(self.registry, llm.model_id, self.config.role)
        self._feed_task = asyncio.create_task(self.feed.run(self.engine))
        self.service.observer = self.feed
        if self.connector is not None:
            self.connector.on_transfer = self.feed.on_transfer
        if self.config.metrics_port is not None:
            server, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=self.registry
            )
            self.metrics_port = server.server_port
        self.registration: WorkerRegistration | None = None
        self.kv_event_stream: KVEventStream | None = None
        redis_url = self.config.redis_url or os.environ.get(REDIS_URL_ENV, "")
        if redis_url:
            self.redis = connect(redis_url)
            info = WorkerInfo(
                worker_id=self.worker_id,
                address=self.address,
                role=self.config.role,  # type: ignore[arg-type]
                model=llm.model_id,
                num_kv_blocks=llm.core.num_blocks,
                block_size=llm.core.block_size,
                transport=self.config.transport,
                started_unix_s=time.time(),
                kv_block_bytes=sum(layout.spec.block_bytes for layout in llm.core.kv_layouts()),
                metrics_address=f"{advertised}:{self.metrics_port}" if self.metrics_port else "",
            ).signed(token)
            self.registration = WorkerRegistration(self.redis, info, self.config.registry_ttl_s)
            await self.registration.start()
            self.kv_event_stream = KVEventStream(
                self.engine,
                self.redis,
                self.worker_id,
                self.epoch,
                KVEventStreamConfig(max_stream_len=self.config.kv_events_max_len),
            )
            await self.kv_event_stream.start()
        logger.info("worker %s (%s) serving on %s", self.worker_id, self.config.role, self.address)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        await self.drain_and_stop()

    async def drain_and_stop(self) -> None:
        """Deregister, refuse new work, let running requests finish, then stop everything."""
        self.service.draining = True
        if self.registration is not None:
            await self.registration.stop()
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.engine.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=1.0)
        self._feed_task.cancel()
        if self.kv_event_stream is not None:  # before the engine: it asks the engine thread
            await self.kv_event_stream.stop()
        await self.engine.stop()
        if self.connector is not None:
            await self.connector.aclose()
        if self.registration is not None:
            await self.redis.aclose()
        logger.info("worker %s stopped", self.worker_id)


def advertise_host(config: WorkerConfig) -> str:
    """The address peers reach this worker at (see WorkerConfig.advertise_host)."""
    if config.advertise_host:
        return config.advertise_host
    if config.host in ("", "0.0.0.0"):
        return socket.gethostbyname(socket.gethostname())
    return config.host


async def run_worker(config: WorkerConfig, engine_config: EngineConfig) -> None:
    worker = Worker(config, engine_config)
    await worker.start()
    # The launcher reads this line to learn the address (the registry has it too).
    print(f"BATON_WORKER_READY {worker.worker_id} {worker.address}", flush=True)
    await worker.serve_forever()

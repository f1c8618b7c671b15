"""`baton gateway`: the OpenAI HTTP front over the cluster (GrpcBackend + router)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn
from prometheus_client import CollectorRegistry

from baton.services.engine.loader import load_model_info
from baton.services.gateway.app import build_app
from baton.services.gateway.grpc_backend import GrpcBackend
from baton.services.metrics import Metrics

logger = logging.getLogger("baton.gateway")


def run_gateway(
    host: str,
    port: int,
    redis_url: str,
    model: str,
    api_keys: Sequence[str] = (),
    policy: str = "least_load",
) -> None:
    info = load_model_info(model)
    if info.tokenizer is None:
        raise SystemExit(f"model {model!r} has no tokenizer: the gateway needs one")
    backend = GrpcBackend(redis_url, model=info.model_id, policy=policy)
    metrics = Metrics(CollectorRegistry(), info.model_id, "gateway")
    app = build_app(
        backend,
        info.tokenizer,
        info.model_id,
        info.arch.max_position_embeddings,
        api_keys=tuple(api_keys),
        metrics=metrics,
    )
    logger.info("gateway for %s on http://%s:%d", info.model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

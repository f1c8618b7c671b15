"""`baton gateway`: the OpenAI HTTP front over the cluster (GrpcBackend + router)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import uvicorn
from prometheus_client import CollectorRegistry

from baton.services.engine.loader.model_info import load_model_info
from baton.services.gateway.app import build_app
from baton.services.gateway.deadlines import StreamDeadlines
from baton.services.gateway.grpc_backend import GrpcBackend
from baton.services.metrics import Metrics

logger = logging.getLogger("baton.gateway")

API_KEYS_ENV = "BATON_API_KEYS"
"""Accepted Bearer keys, comma-separated: how `baton serve` hands them to its gateway (a
command line is visible to every user of the machine; an environment is not)."""


def join_api_keys(keys: Sequence[str]) -> str:
    """keys as the value of $BATON_API_KEYS."""
    if any("," in k for k in keys):
        raise ValueError("an API key may not contain a comma")
    return ",".join(keys)


def api_keys_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The keys in $BATON_API_KEYS (unset or empty: none)."""
    return tuple(k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip())


def run_gateway(
    host: str,
    port: int,
    redis_url: str,
    model: str,
    api_keys: Sequence[str] = (),
    policy: str = "least_load",
    deadlines: StreamDeadlines | None = None,
) -> None:
    """Serve the OpenAI API; api_keys and those in $BATON_API_KEYS are accepted."""
    api_keys = (*api_keys, *api_keys_from_env())
    info = load_model_info(model)
    if info.tokenizer is None:
        raise SystemExit(
            f"model {model!r} has no tokenizer: the gateway needs one (where one is looked for: "
            "baton.services.engine.loader's docstring)"
        )
    backend = GrpcBackend(redis_url, model=info.model_id, policy=policy, deadlines=deadlines)
    metrics = Metrics(CollectorRegistry(), info.model_id, "gateway")
    app = build_app(
        backend,
        info.tokenizer,
        info.model_id,
        info.max_position_embeddings,
        api_keys=tuple(api_keys),
        metrics=metrics,
    )
    logger.info("gateway for %s on http://%s:%d", info.model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

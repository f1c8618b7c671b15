"""`baton gateway`: the OpenAI HTTP front over the cluster (GrpcBackend + router)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import uvicorn
from prometheus_client import CollectorRegistry

from baton.router.policy import DEFAULT_POLICY
from baton.services.engine.loader.model_info import load_model_info
from baton.services.gateway.app import build_app
from baton.services.gateway.deadlines import StreamDeadlines
from baton.services.gateway.grpc_backend import GrpcBackend
from baton.services.gateway.http_limits import server_config
from baton.services.gateway.limits import GatewayLimits
from baton.services.metrics import Metrics

logger = logging.getLogger("baton.gateway")

API_KEYS_ENV = "BATON_API_KEYS"
"""Accepted Bearer keys, comma-separated: how `baton serve` hands them to its gateway (a
command line is visible to every user of the machine; an environment is not)."""
API_KEY_ENV = "BATON_API_KEY"
"""One accepted Bearer key, taken whole (the singular name users of OpenAI's SDK expect, as
its OPENAI_API_KEY)."""


def join_api_keys(keys: Sequence[str]) -> str:
    """keys as the value of $BATON_API_KEYS."""
    if any("," in k for k in keys):
        raise ValueError("an API key may not contain a comma")
    return ",".join(keys)


def api_keys_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The keys in $BATON_API_KEYS and $BATON_API_KEY, without repeats (unset or empty: none)."""
    keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",")]
    keys.append(environ.get(API_KEY_ENV, "").strip())
    return tuple(dict.fromkeys(k for k in keys if k))


def run_gateway(
    host: str,
    port: int,
    redis_url: str,
    model: str,
    api_keys: Sequence[str] = (),
    policy: str = DEFAULT_POLICY,
    deadlines: StreamDeadlines | None = None,
    limits: GatewayLimits | None = None,
) -> None:
    """Serve the OpenAI API; api_keys and those in $BATON_API_KEYS / $BATON_API_KEY are
    accepted. limits: what a client may ask of the HTTP front (None: the defaults)."""
    limits = limits or GatewayLimits()
    api_keys = (*api_keys, *api_keys_from_env())
    info = load_model_info(model)
    if info.tokenizer is None:
        raise SystemExit(
            f"model {model!r} has no tokenizer: the gateway needs one (where one is looked for: "
            "baton.services.engine.loader's docstring)"
        )
    metrics = Metrics(CollectorRegistry(), info.model_id, "gateway")
    backend = GrpcBackend(
        redis_url, model=info.model_id, policy=policy, deadlines=deadlines, metrics=metrics
    )
    app = build_app(
        backend,
        info.tokenizer,
        info.model_id,
        info.max_position_embeddings,
        api_keys=tuple(api_keys),
        metrics=metrics,
        limits=limits,
    )
    logger.info("gateway for %s on http://%s:%d (%s)", info.model_id, host, port, limits)
    server = uvicorn.Server(server_config(app, host, port, limits))
    server.run()
    if not server.started:
        raise SystemExit(f"the gateway could not start on {host}:{port}")

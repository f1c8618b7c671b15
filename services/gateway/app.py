"""The gateway's OpenAI-compatible HTTP app (FastAPI) over any Backend.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (API key required when
keys are configured), GET /health (200 when the backend can take requests, else 503), GET
/metrics (Prometheus text), GET /openapi.json. Every response carries X-Request-Id: the
client's, or one made here; response bodies' ids derive from it, so a client's log line finds
the gateway's. GatewayLimits' admission limit and body deadline wrap the routes
(http_limits.py).

Bodies are parsed here rather than by FastAPI's body binding, so that invalid UTF-8 and
malformed JSON are told apart and reported (400) in OpenAI's error shape like everything else.
The OpenAPI schema still describes them: the request models' JSON schemas are put in by hand
(`openapi_extra`, `GatewayAPI`), so clients and schema fuzzers see real request bodies.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway import errors
from baton.services.gateway.backend import Backend
from baton.services.gateway.chat import create_chat_completion
from baton.services.gateway.completions import create_completion
from baton.services.gateway.errors import (
    REQUEST_ID_SCOPE_KEY,
    bad_request,
    payload_too_large,
    unauthorized,
)
from baton.services.gateway.http_limits import AdmissionMiddleware, BodyTimeoutMiddleware
from baton.services.gateway.limits import GatewayLimits
from baton.services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from baton.services.gateway.serving import Serving, now_s
from baton.services.metrics import CONTENT_TYPE, Metrics, render

M = TypeVar("M", bound=BaseModel)

ARRIVAL_SCOPE_KEY = "baton.arrival_s"
"""time.monotonic() when the request reached the gateway (TTFT and e2e start here)."""

MAX_REQUEST_ID_LEN = 256


class RequestIdMiddleware:
    """Gives every HTTP request an id and puts it on every response, errors included.

    A pure ASGI middleware, not Starlette's BaseHTTPMiddleware: that one runs the app in a
    separate task and gets in the way of streaming responses and of disconnect detection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_SCOPE_KEY] = time.monotonic()
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id if it is printable ASCII of sane length, else None."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            text = bytes(value).decode("latin-1").strip()
            if 0 < len(text) <= MAX_REQUEST_ID_LEN and text.isascii() and text.isprintable():
                return text
            return None
    return None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed max_bytes (from its
    Content-Length, else while it streams in), so a huge body is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise payload_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise payload_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json_object(raw: bytes) -> dict[str, object]:
    """Bytes → a JSON object, every way it can be wrong mapped to a 400 that says which."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The request body is not valid UTF-8 (byte {e.start}).") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"Invalid JSON body: {e.msg} (line {e.lineno}, column {e.colno}).") from e
    except RecursionError as e:
        raise bad_request("The JSON body is nested too deeply.") from e
    except ValueError as e:  # an integer past Python's int_max_str_digits (4300 by default)
        raise bad_request("Invalid JSON body: a number has too many digits.") from e
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no text can hold: the
        # tokenizer would fail on it later. One C-speed pass finds any.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            "The request body contains a lone UTF-16 surrogate (U+D800-U+DFFF)."
        ) from e
    return data


OFF_LOOP_BODY_BYTES = 64 * 1024
"""Bodies larger than this are parsed on a thread: a multi-megabyte JSON parse on the event
loop would stall every other request (and /health) meanwhile."""


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    raw = await read_body(request, max_bytes)
    if len(raw) > OFF_LOOP_BODY_BYTES:
        return await asyncio.to_thread(_validate, raw, model)
    return _validate(raw, model)


def _validate(raw: bytes, model: type[M]) -> M:
    data = decode_json_object(raw)
    try:
        return model.model_validate(data)  # ValidationError → 400 naming the field (errors.py)
    except RecursionError as e:
        raise bad_request("The JSON body is nested too deeply.") from e


def max_body_bytes(max_model_len: int) -> int:
    """The body cap: room for a prompt of max_model_len tokens at a generous 64 bytes each
    (JSON escapes, token ids as text) plus 1 MiB for everything else."""
    return max_model_len * 64 + 1024**2


@functools.cache
def request_schemas() -> dict[str, Any]:
    """The request models' JSON schemas (and those they use), keyed as OpenAPI components."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (ChatCompletionRequest, "validation"),
        (CompletionRequest, "validation"),
    ]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return dict(top["$defs"])


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra` describing its (hand-parsed) JSON body as `model`."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class GatewayAPI(FastAPI):
    """FastAPI whose OpenAPI schema also holds the request models `json_body` refers to."""

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in request_schemas().items():
            components.setdefault(name, model_schema)
        return schema


def build_app(
    backend: Backend,
    tokenizer: Tokenizer,
    model_id: str,
    max_model_len: int,
    api_keys: Sequence[str] = (),
    metrics: Metrics | None = None,
    limits: GatewayLimits | None = None,
) -> FastAPI:
    """The gateway app for one model served by `backend`.

    metrics: where request-level series go (and what /metrics renders); None makes a private
    registry, so several apps (or tests) can live in one process.
    limits: admission and the body deadline (the head's limits are the HTTP server's:
    http_limits.server_config); None: GatewayLimits' defaults.
    """
    if metrics is None:
        metrics = Metrics(CollectorRegistry(), model_id, role="gateway")
    limits = limits or GatewayLimits()
    rejected = metrics.request_rejected("max_concurrent_requests")  # exposed at zero from now
    serving = Serving(backend, tokenizer, model_id, max_model_len, metrics)
    body_cap = max_body_bytes(max_model_len)
    keys = [k.encode() for k in api_keys if k]

    async def check_api_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("You didn't provide an API key (Authorization: Bearer <key>).")
        given = token.strip().encode()
        # Compare with every key, in constant time, so timing reveals neither key nor match.
        if not any([hmac.compare_digest(given, k) for k in keys]):
            raise unauthorized("Incorrect API key provided.")

    app = GatewayAPI(title="baton gateway", docs_url=None, redoc_url=None)
    errors.install(app)
    # Innermost first: the body deadline, admission, then the request id around both, so
    # their refusals carry X-Request-Id too.
    app.add_middleware(BodyTimeoutMiddleware, limits=limits)
    app.add_middleware(AdmissionMiddleware, limits=limits, on_reject=rejected.inc)
    app.add_middleware(RequestIdMiddleware)
    app.state.serving = serving
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest, body_cap)
        return await create_chat_completion(
            serving, req, request, _request_id(request), _arrival_s(request)
        )

    @v1.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest, body_cap)
        return await create_completion(
            serving, req, request, _request_id(request), _arrival_s(request)
        )

    @v1.get("/models")
    async def models() -> ModelList:
        card = ModelCard(id=model_id, created=now_s(), root=model_id, max_model_len=max_model_len)
        return ModelList(data=[card])

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        try:
            ok = await backend.ready()
        except Exception:
            ok = False
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(render(metrics.registry), media_type=CONTENT_TYPE)

    return app


def _request_id(request: Request) -> str:
    return str(request.scope.get(REQUEST_ID_SCOPE_KEY) or uuid.uuid4().hex)


def _arrival_s(request: Request) -> float:
    return float(request.scope.get(ARRIVAL_SCOPE_KEY) or time.monotonic())

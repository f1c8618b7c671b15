"""The one place that maps failures to HTTP status codes and OpenAI's error body.

Every error leaves the gateway as `{"error": {"message", "type", "param", "code"}}` with the
status OpenAI would use, so the official client raises its matching exception (BadRequestError,
AuthenticationError, NotFoundError, RateLimitError, InternalServerError):

    400  malformed or invalid request: bad JSON / UTF-8, wrong types, out-of-range values,
         prompt too long (param names the offending field where known)
    401  missing or wrong API key
    404  unknown model or route
    408  a request head or body that stalled (http_limits.py; the connection is closed)
    413  a body over the cap
    429  too many requests in flight at the gateway (GatewayLimits), or BackendOverloaded:
         workers are up but their queues are full (Retry-After either way)
    431  a request head over GatewayLimits.max_header_bytes (http_limits.py)
    503  BackendUnavailable: no worker can take the request now (Retry-After)
    500  anything else (the message is generic; the traceback goes to the log)

Handlers raise; nothing else in the gateway builds an error body. Mid-stream errors (after
the 200 went out) use the same body as one SSE event (streaming.py calls `error_body`); the
HTTP limits that answer below the handlers (http_limits.py: admission, timeouts, oversize
heads) send the same body too (`plain_error_response`, `error_json`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.services.gateway.backend import (
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    InvalidRequest,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_SCOPE_KEY = "baton.request_id"
"""Where the request-id middleware (app.py) leaves the request's id in the ASGI scope."""

# pydantic's names for union members and wrappers, which appear in error locations.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


class APIError(Exception):
    """An error the client should see as it is; raised by handlers, rendered by handle_error."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def payload_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server accepts ({max_bytes} bytes).",
        code="request_too_large",
    )


def too_many_requests(limit: int, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"The gateway is at its limit of {limit} requests in flight; retry later.",
        type="rate_limit_error",
        code="too_many_requests",
        headers={"Retry-After": str(retry_after_s)},
    )


def request_timeout(message: str) -> APIError:
    """408: the client stalled; the connection is closed with it (its rest is not awaited)."""
    return APIError(408, message, code="request_timeout", headers={"Connection": "close"})


def header_too_large(max_bytes: int) -> APIError:
    return APIError(
        431,
        f"The request head is larger than this server accepts ({max_bytes} bytes).",
        code="request_header_fields_too_large",
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


class ClientDisconnected(Exception):
    """The client went away before the response was ready: nothing is sent (status 499)."""


def param_of(message: str, known: Sequence[str]) -> str | None:
    """The parameter a SamplingParams ValueError names ("top_p must be ..." -> "top_p")."""
    first = message.split(" ", 1)[0]
    return first if first in known else None


def _loc_to_param(loc: Sequence[int | str]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; drops "body" and union tags."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if item == "body" and not parts:
            continue
        if item in _TYPE_TAGS or "[" in item or "-" in item:
            continue
        parts.append(item)
    return ".".join(parts) or None


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """The first pydantic error, with the field it concerns as `param`."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    param = _loc_to_param(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {})
        return bad_request(f"Invalid JSON body: {ctx.get('error', first.get('msg'))}")
    message = str(first.get("msg", "invalid value"))
    ctx_error = first.get("ctx", {}).get("error")
    if first.get("type") == "value_error" and ctx_error is not None:
        message = str(ctx_error)  # our own validators' words, without "Value error, "
    if param is not None and not message.startswith(param):
        message = f"{param}: {message}"
    if len(errors) > 1 and param is not None:
        others = {_loc_to_param(e.get("loc", ())) for e in errors[1:]} - {param, None}
        if others:
            message += f" (also invalid: {', '.join(sorted(o for o in others if o))})"
    return APIError(400, message, param=param)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to what the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return from_validation_errors(exc.errors())
    if isinstance(exc, BackendOverloaded):
        return APIError(
            429,
            str(exc) or "The server is overloaded; retry later.",
            type="rate_limit_error",
            code="overloaded",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, BackendUnavailable):
        return APIError(
            503,
            str(exc) or "No worker can take the request now; retry later.",
            type="service_unavailable_error",
            code="unavailable",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc))
    if isinstance(exc, ClientDisconnected):
        return APIError(499, "The client closed the request.", type="client_closed_request")
    if isinstance(exc, StarletteHTTPException):
        return APIError(
            exc.status_code,
            str(exc.detail),
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, BackendError):
        return APIError(500, f"The backend failed: {exc}", type="server_error")
    return APIError(500, "Internal server error.", type="server_error")


def error_body(err: APIError) -> dict[str, Any]:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_json(err: APIError) -> bytes:
    """err's body as bytes, for the layers below the app (the HTTP protocol, middlewares)."""
    return json.dumps(error_body(err)).encode()


def plain_error_response(err: APIError) -> JSONResponse:
    """err as a response, for ASGI middlewares that answer without a Request (the request-id
    middleware around them adds X-Request-Id)."""
    return JSONResponse(error_body(err), status_code=err.status_code, headers=err.headers)


def error_event(exc: BaseException) -> bytes:
    """An SSE event carrying the error, for failures after the stream's 200 went out."""
    return f"data: {json.dumps(error_body(to_api_error(exc)))}\n\n".encode()


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    if err.status_code >= 500:
        logger.error("request failed: %r", exc, exc_info=exc)
    headers = dict(err.headers)
    request_id = request.scope.get(REQUEST_ID_SCOPE_KEY)
    if request_id:
        # The catch-all handler runs outside the middleware stack (Starlette installs it on
        # ServerErrorMiddleware), so the header cannot be left to the request-id middleware.
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error_body(err), status_code=err.status_code, headers=headers)


def install(app: FastAPI) -> None:
    """Route every exception the app can raise through error_response."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    for exc_type in (
        APIError,
        RequestValidationError,
        ValidationError,
        StarletteHTTPException,
        BackendError,
        ClientDisconnected,
        Exception,
    ):
        app.add_exception_handler(exc_type, handle)

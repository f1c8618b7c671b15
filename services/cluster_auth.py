"""Who may talk to a worker: the cluster token (docs/design.md §24).

One secret per cluster, `$BATON_CLUSTER_TOKEN`, which `baton serve` mints at start (a Helm
install mounts it from a Secret). It reaches processes through their environment, never their
command line (`/proc/<pid>/cmdline` is world-readable; `/proc/<pid>/environ` is not).

- Every gRPC call between the gateway and the workers, and between workers, carries it in the
  `x-baton-cluster-token` metadata; a worker answers a call without it (or with another) with
  UNAUTHENTICATED before its handler runs. `Health` stays open, for probes.
- A worker's registry entry carries `proof`, an HMAC of the entry under the token
  (router/registry.py, WorkerInfo.signed / proven): a process
  that can write to Redis but lacks the token cannot announce a worker the gateway would use,
  and the gateway sends the token only to workers whose proof holds.

A token rather than mTLS: it needs no certificate authority, works the same on loopback and in a
pod, and costs nothing per call. It does not encrypt: across hosts, run the cluster network
behind a NetworkPolicy or a mesh that adds TLS. Without a token (a worker or gateway started by
hand with none set) nothing is checked, as with the gateway's API keys.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

CLUSTER_TOKEN_ENV = "BATON_CLUSTER_TOKEN"
REDIS_URL_ENV = "BATON_REDIS_URL"
"""The registry's Redis URL, password included, as `baton serve` hands it to its children."""
TOKEN_METADATA_KEY = "x-baton-cluster-token"
CALLER_METADATA_KEY = "x-baton-caller"
"""Who is calling (the gateway's or a worker's id): a worker's per-caller queue share."""
OPEN_METHODS = frozenset({"/baton.v1.Worker/Health"})


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def cluster_token_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """$BATON_CLUSTER_TOKEN, or "" when unset (no checks)."""
    return environ.get(CLUSTER_TOKEN_ENV, "").strip()


def token_matches(token: str, metadata: Any) -> bool:
    """Whether gRPC invocation metadata carries `token` (compared in constant time)."""
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            given = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(given, token.encode())
    return False


# ---- server side ------------------------------------------------------------------------------


class RequireClusterToken(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers UNAUTHENTICATED to any call but OPEN_METHODS that lacks the cluster token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty cluster token checks nothing")
        self.token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        if token_matches(self.token, details.invocation_metadata):
            return handler
        return _refusing(handler)


_REFUSAL = "this call needs the cluster token (x-baton-cluster-token metadata)"


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only refuses."""

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

    async def stream(request: object, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
        yield  # pragma: no cover - an async generator, never reached

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


def server_interceptors(token: str) -> list[grpc.aio.ServerInterceptor]:
    return [RequireClusterToken(token)] if token else []


# ---- client side ------------------------------------------------------------------------------


def call_metadata(token: str, caller: str) -> tuple[tuple[str, str], ...]:
    items = [(CALLER_METADATA_KEY, caller)] if caller else []
    if token:
        items.append((TOKEN_METADATA_KEY, token))
    return tuple(items)


class _Metadata:
    """Adds fixed metadata (token, caller) to a call's own."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, merged, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first kind it is an instance of: one class per kind.
class _UnaryUnaryMetadata(_Metadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self.details(details), request)


class _UnaryStreamMetadata(_Metadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self.details(details), request)


def client_interceptors(token: str, caller: str = "") -> list[grpc.aio.ClientInterceptor]:
    metadata = call_metadata(token, caller)
    if not metadata:
        return []
    return [_UnaryUnaryMetadata(metadata), _UnaryStreamMetadata(metadata)]

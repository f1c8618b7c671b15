"""What the gateway needs from the serving side: generate a stream, abort, readiness.

The gateway speaks only baton.v1 protobuf messages to its backend. GrpcBackend routes each
request to workers over gRPC; LocalBackend runs an engine in-process (tests, single-process use).
Errors raised here are mapped to HTTP status codes in one place (gateway/errors.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from baton.proto import worker_pb2 as pb


class BackendError(Exception):
    """The backend failed while serving a request (HTTP 500)."""


class BackendUnavailable(BackendError):
    """No worker can take the request now (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendOverloaded(BackendError):
    """Workers are up but their queues are full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequest(BackendError):
    """The backend rejected the request as invalid (HTTP 400)."""


class Backend(ABC):
    """Serves GenerateRequests. Implementations must be safe to call from one event loop."""

    @abstractmethod
    def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the request's token deltas; the last message has every sequence finished.

        Closing the iterator early (client gone) must abort the request everywhere.
        """

    @abstractmethod
    async def abort(self, request_ids: list[str]) -> None:
        """Abort whole requests ("r1") or single sequences ("r1#2")."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether some worker can take requests now."""

    def route(self, request_id: str) -> str:
        """Where the request runs, as the x-baton-route header says it ("": not routed)."""
        return ""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Release connections (default: nothing to do)."""

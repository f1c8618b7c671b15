"""What the gateway's HTTP front accepts from a client: how many, how big, how slow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayLimits:
    """Limits on the gateway's HTTP clients, so a flood or a slow client cannot take it down.

    Enforced in http_limits.py: admission and the body timeout as ASGI middlewares, the head's
    size and deadline in the HTTP protocol under the app.
    """

    max_concurrent_requests: int = 1024
    """Chat and completions requests in flight at once (a stream until it ends or its client
    leaves); more are refused with 429 and Retry-After rather than queued."""
    retry_after_s: int = 1
    """The Retry-After (seconds) of a 429 for too many requests in flight."""
    max_header_bytes: int = 64 * 1024
    """Largest request head (request line and headers) accepted; a larger one gets 431."""
    header_timeout_s: float = 10.0
    """Longest a client may take to send a request head, from its connection or its first
    byte; then it is disconnected (slowloris)."""
    body_timeout_s: float = 30.0
    """Longest wait for the next part of a request body; then 408 and the connection closes."""

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1 or self.max_header_bytes < 1:
            raise ValueError("max_concurrent_requests and max_header_bytes must be positive")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be positive")

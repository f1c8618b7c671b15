"""How long the gateway waits on a worker's stream before it gives up on that worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamDeadlines:
    """Deadlines on the gateway's gRPC streams from decode workers (docs/design.md §12).

    A stream that misses one is cancelled and its worker marked unhealthy until its load
    probe answers again; a request that had streamed nothing yet is placed on another worker,
    one that had ends with an error event.
    """

    first_token_timeout_s: float = 300.0
    """Longest wait for a stream's first message (queueing and prefill included: generous,
    since a busy worker may hold many requests in its queue)."""
    inter_token_timeout_s: float = 30.0
    """Longest wait between two messages of a stream (a decode step takes milliseconds; this
    catches a frozen or partitioned worker)."""

    def __post_init__(self) -> None:
        if self.first_token_timeout_s <= 0 or self.inter_token_timeout_s <= 0:
            raise ValueError("stream deadlines must be positive")

"""What the engine returns to its callers (offline API, gRPC worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.services.engine.step_io import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of a request's n sequences, accumulated so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    """None while running; "stop", "length" or "abort"."""
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request timings (time.monotonic seconds) and counters, returned in RequestOutput."""

    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    last_token_s: float | None
    finished_s: float | None
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    num_preemptions: int

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float | None:
        if self.first_scheduled_s is None:
            return None
        return self.first_scheduled_s - self.arrival_s


@dataclass
class RequestOutput:
    """A user request: its prompt and its n outputs (cumulative, not deltas)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (first sequence's admission)."""
    metrics: list[RequestMetrics] = field(default_factory=list)
    """One per sequence."""

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of engine state: a worker polls it for its Prometheus gauges and counters."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    prefix_cache_queries_tokens: int
    prefix_cache_hits_tokens: int
    num_preemptions: int
    num_outstanding_tokens: int = 0
    """Prompt tokens still to compute plus tokens still to generate: the router's load signal."""
    num_decoding: int = 0
    """Running requests whose prompt is computed (they generate one token a step)."""
    num_loading: int = 0
    """Requests waiting for a KV connector's load (e.g. a remote prefill)."""

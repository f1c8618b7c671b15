"""What crosses scheduler → runner → scheduler in one step (typed, frozen).

New (or resumed) requests travel in full; running ones as diffs (new block ids). The runner keeps
each request's token ids itself and appends what it samples, so decodes send no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from baton.services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from baton.services.engine.kv_connector import KVConnectorMetadata


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has no state for: first admission, or resumed after preemption."""

    request_id: str
    token_ids: tuple[int, ...]
    """Prompt plus any outputs generated before a preemption."""
    num_prompt_tokens: int
    block_ids: tuple[int, ...]
    num_computed_tokens: int
    """Tokens whose KV is already in the blocks (prefix hit) before this step."""
    params: SamplingParams
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    request_id: str
    new_block_ids: tuple[int, ...]
    num_computed_tokens: int
    """Before this step."""


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    num_scheduled_tokens: dict[str, int]
    """Tokens to compute this step, per request (the order of the dict is the batch order)."""
    total_num_scheduled_tokens: int
    finished_request_ids: frozenset[str]
    """Requests that ended (or were preempted) since the last step: the runner drops them."""
    kv_connector_metadata: KVConnectorMetadata | None = None
    """The KV connector's instructions for its worker side this step (loads, saves)."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]
    """Requests that reached the end of their tokens this step, and the token each sampled.
    A request in the middle of a chunked prefill is absent."""
    logprobs: dict[str, TokenLogprobs]
    """For sampled requests that asked for logprobs."""


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None
    """None while running; "stop", "length" or "abort"."""
    stop_reason: int | str | None
    """The stop token id or stop string that ended it (None for EOS or length)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (set on every output)."""
    first_scheduled_s: float | None = None
    """time.monotonic() of first admission (set on the first token's output only)."""

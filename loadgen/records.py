"""The typed objects that cross loadgen's modules: what to send, and what came back.

Workloads produce `Session`s (one arrival each: a single prompt, or a conversation of turns);
the client turns one request into a `RequestRecord`; metrics and reports read only records.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Turn:
    """One request's content. For chat, `prompt` is the user message of this turn."""

    prompt: str | list[int]
    """Text, or token ids (the completions endpoint accepts a list of ints)."""
    prompt_len: int
    """The intended prompt length in tokens (exact with a tokenizer, else approximate)."""
    output_len: int
    """max_tokens for this request."""


@dataclass(frozen=True)
class Session:
    """One arrival: a single request, or a conversation whose turns run one after another."""

    turns: tuple[Turn, ...]
    arrival_s: float | None = None
    """Offset from the start of the run (traces); None: the arrival process decides."""
    group: int = 0
    """Shared-prefix group or conversation id, for reports."""


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds, from `time.perf_counter`."""

    success: bool = False
    error_kind: str = ""
    """"" on success; else http_<status> | timeout | connection | stream_error | deadline."""
    error: str = ""
    prompt_len: int = 0
    """Prompt tokens from the server's usage (the intended length when usage is missing)."""
    output_len: int = 0
    """Completion tokens from the server's usage (content chunks when usage is missing)."""
    cached_tokens: int = 0
    """usage.prompt_tokens_details.cached_tokens: the server's prefix-cache hit."""
    usage_reported: bool = False
    start_s: float = 0.0
    """Send time, relative to the start of the run."""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks (a chunk may carry several tokens, as in vllm)."""
    e2el_s: float = 0.0
    text: str = ""
    session: int = 0
    turn: int = 0

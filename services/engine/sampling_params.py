"""Per-request decoding options, with vLLM's names, defaults and valid ranges.

SamplingParams is the one object a request's sampling wishes travel in, from the API layer to the
sampler (sampler.py) and the detokenizer (detokenizer.py). It validates itself on construction:
every ValueError names the offending parameter, because the API layer turns it into an HTTP 400
whose message the client reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy: dividing logits by ~0 overflows, and the intent is argmax."""

MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for (OpenAI's and vLLM's default limit)."""

MAX_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)."""


def as_stop_tuple(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalize the OpenAI `stop` field (one string, a list of them, or null) to a tuple."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; immutable once validated.

    `stop` and `stop_token_ids` are typed as tuples (hashable, frozen), but callers handing over
    decoded JSON may pass a str or a list: __post_init__ normalizes them.
    """

    n: int = 1
    """Number of completions to generate for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or anything below SAMPLING_EPS) means greedy argmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's probability."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already present in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens seen in prompt or output (> 1 discourages repeats)."""
    seed: int | None = None
    """Seeds this request's own random generator: same seed, same tokens, whatever the batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are cut from the output unless included explicitly."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to the model's EOS, unless ignore_eos)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop_token_ids are masked (and stop strings ignored) until this many tokens."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0: only the sampled)."""
    skip_special_tokens: bool = True
    """Leave special tokens (e.g. <|im_end|>) out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen; these run before anyone can see it.
        object.__setattr__(self, "stop", as_stop_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    @property
    def reads_token_history(self) -> bool:
        """Sampling needs the prompt/output ids: penalties, or EOS masked until min_tokens."""
        return bool(
            self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.min_tokens
        )

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0 or numerically so)."""
        return self.temperature < SAMPLING_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def max_stop_str_len(self) -> int:
        """Length of the longest stop string (0 without any): the detokenizer's look-back."""
        return max((len(s) for s in self.stop), default=0)

    def _validate(self) -> None:
        # Comparisons are written `not (lo <= x <= hi)` so that NaN fails them too.
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name, value in (
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("repetition_penalty", self.repetition_penalty),
        ):
            _check_finite(name, value)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        for name, value in (
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ):
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}.")
        if self.seed is not None:
            _check_int("seed", self.seed)
            # torch.Generator.manual_seed accepts exactly this range.
            if not -(2**63) <= self.seed < 2**64:
                raise ValueError(f"seed must fit in 64 bits, got {self.seed}.")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}.")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r}.")
            if not s:
                raise ValueError("stop must not contain an empty string.")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}.")


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass; `"n": true` in JSON is a client bug, not n=1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")

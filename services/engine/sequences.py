"""Turning one user request into engine Requests: validation and the n-way fan-out.

Shared by the offline front (llm_engine.py) and the async engine of the workers, so both admit
exactly the same requests: sequence i of a request with n > 1 is "<id>#i", seeded seed + i, and
waits for sequence 0's prompt so that it shares those blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from baton.kvstore.block_hash import BlockHashExtra
from baton.services.engine.request import Request
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequence_ids import sequence_id


@dataclass(frozen=True)
class SequenceFactory:
    model_id: str
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    default_cache_salt: str = ""
    generator_device: str = "cpu"
    """Where seeded requests' random generators live: the device the sampler runs on."""

    def validate_prompt(self, token_ids: list[int]) -> None:
        """Raise ValueError (an HTTP 400 upstream) for a prompt this engine cannot run."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens including at least one generated token"
            )
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def make(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        resumed_output_token_ids: Sequence[int] = (),
    ) -> list[Request]:
        """resumed_output_token_ids: tokens this request already generated elsewhere (its
        decode worker died mid-stream): the one sequence takes them as its first outputs, so
        penalties, min/max tokens and stops count them, and only what follows is emitted."""
        self.validate_prompt(token_ids)
        if resumed_output_token_ids:
            self._validate_resume(token_ids, resumed_output_token_ids, params)
        salt = self.default_cache_salt if cache_salt is None else cache_salt
        extra = BlockHashExtra(self.model_id, salt).encode()
        sequences: list[Request] = []
        for i in range(params.n):
            sequences.append(
                Request(
                    sequence_id(request_id, i, params.n),
                    token_ids,
                    params,
                    block_size=self.block_size,
                    hash_extra=extra,
                    max_model_len=self.max_model_len,
                    priority=priority,
                    eos_token_ids=self.eos_token_ids,
                    seed=None if params.seed is None else params.seed + i,
                    generator_device=self.generator_device,
                    wait_for=sequences[0] if sequences else None,
                    resumed_output_token_ids=resumed_output_token_ids,
                    draws_per_token=self.vocab_size,
                )
            )
        return sequences

    def _validate_resume(
        self, prompt: Sequence[int], outputs: Sequence[int], params: SamplingParams
    ) -> None:
        if params.n != 1:
            raise ValueError("a request resumed from its generated tokens must have n = 1")
        if len(prompt) + len(outputs) >= self.max_model_len:
            raise ValueError(
                f"the prompt and {len(outputs)} resumed tokens leave no room in this model's "
                f"context of {self.max_model_len} tokens"
            )
        if params.max_tokens is not None and len(outputs) >= params.max_tokens:
            raise ValueError(f"{len(outputs)} resumed tokens: max_tokens is reached already")
        bad = next((t for t in outputs if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

"""A request's state inside the engine: its tokens, progress, blocks' keys and timings."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from baton.kvstore.block_hash import BlockHash, hash_blocks
from baton.services.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    """Its blocks are allocated; a KV connector is filling them (asynchronous load)."""
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length" or "abort"."""
        return self.value if self.finished else None


@dataclass
class RequestTimings:
    """Wall-clock marks (time.monotonic seconds) that RequestMetrics and the TTFT split use."""

    arrival_s: float = field(default_factory=time.monotonic)
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    num_preemptions: int = 0


class Request:
    """One sequence to generate. n > 1 fans out into n Requests sharing the prompt's blocks."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        block_size: int,
        hash_extra: bytes,
        max_model_len: int,
        priority: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        seed: int | None = None,
        wait_for: Request | None = None,
        generator_device: str = "cpu",
        resumed_output_token_ids: Sequence[int] = (),
        draws_per_token: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.priority = priority
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        """Tokens whose KV is in this request's blocks (or scheduled to be, this step)."""
        self.num_output_placeholders = 0
        """Tokens a step in flight is sampling for this request, not yet appended (async
        scheduling schedules the next step before the last one's tokens are known)."""
        self.num_cached_tokens = -1
        """Prompt tokens served from the prefix cache at first admission (-1 = not yet)."""
        self.wait_for = wait_for
        """Admit only after this sibling's prompt is computed, to share its blocks (n > 1)."""
        self.kv_transfer: object | None = None
        """The KV connector's own parameters for this request (where its KV comes from or goes
        to); opaque to the scheduler, None when no connector is involved."""
        self.timings = RequestTimings()
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(generator_device).manual_seed(seed)
        self.draws_per_token = draws_per_token
        """Random draws the sampler takes from the generator per token (the vocabulary size;
        0: unknown, the generator is never advanced by hand)."""
        max_tokens = params.max_tokens
        room = max_model_len - len(prompt_token_ids)
        self.max_tokens = room if max_tokens is None else min(max_tokens, room)
        self._block_size = block_size
        self._hash_extra = hash_extra
        self.block_hashes: list[BlockHash] = hash_blocks(prompt_token_ids, block_size, hash_extra)
        for token_id in resumed_output_token_ids:
            self.append_output_token(token_id)
        self.num_resumed_tokens = len(resumed_output_token_ids)
        """Outputs generated before this request arrived (elsewhere): taken as its first
        outputs and computed as part of its prefill, never emitted again."""
        self.skip_sampled_tokens(self.num_resumed_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % self._block_size == 0:
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes += hash_blocks(
                self.all_token_ids,
                self._block_size,
                self._hash_extra,
                parent=parent,
                start_block=len(self.block_hashes),
            )

    def skip_sampled_tokens(self, num_tokens: int) -> None:
        """Advance the seeded generator past num_tokens tokens sampled elsewhere (a remote
        prefill's first token, outputs resumed from another worker), so the next token draws
        what it would have drawn here. The sampler takes exactly draws_per_token float32
        Exp(1) values per token of a random row (sampler.py), so the same draws are taken."""
        if self.generator is None or self.params.greedy or not self.draws_per_token:
            return
        device = self.generator.device
        scratch = torch.empty(self.draws_per_token, dtype=torch.float32, device=device)
        for _ in range(num_tokens):
            scratch.exponential_(generator=self.generator)

    def sort_key(self) -> tuple[int, float]:
        """Order under the priority policy: lower priority value first, then earlier arrival."""
        return (self.priority, self.timings.arrival_s)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id}, {self.status.name}, computed={self.num_computed_tokens}"
            f"/{self.num_tokens})"
        )

"""The model runner: turns a SchedulerOutput into one batched forward and one sampling call.

It keeps its own copy of each running request's token ids and block ids, updated by the
scheduler's diffs and by the tokens it samples itself, so a decode step ships no token lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.services.engine.layers.attention import AttentionMetadata
from baton.services.engine.models.base import CausalLM, ModelArchConfig
from baton.services.engine.sampler import Sampler, SamplingMetadata
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.step_io import (
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)


@dataclass
class _RunnerRequest:
    """The runner's view of one running request."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_new(cls, data: NewRequestData) -> _RunnerRequest:
        return cls(
            list(data.token_ids),
            data.num_prompt_tokens,
            list(data.block_ids),
            data.num_computed_tokens,
            data.params,
            data.generator,
            data.eos_token_ids,
        )


@dataclass(frozen=True)
class _BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]
    """Token row (in the packed batch) whose logits each sampling request needs."""
    sample_req_ids: list[str]


def kv_cache_shape(arch: ModelArchConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)


def kv_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        if device.type == "cpu":
            model.pack_for_cpu()
        self.arch = model.config
        self.block_size = block_size
        self.device = device
        self.kv_cache = torch.zeros(
            kv_cache_shape(self.arch, num_blocks, block_size), dtype=dtype, device=device
        )
        self.sampler = Sampler()
        self._requests: dict[str, _RunnerRequest] = {}

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduled)
        if scheduled.is_empty:
            return ModelRunnerOutput({}, {})
        batch = self._prepare_inputs(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        if not batch.sample_rows:
            return ModelRunnerOutput({}, {})
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return self._sample(batch.sample_req_ids, logits)

    def _update_states(self, scheduled: SchedulerOutput) -> None:
        for request_id in scheduled.finished_request_ids:
            self._requests.pop(request_id, None)
        for data in scheduled.new_requests:
            self._requests[data.request_id] = _RunnerRequest.from_new(data)
        for diff in scheduled.cached_requests:
            state = self._requests[diff.request_id]
            state.block_ids.extend(diff.new_block_ids)
            assert state.num_computed_tokens == diff.num_computed_tokens, (
                diff.request_id,
                state.num_computed_tokens,
                diff.num_computed_tokens,
            )

    def _prepare_inputs(self, scheduled: SchedulerOutput) -> _BatchInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_req_ids: list[str] = []
        bs = self.block_size
        for request_id, num_new in scheduled.num_scheduled_tokens.items():
            state = self._requests[request_id]
            start = state.num_computed_tokens
            end = start + num_new
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = state.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + num_new)
            tables.append(blocks)
            state.num_computed_tokens = end
            if end == len(state.token_ids):  # reached the end: this step samples a token
                sample_rows.append(query_start_loc[-1] - 1)
                sample_req_ids.append(request_id)
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.zeros((len(tables), max_blocks), dtype=torch.int64)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int64)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            block_tables=block_tables.to(self.device),
            seq_lens=seq_lens,
            query_start_loc=query_start_loc,
            block_size=bs,
            num_kv_heads=self.arch.num_kv_heads,
        )
        return _BatchInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            meta=meta,
            sample_rows=sample_rows,
            sample_req_ids=sample_req_ids,
        )

    def _sample(self, request_ids: list[str], logits: torch.Tensor) -> ModelRunnerOutput:
        states = [self._requests[r] for r in request_ids]
        self._mask_until_min_tokens(states, logits)
        meta = SamplingMetadata.build(
            [s.params for s in states],
            [s.token_ids[: s.num_prompt_tokens] for s in states],
            [s.token_ids[s.num_prompt_tokens :] for s in states],
            [s.generator for s in states],
            logits.shape[-1],
            device=logits.device,
        )
        out = self.sampler(logits, meta)
        token_ids = out.token_ids.tolist()
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        for row, (request_id, state) in enumerate(zip(request_ids, states, strict=True)):
            token_id = int(token_ids[row])
            state.token_ids.append(token_id)
            sampled[request_id] = token_id
            if state.params.logprobs is not None and out.logprobs is not None:
                k = state.params.logprobs
                top_ids: tuple[int, ...] = ()
                top_lps: tuple[float, ...] = ()
                if k > 0 and out.top_logprob_ids is not None and out.top_logprobs is not None:
                    top_ids = tuple(out.top_logprob_ids[row, :k].tolist())
                    top_lps = tuple(out.top_logprobs[row, :k].tolist())
                logprobs[request_id] = TokenLogprobs(
                    token_id, float(out.logprobs[row]), top_ids, top_lps
                )
        return ModelRunnerOutput(sampled, logprobs)

    @staticmethod
    def _mask_until_min_tokens(states: list[_RunnerRequest], logits: torch.Tensor) -> None:
        """Forbid EOS and stop tokens until a request has min_tokens outputs."""
        for row, state in enumerate(states):
            params = state.params
            if params.min_tokens == 0:
                continue
            if len(state.token_ids) - state.num_prompt_tokens >= params.min_tokens:
                continue
            banned = set(params.stop_token_ids)
            if not params.ignore_eos:
                banned.update(state.eos_token_ids)
            if banned:
                logits[row, sorted(banned)] = float("-inf")

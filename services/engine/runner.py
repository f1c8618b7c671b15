"""The model runner: turns a SchedulerOutput into one batched forward and one sampling call.

It keeps its own copy of each running request's token ids and block ids, updated by the
scheduler's diffs and by the tokens it samples itself, so a decode step ships no token lists.

A step is launched (`launch`: inputs copied, forward and sampler enqueued on the GPU, the
sampled ids' copy to pinned host memory started) and later collected (`collect`: wait for that
copy, hand the tokens to the scheduler). Under async scheduling the engine launches step N+1
before collecting step N: a sequence whose last input token is step N's sample takes it from
the device tensor the sampler left behind, so the host never waits inside the loop. Rows whose
sampling reads the token history (penalties, min_tokens) wait for step N's tokens first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import torch

from baton.services.engine.attention.base import AttentionSpec
from baton.services.engine.attention.registry import create_backend
from baton.services.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from baton.services.engine.host_io import array_to_device, to_device
from baton.services.engine.layers.attention import AttentionMetadata
from baton.services.engine.models.base import CausalLM, ModelArchConfig
from baton.services.engine.sampler import Sampler, SamplerOutput, SamplingMetadata
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


@dataclass
class _HostBatch:
    """One step's packed inputs as host lists (sequence s owns rows qsl[s]:qsl[s + 1])."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    """Token row (in the packed batch) whose logits each sampling request needs."""
    sample_req_ids: list[str] = field(default_factory=list)
    carried: list[tuple[int, int]] = field(default_factory=list)
    """(row of input_ids, row of the previous step's samples) for input tokens still on the
    device: the previous step sampled them and has not been collected."""

    def as_decode(self) -> DecodeBatch | None:
        """This step as a pure decode batch (one token per sequence, all sample), or None."""
        if len(self.input_ids) != len(self.seq_lens) or len(self.sample_rows) != len(self.seq_lens):
            return None
        return DecodeBatch(self.input_ids, self.positions, self.slots, self.seq_lens, self.tables)


@dataclass
class PendingStep:
    """A launched step: its sampled tokens are on their way to (pinned) host memory."""

    request_ids: list[str]
    num_logprobs: list[int | None]
    """Per row: the request's `logprobs` parameter."""
    out: SamplerOutput
    """On the host (pinned) once `done` has fired; the copies are in flight until then."""
    done: torch.cuda.Event | None
    """Recorded after the copies (None on CPU: already there)."""
    token_ids: list[int] | None = None
    """The sampled ids once they have landed and been appended to the request states."""


@dataclass(frozen=True)
class _BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


@overload
def _to_pinned(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _to_pinned(t: None) -> None: ...
def _to_pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying a device tensor into fresh pinned host memory (valid once synced)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


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
        *,
        cuda_graph_max_batch: int = 0,
        max_model_len: int = 0,
        attention_backend: str = "triton",
        pdl: bool | None = None,
    ) -> None:
        """cuda_graph_max_batch > 0 on a CUDA device captures decode graphs up to that batch
        (max_model_len then sizes their block tables and split-KV count) where the attention
        backend runs CUDA graphs. attention_backend: a name of attention.registry's
        backend_choices(), resolved for this device ("auto" and "triton" are the torch
        reference on CPU). pdl: programmatic
        dependent launch for the Triton kernels (None: where the device supports it); a
        process-wide switch, set before the graphs are captured."""
        self.model = model
        if device.type == "cpu":
            model.pack_for_cpu()
        else:
            from baton.kernels import pdl as pdl_switch

            pdl_switch.set_enabled(pdl_switch.supported(device) if pdl is None else pdl)
        self.arch = model.config
        self.block_size = block_size
        self.device = device
        self.kv_cache = torch.zeros(
            kv_cache_shape(self.arch, num_blocks, block_size), dtype=dtype, device=device
        )
        self.sampler = Sampler()
        self._requests: dict[str, _RunnerRequest] = {}
        self._pending: PendingStep | None = None
        """The last launched step whose tokens are not yet in the request states."""
        self._last_sampled: torch.Tensor | None = None
        """The last sampling step's token ids, on the device (inputs of the next step)."""
        self._last_rows: dict[str, int] = {}
        """Request id → its row in _last_sampled."""
        spec = AttentionSpec(self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim, dtype)
        self.attn_backend = create_backend(attention_backend, spec, device)
        """Chosen once; allocates what its kernels keep across steps (FlashInfer's workspace)."""
        self.graphs: DecodeGraphs | None = None
        if (
            device.type == "cuda"
            and cuda_graph_max_batch > 0
            and self.attn_backend.supports_cuda_graphs
        ):
            self.graphs = DecodeGraphs(
                model,
                self.kv_cache,
                block_size=block_size,
                max_batch=cuda_graph_max_batch,
                max_model_len=max_model_len,
                backend=self.attn_backend,
            )
            self.graphs.capture()

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Launch one step and wait for its tokens (the synchronous engine loop)."""
        pending = self.launch(scheduled)
        return ModelRunnerOutput({}, {}) if pending is None else self.collect(pending)

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> PendingStep | None:
        """Enqueue this step's forward and sampling; None when nothing was scheduled.

        Does not wait for the GPU, except for the previous step's tokens when a row's sampling
        reads the token history.
        """
        self._update_states(scheduled)
        if scheduled.is_empty:
            return None
        host = self._gather(scheduled)
        graphs = self.graphs
        if graphs is not None and (decode := host.as_decode()) and graphs.fits(decode):
            logits = graphs.run(decode, self._carry_into(host))
            return self._sample(host.sample_req_ids, logits)
        batch = self._to_device(host)
        if (carry := self._carry_into(host)) is not None:
            carry(batch.input_ids)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        if not host.sample_rows:
            return PendingStep([], [], SamplerOutput(hidden.new_empty(0), None, None, None), None)
        rows = to_device(host.sample_rows, torch.int64, self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return self._sample(host.sample_req_ids, logits)

    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's tokens; record them and return them for the scheduler."""
        token_ids = self._apply(pending)
        out = pending.out
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        rows = zip(pending.request_ids, pending.num_logprobs, strict=True)
        for row, (request_id, k) in enumerate(rows):
            token_id = token_ids[row]
            sampled[request_id] = token_id
            if k is None or out.logprobs is None:
                continue
            top_ids: tuple[int, ...] = ()
            top_lps: tuple[float, ...] = ()
            if k > 0 and out.top_logprob_ids is not None and out.top_logprobs is not None:
                top_ids = tuple(out.top_logprob_ids[row, :k].tolist())
                top_lps = tuple(out.top_logprobs[row, :k].tolist())
            logprobs[request_id] = TokenLogprobs(
                token_id, float(out.logprobs[row]), top_ids, top_lps
            )
        return ModelRunnerOutput(sampled, logprobs)

    def _apply(self, pending: PendingStep) -> list[int]:
        """Wait for a step's tokens and append them to the requests' states (once)."""
        if pending.token_ids is not None:
            return pending.token_ids
        if pending.done is not None:
            pending.done.synchronize()
        token_ids = [int(t) for t in pending.out.token_ids.tolist()]
        for request_id, token_id in zip(pending.request_ids, token_ids, strict=True):
            state = self._requests.get(request_id)
            if state is not None:  # gone if it ended or was preempted meanwhile
                state.token_ids.append(token_id)
        pending.token_ids = token_ids
        if self._pending is pending:
            self._pending = None
        return token_ids

    def _carry_into(self, host: _HostBatch) -> Callable[[torch.Tensor], object] | None:
        """A writer of the tokens still on the device into a step's input ids (or None)."""
        if not host.carried:
            return None
        assert self._last_sampled is not None
        sampled = self._last_sampled
        dst = [d for d, _ in host.carried]
        src = [s for _, s in host.carried]
        k = len(dst)
        if dst == src == list(range(k)):  # steady decode: same rows, same order
            return lambda ids: ids[:k].copy_(sampled[:k])
        dst_t = to_device(dst, torch.int64, self.device)
        src_t = to_device(src, torch.int64, self.device)
        return lambda ids: ids.index_copy_(0, dst_t, sampled.index_select(0, src_t))

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

    def _gather(self, scheduled: SchedulerOutput) -> _HostBatch:
        """This step's inputs as host lists; advances each request's num_computed_tokens."""
        host = _HostBatch()
        bs = self.block_size
        for request_id, num_new in scheduled.num_scheduled_tokens.items():
            state = self._requests[request_id]
            start = state.num_computed_tokens
            end = start + num_new
            tokens = state.token_ids[start:end]
            if len(tokens) < num_new:
                # The last input is the previous step's sample, not collected yet.
                assert len(tokens) == num_new - 1, (request_id, start, end, len(state.token_ids))
                row = self._last_rows[request_id]
                host.carried.append((len(host.input_ids) + len(tokens), row))
                tokens.append(0)
            host.input_ids.extend(tokens)
            host.positions.extend(range(start, end))
            blocks = state.block_ids
            host.slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            host.seq_lens.append(end)
            host.query_start_loc.append(host.query_start_loc[-1] + num_new)
            host.tables.append(blocks)
            state.num_computed_tokens = end
            if end >= len(state.token_ids):  # reached the end: this step samples a token
                host.sample_rows.append(host.query_start_loc[-1] - 1)
                host.sample_req_ids.append(request_id)
        return host

    def _to_device(self, host: _HostBatch) -> _BatchInputs:
        tables = host.tables
        block_tables = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        device_tables = array_to_device(block_tables, self.device)
        backend = self.attn_backend
        # Planned once here (host work and one copy, no device sync), shared by every layer.
        plan = backend.plan(device_tables, host.seq_lens, host.query_start_loc, self.block_size)
        meta = AttentionMetadata(
            slot_mapping=to_device(host.slots, torch.int64, self.device),
            block_tables=device_tables,
            seq_lens=host.seq_lens,
            query_start_loc=host.query_start_loc,
            block_size=self.block_size,
            backend=backend,
            planned=plan,
        )
        return _BatchInputs(
            input_ids=to_device(host.input_ids, torch.int64, self.device),
            positions=to_device(host.positions, torch.int64, self.device),
            meta=meta,
        )

    def _sample(self, request_ids: list[str], logits: torch.Tensor) -> PendingStep:
        """Enqueue sampling and the copy of its results to the host; returns the pending step."""
        states = [self._requests[r] for r in request_ids]
        # Token histories cost O(context) per row: copy them only for rows whose penalties or
        # min_tokens read them, after the previous step's tokens have landed.
        reads = {id(s) for s in states if s.params.reads_token_history}
        if reads and self._pending is not None:
            self._apply(self._pending)
        self._mask_until_min_tokens(states, logits)
        meta = SamplingMetadata.build(
            [s.params for s in states],
            [s.token_ids[: s.num_prompt_tokens] if id(s) in reads else [] for s in states],
            [s.token_ids[s.num_prompt_tokens :] if id(s) in reads else [] for s in states],
            [s.generator for s in states],
            logits.shape[-1],
            device=logits.device,
        )
        out = self.sampler(logits, meta)
        self._last_sampled = out.token_ids
        self._last_rows = {r: row for row, r in enumerate(request_ids)}
        done = None
        if out.token_ids.is_cuda:
            out = SamplerOutput(
                _to_pinned(out.token_ids),
                _to_pinned(out.logprobs),
                _to_pinned(out.top_logprob_ids),
                _to_pinned(out.top_logprobs),
            )
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        pending = PendingStep(request_ids, [s.params.logprobs for s in states], out, done)
        self._pending = pending
        return pending

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

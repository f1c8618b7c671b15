"""The engine's front: tokens in (prompt text or ids), text out (detokenized, stop strings).

It fans a request with n > 1 out into n sequences (the 2nd..nth wait until the first has
computed the prompt, then share its blocks through the prefix cache), feeds each sequence's new
tokens to its incremental detokenizer, ends sequences on stop strings, and gathers outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from baton.services.engine.config import EngineConfig
from baton.services.engine.detokenizer import IncrementalDetokenizer
from baton.services.engine.dtypes import resolve_dtype
from baton.services.engine.engine_core import EngineCore
from baton.services.engine.executor import RunnerOptions, UniProcExecutor
from baton.services.engine.kv_connector import KVConnector
from baton.services.engine.loader import LoadedModel, load_model
from baton.services.engine.outputs import (
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
)
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequences import SequenceFactory
from baton.services.engine.step_io import EngineCoreOutput, TokenLogprobs
from baton.services.engine.tokenizer import Tokenizer


@dataclass
class _Sequence:
    request: Request
    output: CompletionOutput
    detok: IncrementalDetokenizer | None


@dataclass
class _Tracked:
    """A user request and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence] = field(default_factory=list)

    def to_output(self) -> RequestOutput:
        first = self.sequences[0].request
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.output for s in self.sequences],
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=[_metrics(s.request) for s in self.sequences],
        )


def _metrics(r: Request) -> RequestMetrics:
    t = r.timings
    return RequestMetrics(
        arrival_s=t.arrival_s,
        first_scheduled_s=t.first_scheduled_s,
        first_token_s=t.first_token_s,
        last_token_s=t.last_token_s,
        finished_s=t.finished_s,
        num_prompt_tokens=r.num_prompt_tokens,
        num_generation_tokens=r.num_output_tokens,
        num_cached_tokens=max(r.num_cached_tokens, 0),
        num_preemptions=t.num_preemptions,
    )


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        kv_connector: KVConnector | None = None,
        worker_id: str = "",
    ) -> None:
        """kv_connector: where KV comes from or goes to outside this engine (a worker's).
        worker_id: names the engine in its KV events."""
        self.config = config
        self.model_id = loaded.model_id
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.arch = loaded.arch
        max_len = loaded.arch.max_position_embeddings
        if config.max_model_len is not None:
            max_len = min(max_len, config.max_model_len)
        options = RunnerOptions(
            dtype=resolve_dtype(config.dtype, config.device),
            device=torch.device(config.device),
            graph_max_batch=min(config.graph_max_batch, config.scheduler.max_num_seqs),
            attention_backend=config.attention_backend,
            pdl=config.pdl,
        )
        self.core = EngineCore(
            UniProcExecutor(loaded.model, options),
            config.cache,
            config.scheduler,
            max_len,
            async_scheduling=bool(config.async_scheduling),
            kv_connector=kv_connector,
            worker_id=worker_id,
        )
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = tuple(loaded.arch.eos_token_ids) or (
            self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        )
        self.sequences = SequenceFactory(
            model_id=self.model_id,
            block_size=config.cache.block_size,
            max_model_len=self.max_model_len,
            vocab_size=loaded.arch.vocab_size,
            eos_token_ids=self.eos_token_ids,
            default_cache_salt=config.cache.cache_salt,
            generator_device=config.device,
        )
        self._tracked: dict[str, _Tracked] = {}
        self._seq_owner: dict[str, tuple[_Tracked, _Sequence]] = {}
        self._ids = itertools.count()

    @classmethod
    def from_config(
        cls, config: EngineConfig, kv_connector: KVConnector | None = None, worker_id: str = ""
    ) -> LLMEngine:
        dtype = resolve_dtype(config.dtype, config.device)
        loaded = load_model(config.model, dtype, config.device, config.seed)
        return cls(config, loaded, kv_connector, worker_id)

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for a prompt that cannot run."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        text: str | None = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            text = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        tracked = _Tracked(request_id, text, token_ids)
        for i, request in enumerate(
            self.sequences.make(request_id, token_ids, params, priority, cache_salt)
        ):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, token_ids, params)
            logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
            seq = _Sequence(request, CompletionOutput(i, logprobs=logprobs), detok)
            tracked.sequences.append(seq)
        for seq in tracked.sequences:
            self.core.add_request(seq.request)
            self._seq_owner[seq.request.request_id] = (tracked, seq)
        self._tracked[request_id] = tracked
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            seq_ids = [s.request.request_id for s in tracked.sequences]
            self.core.abort(seq_ids)
            for seq_id in seq_ids:
                self._seq_owner.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that changed (finished ones last time)."""
        changed: dict[str, _Tracked] = {}
        for out in self.core.step():
            owner = self._seq_owner.get(out.request_id)
            if owner is None:
                continue
            tracked, seq = owner
            self._apply(seq, out)
            changed[tracked.request_id] = tracked
        results = []
        for request_id, tracked in changed.items():
            output = tracked.to_output()
            if output.finished:
                del self._tracked[request_id]
                for seq in tracked.sequences:
                    self._seq_owner.pop(seq.request.request_id, None)
            results.append(output)
        return results

    def stats(self) -> EngineStats:
        return self.core.stats()

    def check_integrity(self, expect_idle: bool = False) -> None:
        self.core.check_integrity(expect_idle)

    def _apply(self, seq: _Sequence, out: EngineCoreOutput) -> None:
        completion = seq.output
        completion.token_ids.extend(out.new_token_ids)
        if completion.logprobs is not None:
            completion.logprobs.extend(out.new_logprobs)
            lp = sum(x.logprob for x in out.new_logprobs)
            completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + lp
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if seq.detok is not None:
            stop_str = seq.detok.update(list(out.new_token_ids))
            if stop_str is None and finish_reason is not None:
                stop_str = seq.detok.flush()  # withheld partial characters: the text is final
            completion.text = seq.detok.output_text
            if stop_str is not None and finish_reason is None:
                # A stop string ends the sequence here even though the scheduler would go on.
                self.core.finish([seq.request.request_id], RequestStatus.FINISHED_STOPPED)
                finish_reason, stop_reason = "stop", stop_str
            elif stop_str is not None:
                finish_reason, stop_reason = "stop", stop_str
        completion.finish_reason = finish_reason
        completion.stop_reason = stop_reason

"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton.services.engine.config import EngineConfig
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.outputs import RequestOutput
from baton.services.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Batch generation on one local engine.

    Keyword arguments are the fields of EngineConfig, CacheConfig and SchedulerConfig by their
    own names (EngineConfig.from_kwargs), e.g.
    LLM(model="smollm2", dtype="bfloat16", block_size=16, max_num_seqs=32).
    """

    def __init__(self, model: str = "smollm2", **kwargs: Any) -> None:
        self.engine = LLMEngine.from_config(EngineConfig.from_kwargs(model=model, **kwargs))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is text or a list of token ids."""
        batch = _as_batch(prompts)
        params = _as_params(sampling_params, len(batch))
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(batch, params, strict=True)):
                ids.append(
                    self.engine.add_request(prompt, p, priority=priority[i] if priority else 0)
                )
        except Exception:
            self.engine.abort_request(ids)  # all or nothing: no orphan keeps the engine busy
            raise
        return self._run(ids)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer or chat template")
        conversations: list[list[Message]]
        if messages and isinstance(messages[0], dict):
            conversations = [list(messages)]  # type: ignore[arg-type]
        else:
            conversations = [list(c) for c in messages]  # type: ignore[arg-type]
        prompts: list[Prompt] = [
            tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        while pending:
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    done[output.request_id] = output
                    pending.discard(output.request_id)
        return [done[r] for r in request_ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [list(items)]  # type: ignore[arg-type]
    return items  # type: ignore[return-value]


def _as_params(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)

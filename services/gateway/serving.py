"""What chat and completions share: model check, prompt limits, sampling params, backend requests.

A request is validated completely before anything reaches a worker: pydantic checks the types
(protocol.py), SamplingParams checks the values (its ValueErrors name the parameter; we map the
engine's names to the API's, e.g. max_tokens → max_completion_tokens for chat), and a prompt
that leaves no room for one generated token is a 400 that says so. The prompt is tokenized
here, once: workers receive token ids only.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import fields

from baton.proto import worker_pb2 as pb
from baton.services.engine.sampling_params import SamplingParams, as_stop_tuple
from baton.services.engine.sequence_ids import SEPARATOR
from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway.backend import Backend
from baton.services.gateway.errors import bad_request, model_not_found, param_of
from baton.services.gateway.logprobs import TokenTexts
from baton.services.gateway.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from baton.services.gateway.streaming import Generation
from baton.services.metrics import Metrics
from baton.services.wire import params_to_pb

_PARAM_NAMES = tuple(f.name for f in fields(SamplingParams))

MAX_N = 128
"""Most choices one request may ask for: each is a sequence the worker schedules."""


class Serving:
    """The gateway's view of one served model: backend, tokenizer, limits, metrics."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        model_id: str,
        max_model_len: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.token_texts = TokenTexts(tokenizer)

    def check_model(self, model: str | None) -> None:
        """An absent model means the one served (as vLLM); any other name is a 404."""
        if model and model != self.model_id:
            raise model_not_found(model)

    def check_prompt(self, token_ids: list[int], param: str) -> None:
        if not token_ids:
            raise bad_request("The prompt is empty.", param=param)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:  # before protobuf's uint32 (a negative id would be a 500 there)
            raise bad_request(
                f"Token id {bad} is outside the vocabulary [0, {vocab}).", param=param
            )
        if len(token_ids) >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {len(token_ids)} tokens, leaving no room to generate. Shorten the "
                f"{param}.",
                param=param,
                code="context_length_exceeded",
            )

    def sampling_params(
        self,
        req: SamplingFields,
        *,
        max_tokens: int | None,
        logprobs: int | None,
        renames: dict[str, str] | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; a ValueError becomes a 400 naming the API parameter.

        renames: engine parameter name → the API's name for it in this endpoint.
        """
        if req.logit_bias:
            raise bad_request("logit_bias is not supported.", param="logit_bias")
        if not 1 <= req.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}.", param="n")
        if req.stream_options is not None and not req.stream:
            raise bad_request(
                "stream_options can only be set when stream is true.", param="stream_options"
            )
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=(
                    1.0 if req.repetition_penalty is None else req.repetition_penalty
                ),
                seed=req.seed,
                stop=as_stop_tuple(req.stop),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
            )
        except ValueError as e:
            message = str(e)
            param = param_of(message, _PARAM_NAMES)
            if param is not None and renames and param in renames:
                message = renames[param] + message[len(param) :]
                param = renames[param]
            raise bad_request(message, param=param) from e

    def generations(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        req: SamplingFields,
        request_id: str,
        arrival_s: float,
    ) -> list[Generation]:
        """One backend request per prompt; choice indices run prompt-major (OpenAI's order)."""
        try:
            params_pb = params_to_pb(params)
        except ValueError as e:  # protobuf range checks (e.g. a seed beyond int64)
            raise bad_request(f"a sampling parameter is out of range: {e}") from e
        # Unique even when a client reuses its X-Request-Id; SEPARATOR ("#") is reserved for
        # sequence ids (sequence_ids.py).
        base = f"{request_id.replace(SEPARATOR, '_')}-{secrets.token_hex(4)}"
        arrival_unix_s = time.time()
        gens: list[Generation] = []
        for i, prompt in enumerate(prompts):
            msg = pb.GenerateRequest(
                request_id=base if len(prompts) == 1 else f"{base}-{i}",
                prompt_token_ids=prompt,
                params=params_pb,
                priority=req.priority,
                cache_salt=req.cache_salt or "",
                arrival_unix_s=arrival_unix_s,
            )
            if params.max_tokens is not None:
                # The engine stops at the context anyway; clamping keeps the value in uint32.
                msg.params.max_tokens = min(params.max_tokens, self.max_model_len - len(prompt))
            gens.append(
                Generation(
                    self.backend,
                    msg,
                    params,
                    self.tokenizer,
                    first_index=i * params.n,
                    metrics=self.metrics,
                    arrival_s=arrival_s,
                )
            )
        return gens


def usage_of(gens: list[Generation]) -> UsageInfo:
    prompt = sum(g.num_prompt_tokens for g in gens)
    completion = sum(g.num_generated_tokens for g in gens)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(g.num_cached_tokens for g in gens)
        ),
    )


def now_s() -> int:
    """OpenAI's `created`: Unix seconds."""
    return int(time.time())

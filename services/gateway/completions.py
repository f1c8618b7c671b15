"""POST /v1/completions: one prompt or several (text or token ids) → choices (JSON or SSE).

Several prompts become one backend request each; their choices are numbered prompt-major
(prompt i, sequence j → index i * n + j), as OpenAI and vLLM number them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import Response

from baton.services.gateway.errors import bad_request, error_event
from baton.services.gateway.logprobs import completion_logprobs
from baton.services.gateway.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from baton.services.gateway.serving import Serving, now_s, usage_of
from baton.services.gateway.streaming import (
    SSE_DONE,
    Generation,
    event_stream,
    merge,
    route_headers,
    run_to_end,
    sse,
    start_all,
)


def completion_prompts(serving: Serving, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    """Each prompt's text (for echo) and token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif not prompt:
        raise bad_request("The prompt is empty.", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]  # one prompt of token ids
    else:
        items = list(prompt)  # type: ignore[arg-type]  # several prompts
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            ids = serving.tokenizer.encode(item)
            out.append((item, ids))
        else:
            serving.check_prompt(list(item), "prompt")  # before decode: ids must exist
            out.append((serving.tokenizer.decode(item) if req.echo else "", list(item)))
    for _, ids in out:
        serving.check_prompt(ids, "prompt")
    return out


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (it must equal n).", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo with logprobs is not supported (prompt logprobs are not computed).",
            param="echo",
        )


async def create_completion(
    serving: Serving,
    req: CompletionRequest,
    request: Request,
    request_id: str,
    arrival_s: float,
) -> Response:
    serving.check_model(req.model)
    _check_supported(req)
    prompts = await asyncio.to_thread(completion_prompts, serving, req)  # off the loop
    params = serving.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    gens = serving.generations([ids for _, ids in prompts], params, req, request_id, arrival_s)
    await start_all(request, gens)
    body_id = f"cmpl-{request_id}"
    echoes = [text if req.echo else "" for text, _ in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(serving, gens, body_id, echoes, params.logprobs, include_usage)
        return event_stream(body, gens)
    await run_to_end(request, gens)
    choices = []
    for g, echo in zip(gens, echoes, strict=True):
        for c in g.choices:
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(
                    serving.token_texts, c.logprobs, params.logprobs, len(echo)
                )
            choices.append(
                CompletionChoice(
                    index=c.index,
                    text=echo + c.detok.output_text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    resp = CompletionResponse(
        id=body_id, created=now_s(), model=serving.model_id, choices=choices, usage=usage_of(gens)
    )
    return Response(
        resp.model_dump_json(), media_type="application/json", headers=route_headers(gens)
    )


async def _stream(
    serving: Serving,
    gens: list[Generation],
    body_id: str,
    echoes: list[str],
    num_top: int | None,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    created = now_s()

    def chunk(choices: list[CompletionChoice]) -> bytes:
        msg = CompletionResponse(
            id=body_id, created=created, model=serving.model_id, choices=choices
        )
        # As OpenAI: chunks carry "usage": null only when a usage chunk will follow.
        return sse(msg.model_dump_json(exclude=None if include_usage else {"usage"}))

    # Where the next token starts in each choice's text (the legacy logprobs' text_offset).
    offsets: dict[int, int] = {}
    try:
        for g, echo in zip(gens, echoes, strict=True):
            for c in g.choices:
                offsets[c.index] = len(echo)
                if echo:
                    yield chunk([CompletionChoice(index=c.index, text=echo)])
        async for deltas in merge([g.deltas() for g in gens]):
            for d in deltas:
                index = d.choice.index
                logprobs = None
                if num_top is not None and d.logprobs:
                    logprobs = completion_logprobs(
                        serving.token_texts, d.logprobs, num_top, offsets[index]
                    )
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                finished = d.finish_reason is not None
                yield chunk(
                    [
                        CompletionChoice(
                            index=index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                            stop_reason=d.choice.stop_reason if finished else None,
                        )
                    ]
                )
        if include_usage:
            usage = CompletionResponse(
                id=body_id,
                created=created,
                model=serving.model_id,
                choices=[],
                usage=usage_of(gens),
            )
            yield sse(usage.model_dump_json())
    except Exception as e:
        yield error_event(e)
    yield SSE_DONE

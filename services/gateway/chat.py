"""POST /v1/chat/completions: messages → chat template → token ids → choices (JSON or SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from baton.services.gateway.errors import bad_request, error_event
from baton.services.gateway.logprobs import chat_logprobs
from baton.services.gateway.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    DeltaMessage,
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


def chat_prompt(serving: Serving, req: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the model's chat template, tokenized."""
    messages: list[dict[str, str]] = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"Content parts of type {part.type!r} are not supported; only text.",
                        param=f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)  # vLLM joins text parts the same way
        messages.append({"role": m.role, "content": content or ""})
    try:
        text = serving.tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt
        )
    except (jinja2.TemplateError, ValueError) as e:
        raise bad_request(f"The chat template rejected the messages: {e}", "messages") from e
    return serving.tokenizer.encode(text)


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.tools and req.tool_choice != "none":
        # OpenAI's default with tools is "auto": ignoring them silently would answer a
        # different question than the client asked.
        raise bad_request("Tool calling is not supported (tool_choice must be 'none').", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("Only response_format type 'text' is supported.", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")


async def create_chat_completion(
    serving: Serving,
    req: ChatCompletionRequest,
    request: Request,
    request_id: str,
    arrival_s: float,
) -> Response:
    serving.check_model(req.model)
    _check_supported(req)
    # Off the event loop: a long conversation takes the tokenizer seconds, and the loop serves
    # every other stream (and /health) meanwhile.
    prompt = await asyncio.to_thread(chat_prompt, serving, req)
    serving.check_prompt(prompt, "messages")
    use_new = req.max_completion_tokens is not None
    params = serving.sampling_params(
        req,
        max_tokens=req.max_completion_tokens if use_new else req.max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        renames={
            "logprobs": "top_logprobs",
            "max_tokens": "max_completion_tokens" if use_new else "max_tokens",
        },
    )
    gens = serving.generations([prompt], params, req, request_id, arrival_s)
    await start_all(request, gens)
    body_id = f"chatcmpl-{request_id}"
    num_top = params.logprobs
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(serving, gens, body_id, num_top, include_usage)
        return event_stream(body, gens)
    await run_to_end(request, gens)
    choices = []
    for c in gens[0].choices:
        logprobs = None
        if num_top is not None:
            logprobs = chat_logprobs(serving.token_texts, c.logprobs, num_top)
        choices.append(
            ChatChoice(
                index=c.index,
                message=ChatMessageOut(content=c.detok.output_text),
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    resp = ChatCompletionResponse(
        id=body_id,
        created=now_s(),
        model=serving.model_id,
        choices=choices,
        usage=usage_of(gens),
    )
    return Response(
        resp.model_dump_json(), media_type="application/json", headers=route_headers(gens)
    )


async def _stream(
    serving: Serving,
    gens: list[Generation],
    body_id: str,
    num_top: int | None,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    created = now_s()

    def chunk(choices: list[ChatChunkChoice]) -> bytes:
        msg = ChatCompletionChunk(
            id=body_id, created=created, model=serving.model_id, choices=choices
        )
        # As OpenAI: chunks carry "usage": null only when a usage chunk will follow.
        return sse(msg.model_dump_json(exclude=None if include_usage else {"usage"}))

    try:
        for c in gens[0].choices:
            yield chunk(
                [ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))]
            )
        async for deltas in merge([g.deltas() for g in gens]):
            for d in deltas:
                logprobs = None
                if num_top is not None and d.logprobs:
                    logprobs = chat_logprobs(serving.token_texts, d.logprobs, num_top)
                finished = d.finish_reason is not None
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=d.choice.index,
                            delta=DeltaMessage(content=d.text or None),
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                            stop_reason=d.choice.stop_reason if finished else None,
                        )
                    ]
                )
        if include_usage:
            usage = ChatCompletionChunk(
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

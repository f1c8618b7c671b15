"""OpenAI's HTTP request and response bodies (chat, completions, models), as pydantic v2 models.

Requests ignore fields they do not know, as vLLM and OpenAI's own server do: clients send
provider-specific extras, and rejecting them would break them for nothing. Fields we know but
cannot honour (tools, response_format, logit_bias, suffix) are rejected in serving, not here,
with a 400 that names them. vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos, skip_special_tokens, include_stop_str_in_output, priority,
cache_salt, add_generation_prompt) keep vLLM's names so clients written for vLLM work.

Numbers are parsed leniently (pydantic's lax mode, like vLLM); their ranges are checked once, by
SamplingParams, whose errors name the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
)


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ------------------------------------------------------------------------------


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False
    """Send one last chunk with `choices: []` and the request's token usage."""


class TextContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ContentPart(OpenAIRequest):
    """Any content part; only text parts are served (images and audio are 400s in serving)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(OpenAIRequest):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SamplingFields(OpenAIRequest):
    """What chat and completions requests share: sampling and stopping (OpenAI + vLLM ext)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    cache_salt: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    """Deprecated by OpenAI in favour of max_completion_tokens, which wins when both are set."""
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


# str | token ids | several strings | several token-id lists, as OpenAI and vLLM accept.
# StrictInt keeps ["1", "2"] a list of strings rather than coercing it to token ids.
CompletionPrompt = str | list[StrictInt] | list[str] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_message_for_the_union(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # pydantic reports one error per union member, which reads as noise; say it once.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "prompt must be a string, a list of token ids, a list of strings, or a list of "
                "token-id lists"
            ) from None

    max_tokens: int | None = 16
    """OpenAI's default for the legacy completions endpoint."""
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# ---- responses -----------------------------------------------------------------------------


class PromptTokensDetails(OpenAIResponse):
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache of the worker that decoded the request."""


class UsageInfo(OpenAIResponse):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIResponse):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(OpenAIResponse):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatMessageOut(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(OpenAIResponse):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """vLLM extension: the stop string or stop token id that ended the choice (None: EOS)."""


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIResponse):
    role: str | None = None
    content: str | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        # OpenAI sends {"role": ..., "content": ""} first, then {"content": ...}, and {} last.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    """Always set on a whole response; on stream chunks only in the include_usage chunk."""


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "baton"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]

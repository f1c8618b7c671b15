"""Token logprobs from the worker (ids) to OpenAI's two shapes (chat and legacy completions).

A token's text is decoded alone, so a token holding part of a UTF-8 character prints as U+FFFD;
chat's `bytes` field carries the token's exact bytes for that reason (byte-level BPE tokens map
back to bytes through GPT-2's byte↔unicode table).
"""

from __future__ import annotations

from functools import cache

from baton.proto import worker_pb2 as pb
from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway.protocol import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-ins for bytes, inverted (as in HF's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Cached text and bytes of single tokens (the vocabulary is small; lookups are hot)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        piece = self._tokenizer.id_to_token(token_id)
        decoder = _byte_decoder()
        if piece is not None and all(c in decoder for c in piece):
            raw = [decoder[c] for c in piece]
        else:
            raw = list(text.encode("utf-8"))
        self._cache[token_id] = (text, raw)
        return text, raw

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def chat_logprobs(
    texts: TokenTexts, logprobs: list[pb.TokenLogprob], num_top: int
) -> ChatChoiceLogprobs:
    content = []
    for lp in logprobs:
        token, raw = texts.get(lp.token_id)
        top = []
        for token_id, value in list(zip(lp.top_token_ids, lp.top_logprobs, strict=True))[:num_top]:
            top_token, top_raw = texts.get(token_id)
            top.append(TopLogprob(token=top_token, logprob=value, bytes=top_raw))
        content.append(
            ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=raw, top_logprobs=top)
        )
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(
    texts: TokenTexts, logprobs: list[pb.TokenLogprob], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """text_offset: where the first token starts in the choice's text (after any echo)."""
    out = CompletionLogprobs()
    for lp in logprobs:
        token = texts.text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(text_offset)
        text_offset += len(token)
        top: dict[str, float] = {}
        for token_id, value in list(zip(lp.top_token_ids, lp.top_logprobs, strict=True))[:num_top]:
            top[texts.text(token_id)] = value
        # OpenAI's legacy shape (and vLLM's) also lists the sampled token among the top ones.
        top.setdefault(token, lp.logprob)
        out.top_logprobs.append(top)
    return out

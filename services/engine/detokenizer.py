r"""Token ids → text for one request, incrementally, with stop strings and streaming hold-back.

Decoding token by token is wrong for byte-level BPE: an emoji or CJK character is often split
over several tokens, each of which decodes alone to U+FFFD. Re-decoding the whole output each
step is right but O(n) per token. We use vLLM's window technique instead:

    _ids: [ prompt context | emitted earlier ..... | window ........................... ]
                                                   ^prefix_offset   ^read_offset     ^len
                                                   \_ prefix_text _/ (emitted)
                                                   \_ new_text ______________________/

Each step decodes only the window from prefix_offset (a few tokens) and emits
new_text[len(prefix_text):] once new_text stops ending in U+FFFD (an unfinished UTF-8 sequence).
The window starts one emission back, not at the new ids, because decoders may render a token
differently at the start of a string (SentencePiece drops the leading space); prefix_text
absorbs that. The first window reaches into the prompt for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from baton.services.engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
"""What decoders print for an incomplete UTF-8 sequence: more tokens may complete it."""

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens the first window looks back over (vLLM's initial detokenization offset)."""


class TokenDecoder(Protocol):
    """The one tokenizer method the detokenizer needs (tokenizers.Tokenizer has it too)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Owns one request's output text: call update() after every step, then read the text."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._skip_special = params.skip_special_tokens
        self._max_stop_len = params.max_stop_str_len
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: the output would complete it and the length
            # arithmetic below would be off by the merged characters. Start clean instead.
            context = []
        self._ids: list[int] = context
        """Prompt context followed by every output token."""
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._last_output_offset = 0
        """Characters of output_text already handed out by get_next_output_text(delta=True)."""
        self.output_text = ""
        """Detokenized output so far, cut at the stop string once one matched."""
        self.stop_str: str | None = None
        """The stop string that ended generation, if any."""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append this step's tokens; return the stop string they completed, or None.

        Once a stop string matched, output_text is final: do not call update again.
        """
        old_len = len(self.output_text)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self.output_text += self._decode_next(force=False)
        return self._check_stop(old_len)

    def flush(self) -> str | None:
        """Emit withheld text even if it ends in U+FFFD (the request is over); idempotent.

        Returns the stop string completed by the flushed text, if any.
        """
        if self._read_offset == len(self._ids) or self.stop_str is not None:
            return None
        old_len = len(self.output_text)
        self.output_text += self._decode_next(force=True)
        return self._check_stop(old_len)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for the client: all of it (delta=False) or what is new since the last call.

        While not finished, the longest tail of output_text that could still grow into a stop
        string is held back: were it sent, a stop string completed later could not be cut.
        When finished, withheld partial characters are flushed first so the text is complete.
        """
        if finished:
            self.flush()
            end = len(self.output_text)
        else:
            end = len(self.output_text) - self._stop_prefix_len()
        if not delta:
            return self.output_text[:end]
        start = self._last_output_offset
        if end <= start:
            return ""
        self._last_output_offset = end
        return self.output_text[start:end]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_next(self, force: bool) -> str:
        """Decode the window; return the text it adds, and slide the window if it was emitted."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Nothing new (e.g. a skipped special token), or an unfinished character: wait, keeping
        # the ids in the window (past read_offset) so the next decode sees them again.
        if not force and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _check_stop(self, old_len: int) -> str | None:
        """Find a stop string completed by the text after old_len and cut output_text there.

        Only matches ending in the new text count (earlier ones were checked, or fell within
        min_tokens where stop strings are ignored). Among several, the one completed first wins,
        then the longer one (it starts earlier) — as if the text had arrived char by char.
        """
        stops = self._params.stop
        if not stops or len(self.output_token_ids) <= self._params.min_tokens:
            return None
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in stops:
            start = self.output_text.find(stop, max(0, old_len - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, start, stop = best
        self.output_text = self.output_text[
            : end if self._params.include_stop_str_in_output else start
        ]
        self.stop_str = stop
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of output_text that is a proper prefix of a stop string."""
        if self._params.include_stop_str_in_output or self.stop_str is not None:
            # A later match only cuts text after the stop string, never what precedes it.
            return 0
        text = self.output_text
        for length in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._params.stop):
                return length
        return 0

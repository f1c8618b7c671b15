"""Prompts of a wanted token length, exact with a tokenizer and approximate without.

loadgen never imports baton's engine (an import-rule test keeps the client side light); the
CLI passes a tokenizer in when it can load one. Any object with `encode(text) -> ids` and
`decode(ids) -> text` serves. Without one, a prompt of n tokens is n common English words,
which most BPE vocabularies encode as one token each; the server's usage counts stay the
source of truth for every reported length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Common short words: one token each (with their leading space) in GPT-2-, Llama- and
# SmolLM-style BPE vocabularies, so "n words" is close to "n tokens" without a tokenizer.
_WORDS_TEXT = """the of and to in is that for it as was with be by on not he this are or his from at
    which but have an they you were her she there one all we can has more their if will
    would when who so no out up into than them some time only new other these may two first
    then do any like my now over such our man me even most made after also did many before
    must through back years where much your way well down should because each just those
    people how too little state good very make world still own see men work long get here
    between both life being under never day same another know while last might us great old
    year off come since against go came right used take three himself few house use during
    without again place around however home small found thought went say part once high
    general upon school every does got united left number course war until always away
    something fact though water less public put think almost hand enough far took head yet
    government system better set told nothing night end why called didn find going look asked
    later knew point next program city business give group toward young days let room"""
WORDS = tuple(_WORDS_TEXT.split())

# Token ids drawn when ids are wanted but no tokenizer is known: clear of the low ids where
# vocabularies keep special and byte tokens, and below the size of every common vocabulary.
_FALLBACK_ID_RANGE = (1000, 30000)


class TokenizerLike(Protocol):
    """What loadgen needs of a tokenizer (baton's `Tokenizer` and HF fast tokenizers fit)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class PromptMaker:
    """Builds prompt text or token ids of n tokens from a seeded generator."""

    def __init__(self, tokenizer: TokenizerLike | None, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng

    @property
    def exact(self) -> bool:
        """Whether lengths are exact token counts (a tokenizer is known)."""
        return self.tokenizer is not None

    def _words(self, n: int) -> str:
        picks = self.rng.integers(0, len(WORDS), size=n)
        return " ".join(WORDS[i] for i in picks)

    def ids(self, n: int) -> list[int]:
        """n token ids: real words' tokens with a tokenizer, else ids from a safe range."""
        if n <= 0:
            return []
        if self.tokenizer is None:
            lo, hi = _FALLBACK_ID_RANGE
            return [int(x) for x in self.rng.integers(lo, hi, size=n)]
        ids = self.tokenizer.encode(self._words(n))
        # Each word is at least one token, so n words give at least n ids.
        return list(ids[:n])

    def text(self, n: int) -> str:
        """Text of n tokens (exact with a tokenizer: it is the decoding of n word tokens)."""
        if n <= 0:
            return ""
        if self.tokenizer is None:
            return self._words(n)
        return self.tokenizer.decode(self.ids(n))

    def make(self, n: int, as_ids: bool) -> str | list[int]:
        return self.ids(n) if as_ids else self.text(n)

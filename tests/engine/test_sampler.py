"""Sampler and SamplingParams: exact supports on hand-made logits, seeded reproducibility across
batch compositions, hand-computed penalties, logprobs against log_softmax, distribution sanity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from baton.services.engine.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p_min_p,
)
from baton.services.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")
# Binary fractions: softmax(log p) reproduces them exactly in fp32, so boundaries are exact.
PROBS = [0.5, 0.25, 0.125, 0.125]


def log_probs(*rows: Sequence[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()


def kept(masked: torch.Tensor) -> list[list[int]]:
    """Token ids left finite, per row."""
    return [torch.nonzero(row != NEG_INF).flatten().tolist() for row in masked]


def meta_for(
    params: Sequence[SamplingParams],
    vocab_size: int,
    outputs: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        vocab_size,
        eos_token_ids=eos_token_ids,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- top-k / top-p / min-p supports --------------------------------------------------------


def test_top_k_keeps_the_k_largest_per_row() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 9.0]])
    out = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([2, 3]))
    assert kept(out) == [[1, 3], [2, 3, 4]]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # survivors untouched


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    # Documented choice (as HF): ties at the boundary all survive, independent of sort order.
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]])
    assert kept(apply_top_k_top_p_min_p(logits, top_k=torch.tensor([1]))) == [[0, 2, 4]]
    assert kept(apply_top_k_top_p_min_p(logits, top_k=torch.tensor([4]))) == [[0, 2, 3, 4]]


def test_top_k_at_or_beyond_vocab_is_off() -> None:
    logits = torch.randn(2, 5)
    assert (
        kept(apply_top_k_top_p_min_p(logits, top_k=torch.tensor([5, 5]))) == [[0, 1, 2, 3, 4]] * 2
    )
    meta = meta_for([SamplingParams(top_k=100), SamplingParams(top_k=-1)], vocab_size=5)
    assert meta.top_k is None  # clamped to V: nothing to do


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.1, [0]),  # the top token always survives
        (0.5, [0]),  # exactly reached by {0}: the smallest set with mass >= top_p
        (0.5001, [0, 1]),
        (0.75, [0, 1]),
        (0.76, [0, 1, 2, 3]),  # token 2 is needed; token 3 ties with it and is kept too
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_top_p(top_p: float, expected: list[int]) -> None:
    logits = log_probs(PROBS[::-1])  # unsorted on purpose: [0.125, 0.125, 0.25, 0.5]
    out = apply_top_k_top_p_min_p(logits, top_p=torch.tensor([top_p]))
    assert kept(out) == [sorted(3 - i for i in expected)]


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.0, [0, 1, 2, 3]),
        (0.2, [0, 1, 2, 3]),
        (0.3, [0, 1]),
        (0.5, [0, 1]),
        (0.6, [0]),
        (1.0, [0]),
    ],
)
def test_min_p_is_relative_to_the_top_probability(min_p: float, expected: list[int]) -> None:
    # Threshold = min_p * 0.5: 0.25 is kept at min_p 0.5 (>=), 0.125 dropped from 0.3 on.
    logits = log_probs(PROBS)
    out = apply_top_k_top_p_min_p(logits, min_p=torch.tensor([min_p]))
    assert kept(out) == [expected]
    # Shifting logits changes nothing away from the boundary: only ratios matter.
    off_boundary = min_p + 0.01 if min_p < 1.0 else min_p
    shifted = apply_top_k_top_p_min_p(logits + 40.0, min_p=torch.tensor([off_boundary]))
    assert kept(shifted) == kept(
        apply_top_k_top_p_min_p(logits, min_p=torch.tensor([off_boundary]))
    )


def test_filters_compose_min_p_then_top_k_then_renormalized_top_p() -> None:
    logits = log_probs([0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1])
    # Row 0: top_k=2 leaves {0.4, 0.3} → renormalized 4/7 >= 0.5, so top_p keeps only token 0
    # (without renormalization it would keep two). Row 1: min_p 0.6 drops 0.2 and 0.1 first.
    out = apply_top_k_top_p_min_p(
        logits,
        top_k=torch.tensor([2, 4]),
        top_p=torch.tensor([0.5, 1.0]),
        min_p=torch.tensor([0.0, 0.6]),
    )
    assert kept(out) == [[0], [0, 1]]


# ---- greedy, penalties, logprobs ------------------------------------------------------------


def test_greedy_equals_argmax_and_metadata_is_empty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6)] * 3
    meta = meta_for(params, 100)
    assert meta.all_greedy and meta.max_num_logprobs is None
    optional = (meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.greedy_mask)
    assert all(t is None for t in optional)
    assert meta.seen_mask is None and meta.output_counts is None and meta.min_tokens_index is None
    out = Sampler()(logits, meta)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_logprobs is None


def test_penalties_change_exactly_the_expected_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    meta = meta_for(params, 5, outputs=[[1, 1, 2], [1, 1, 2]], prompts=[[0], [0]])
    # Repetition on prompt+output {0,1,2}: 2/2, -1*2, 0.5/2; then on output counts {1: 2, 2: 1}:
    # frequency -0.5*count and presence -0.25. Tokens 3 and 4 were never seen.
    expected = torch.tensor(
        [[1.0, -2.0 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, 3.0, -2.0], logits[1].tolist()]
    )
    assert torch.allclose(apply_penalties(logits, meta), expected)
    # The sampler's logprobs are taken after penalties: they match log_softmax(expected).
    greedy_penalized = SamplingParams(
        temperature=0,
        logprobs=5,
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    out = Sampler()(logits[:1], meta_for([greedy_penalized], 5, [[1, 1, 2]], [[0]]))
    assert out.top_logprobs is not None and out.top_logprob_ids is not None
    reference = expected[0].log_softmax(-1)
    assert torch.allclose(out.top_logprobs[0], reference[out.top_logprob_ids[0]])
    assert int(out.token_ids[0]) == int(expected[0].argmax())


def test_repetition_penalty_below_one_encourages_both_signs() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    meta = meta_for([SamplingParams(repetition_penalty=0.5)], 3, prompts=[[0, 1]])
    assert apply_penalties(logits, meta).tolist() == [[4.0, -1.0, 1.0]]


def test_logprobs_match_log_softmax_before_temperature() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.5, seed=7, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    out = Sampler()(logits, meta_for(params, 50, generators=[seeded(7), None, None]))
    reference = logits.log_softmax(dim=-1)
    assert out.logprobs is not None
    assert out.top_logprobs is not None and out.top_logprob_ids is not None
    assert torch.allclose(out.logprobs, reference.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.allclose(out.top_logprobs, reference.gather(1, out.top_logprob_ids))
    assert torch.allclose(out.top_logprobs, reference.topk(5, dim=-1).values)


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]] * 3)
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(2,)),
        SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0, min_tokens=1),
    ]
    meta = meta_for(params, 4, outputs=[[0], [0], [0]], eos_token_ids=[3])
    # Row 0 may not end yet (EOS 3, stop 2 banned); row 1 ignores EOS; row 2 reached min_tokens.
    assert Sampler()(logits, meta).token_ids.tolist() == [1, 3, 3]
    assert logits[0, 3] == 9.0  # the caller's logits are not modified


# ---- seeded reproducibility -----------------------------------------------------------------


def _run_target(batched: bool, steps: int = 50, vocab: int = 64) -> list[int]:
    """Sample the target row for `steps` steps, alone or in a mixed batch of 8 rows."""
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, frequency_penalty=0.3, seed=1234)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=99),
        SamplingParams(temperature=1.2, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0.9, min_p=0.1, seed=5),
        SamplingParams(temperature=0.0, seed=3, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, top_k=3, logprobs=2),
    ]
    logit_source = torch.Generator().manual_seed(0)
    target_gen = seeded(1234)
    other_gens = [seeded(p.seed) if p.seed is not None else None for p in others]
    target_out: list[int] = []
    other_outs: list[list[int]] = [[] for _ in others]
    prompt = [1, 2, 3]
    for step in range(steps):
        step_logits = torch.randn(8, vocab, generator=logit_source) * 3
        if not batched:
            meta = meta_for([target], vocab, [target_out], [prompt], [target_gen])
            target_out.append(int(Sampler()(step_logits[:1], meta).token_ids[0]))
            continue
        pos = step % 8  # the target moves around the batch
        order = [*others[:pos], target, *others[pos:]]
        outs = [*other_outs[:pos], target_out, *other_outs[pos:]]
        gens = [*other_gens[:pos], target_gen, *other_gens[pos:]]
        rows = torch.cat([step_logits[1 : pos + 1], step_logits[:1], step_logits[pos + 1 :]])
        token_ids = Sampler()(rows, meta_for(order, vocab, outs, [prompt] * 8, gens)).token_ids
        for out, token in zip(outs, token_ids.tolist(), strict=True):
            out.append(token)
    return target_out


def test_seeded_row_is_identical_alone_and_in_any_batch() -> None:
    alone = _run_target(batched=False)
    assert alone == _run_target(batched=True)
    assert len(set(alone)) > 5  # it really sampled, not a degenerate argmax


def test_different_seeds_differ_and_equal_seeds_agree() -> None:
    logits = torch.zeros(3, 1000)  # uniform: every draw is pure noise
    params = [SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(seed=1)]
    gens = [seeded(1), seeded(2), seeded(1)]
    rows: list[list[int]] = [[], [], []]
    for _ in range(50):
        token_ids = Sampler()(logits, meta_for(params, 1000, generators=gens)).token_ids
        for row, token in zip(rows, token_ids.tolist(), strict=True):
            row.append(token)
    assert rows[0] == rows[2]
    assert rows[0] != rows[1]


# ---- distribution sanity --------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: Sequence[float]) -> float:
    total = float(counts.sum())
    return sum(
        (float(c) - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True)
    )


def test_unseeded_sampling_follows_the_distribution() -> None:
    # df = 3: the 0.1% critical value is 16.3; the bound is loose on purpose.
    torch.manual_seed(0)
    n = 20000
    probs = [0.1, 0.2, 0.3, 0.4]
    out = Sampler()(log_probs(probs).expand(n, 4), meta_for([SamplingParams()] * n, 4))
    assert chi_square(torch.bincount(out.token_ids, minlength=4), probs) < 25.0


def test_seeded_sampling_with_temperature_and_top_k_follows_the_distribution() -> None:
    n = 4000
    probs = [0.1, 0.2, 0.3, 0.4]
    # temperature 2 → p^(1/2); top_k 3 drops token 0; renormalize the rest.
    weights = [0.0] + [math.sqrt(p) for p in probs[1:]]
    expected = [w / sum(weights) for w in weights]
    params = [SamplingParams(temperature=2.0, top_k=3, seed=i) for i in range(n)]
    meta = meta_for(params, 4, generators=[seeded(i) for i in range(n)])
    counts = torch.bincount(Sampler()(log_probs(probs).expand(n, 4), meta).token_ids, minlength=4)
    assert counts[0] == 0
    assert chi_square(counts[1:], expected[1:]) < 25.0


# ---- SamplingParams -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"n": True}, "n"),
    ],
)
def test_sampling_params_rejects_out_of_range(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_sampling_params_defaults_and_normalization() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (
        1,
        1.0,
        1.0,
        0,
        16,
        None,
    )
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")  # type: ignore[arg-type]
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[5]).stop_token_ids == (5,)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "bcd"]).max_stop_str_len == 3  # type: ignore[arg-type]
    SamplingParams(top_k=-1, max_tokens=None, logprobs=0, seed=-5)  # all valid

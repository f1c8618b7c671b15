"""Workloads: lengths, structure and determinism of each dataset (no server)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from baton.loadgen import sharegpt
from baton.loadgen.workloads import WorkloadConfig, build_sessions


class WordTokenizer:
    """One token per space-separated word: exact and easy to reason about."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_sharegpt_lengths_match_the_vllm_paper_means() -> None:
    ins, outs = sharegpt.sample_lengths(50000, np.random.default_rng(0))
    assert np.mean(ins) == pytest.approx(sharegpt.MEAN_INPUT_TOKENS, rel=0.03)
    assert np.mean(outs) == pytest.approx(sharegpt.MEAN_OUTPUT_TOKENS, rel=0.03)
    assert min(ins) >= 4 and max(ins) <= 1024
    assert min(outs) >= 4 and max(i + o for i, o in zip(ins, outs, strict=True)) <= 2048
    assert np.median(ins) < np.mean(ins)  # a right tail, as the paper's histogram


def test_random_lengths_and_exact_prompts_with_a_tokenizer() -> None:
    tok = WordTokenizer()
    cfg = WorkloadConfig(
        "random", num_prompts=50, input_len=40, output_len=10, range_ratio=0.5, seed=1
    )
    sessions = build_sessions(cfg, tok)
    assert len(sessions) == 50
    for s in sessions:
        (turn,) = s.turns
        assert 20 <= turn.prompt_len <= 60 and 5 <= turn.output_len <= 15
        assert isinstance(turn.prompt, str) and len(tok.encode(turn.prompt)) == turn.prompt_len
    ids = build_sessions(WorkloadConfig("random", 5, 32, 4, prompt_ids=True), tok)
    assert all(s.turns[0].prompt == s.turns[0].prompt[:32] for s in ids)
    assert all(len(s.turns[0].prompt) == 32 for s in ids)
    assert build_sessions(cfg, tok) == sessions  # same seed, same prompts
    assert build_sessions(WorkloadConfig("random", 5, 32, 4, seed=2), None) != build_sessions(
        WorkloadConfig("random", 5, 32, 4, seed=3), None
    )


def test_long_prompt_defaults_are_long_in_short_out() -> None:
    (s,) = build_sessions(WorkloadConfig("long-prompt", num_prompts=1), None)
    assert (s.turns[0].prompt_len, s.turns[0].output_len) == (4096, 16)
    assert len(str(s.turns[0].prompt).split()) == 4096


def test_shared_prefix_groups_share_their_prefix_and_interleave() -> None:
    cfg = WorkloadConfig(
        "shared-prefix", prefix_len=64, num_groups=3, questions_per_group=4, input_len=8
    )
    sessions = build_sessions(cfg, WordTokenizer())
    assert len(sessions) == 12
    by_group: dict[int, list[str]] = {}
    for s in sessions:
        by_group.setdefault(s.group, []).append(str(s.turns[0].prompt))
        assert s.turns[0].prompt_len == 72
    prefixes = {g: {p.split("\n")[0] for p in ps} for g, ps in by_group.items()}
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # distinct across groups
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)  # shuffled
    ids = build_sessions(
        WorkloadConfig(
            "shared-prefix",
            prefix_len=16,
            num_groups=2,
            questions_per_group=2,
            input_len=4,
            prompt_ids=True,
        ),
        WordTokenizer(),
    )
    heads = {tuple(s.turns[0].prompt[:16]) for s in ids if s.group == 0}
    assert len(heads) == 1 and len(ids[0].turns[0].prompt) == 20


def test_multi_turn_conversations() -> None:
    sessions = build_sessions(WorkloadConfig("multi-turn", num_prompts=3, num_turns=4), None)
    assert len(sessions) == 3 and all(len(s.turns) == 4 for s in sessions)
    assert all(isinstance(t.prompt, str) for s in sessions for t in s.turns)


def test_trace_arrivals_follow_timestamps(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 1500, "input_length": 20, "output_length": 3, "hash_ids": [1, 2]},
        {"timestamp": 1000, "input_len": 10, "output_len": 5},
        {"timestamp": 3000, "prompt": "hello there", "output_len": 2},
        {"timestamp": 2000, "input_length": 24, "output_length": 3, "hash_ids": [1, 3]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = WorkloadConfig(
        "trace",
        trace_file=str(path),
        trace_time_unit="ms",
        trace_speedup=2.0,
        trace_block_size=16,
        prompt_ids=True,
    )
    sessions = build_sessions(cfg, WordTokenizer())
    assert [s.arrival_s for s in sessions] == [0.0, 0.25, 0.5, 1.0]
    assert [s.turns[0].output_len for s in sessions] == [5, 3, 3, 2]
    assert sessions[3].turns[0].prompt == "hello there"
    a, b = sessions[1].turns[0].prompt, sessions[2].turns[0].prompt
    assert len(a) == 20 and len(b) == 24
    assert a[:16] == b[:16] and a[16:] != b[16:20]  # hash id 1 shared, 2 and 3 differ
    with pytest.raises(ValueError):
        build_sessions(WorkloadConfig("trace"), None)

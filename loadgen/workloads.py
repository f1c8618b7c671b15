"""The workloads: lists of `Session`s built from a seeded generator, one function per kind.

random        uniform lengths around --random-input-len / --random-output-len (vllm's random)
sharegpt      synthetic ShareGPT lengths (sharegpt.py), word text
shared-prefix G groups x Q questions after a long per-group prefix (SGLang's
              generated-shared-prefix, llm-d's prefix benchmarks): measures prefix caching
multi-turn    conversations; each turn's request carries the whole history, replies included
long-prompt   long prompts, short outputs: the case disaggregation is for
trace         replay of a JSONL trace; arrivals follow its timestamps
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from baton.loadgen import sharegpt
from baton.loadgen.records import Session, Turn
from baton.loadgen.text import PromptMaker, TokenizerLike

DATASETS = ("random", "sharegpt", "shared-prefix", "multi-turn", "long-prompt", "trace")

# (input_len, output_len, num_prompts) when the flags are not given.
_DEFAULTS = {
    "random": (1024, 128, 1000),
    "sharegpt": (0, 0, 1000),
    "shared-prefix": (128, 256, 0),  # question length; num_prompts = groups * questions
    "multi-turn": (128, 128, 100),  # per turn; num_prompts = conversations
    "long-prompt": (4096, 16, 100),
    "trace": (0, 0, 0),  # num_prompts 0: the whole trace
}


@dataclass(frozen=True)
class WorkloadConfig:
    """What shapes the prompts; None lengths take the dataset's defaults (_DEFAULTS)."""

    dataset: str = "random"
    num_prompts: int | None = None
    """None: the dataset's default (all groups x questions, the whole trace)."""
    input_len: int | None = None
    """random / long-prompt: prompt tokens; multi-turn: tokens per user turn."""
    output_len: int | None = None
    range_ratio: float = 0.0
    """Lengths uniform in [len * (1 - r), len * (1 + r)], as vllm's --random-range-ratio."""
    seed: int = 0
    prompt_ids: bool = False
    """Send token ids instead of text (completions endpoint only)."""
    prefix_len: int = 2048
    """shared-prefix: tokens of each group's common prefix (SGLang's default)."""
    num_groups: int = 64
    questions_per_group: int = 16
    num_turns: int = 5
    sharegpt_output_len: int | None = None
    """Override every ShareGPT output length (as vllm's --sharegpt-output-len)."""
    trace_file: str = ""
    trace_time_unit: str = "s"
    """Unit of the trace's timestamps: "s" or "ms" (Mooncake's traces use ms)."""
    trace_speedup: float = 1.0
    trace_block_size: int = 512
    """Tokens per entry of a trace's hash_ids (Mooncake: 512): equal ids, equal blocks."""


def _lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}")
    lo = max(1, int(mean * (1 - ratio)))
    hi = max(lo, int(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def _sizes(cfg: WorkloadConfig) -> tuple[int, int, int]:
    in_len, out_len, num = _DEFAULTS[cfg.dataset]
    return (
        cfg.input_len if cfg.input_len is not None else in_len,
        cfg.output_len if cfg.output_len is not None else out_len,
        cfg.num_prompts if cfg.num_prompts is not None else num,
    )


def random_sessions(cfg: WorkloadConfig, maker: PromptMaker) -> list[Session]:
    in_len, out_len, n = _sizes(cfg)
    ins = _lengths(in_len, cfg.range_ratio, n, maker.rng)
    outs = _lengths(out_len, cfg.range_ratio, n, maker.rng)
    return [
        Session((Turn(maker.make(i, cfg.prompt_ids), i, o),), group=k)
        for k, (i, o) in enumerate(zip(ins, outs, strict=True))
    ]


def sharegpt_sessions(cfg: WorkloadConfig, maker: PromptMaker) -> list[Session]:
    _, _, n = _sizes(cfg)
    ins, outs = sharegpt.sample_lengths(n, maker.rng)
    if cfg.sharegpt_output_len is not None:
        outs = [cfg.sharegpt_output_len] * n
    return [
        Session((Turn(maker.make(i, cfg.prompt_ids), i, o),), group=k)
        for k, (i, o) in enumerate(zip(ins, outs, strict=True))
    ]


def shared_prefix_sessions(cfg: WorkloadConfig, maker: PromptMaker) -> list[Session]:
    """Every question of a group starts with that group's prefix; the order is shuffled (as
    SGLang does) so a group's requests interleave with the others' and the cache is tested."""
    question_len, out_len, n = _sizes(cfg)
    sessions = []
    for g in range(cfg.num_groups):
        prefix = maker.make(cfg.prefix_len, cfg.prompt_ids)
        for _ in range(cfg.questions_per_group):
            question = maker.make(question_len, cfg.prompt_ids)
            if isinstance(prefix, list) and isinstance(question, list):
                prompt: str | list[int] = prefix + question
            else:
                prompt = f"{prefix}\n{question}"
            turn = Turn(prompt, cfg.prefix_len + question_len, out_len)
            sessions.append(Session((turn,), group=g))
    order = maker.rng.permutation(len(sessions))
    shuffled = [sessions[i] for i in order]
    return shuffled[:n] if n else shuffled


def multi_turn_sessions(cfg: WorkloadConfig, maker: PromptMaker) -> list[Session]:
    """Conversations of --num-turns user messages; the runner adds the replies it receives."""
    in_len, out_len, n = _sizes(cfg)
    sessions = []
    for k in range(n):
        ins = _lengths(in_len, cfg.range_ratio, cfg.num_turns, maker.rng)
        outs = _lengths(out_len, cfg.range_ratio, cfg.num_turns, maker.rng)
        turns = tuple(Turn(maker.text(i), i, o) for i, o in zip(ins, outs, strict=True))
        sessions.append(Session(turns, group=k))
    return sessions


def _first(row: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    return None


def _trace_prompt(
    row: dict[str, Any],
    in_len: int,
    cfg: WorkloadConfig,
    maker: PromptMaker,
    blocks: dict[Any, str | list[int]],
) -> str | list[int]:
    """A row's prompt: its text, else hash_ids blocks (equal ids → equal content), else new."""
    hash_ids = row.get("hash_ids")
    if not hash_ids:
        return maker.make(in_len, cfg.prompt_ids)
    parts = []
    for h in hash_ids:
        if h not in blocks:
            blocks[h] = maker.make(cfg.trace_block_size, cfg.prompt_ids)
        parts.append(blocks[h])
    if cfg.prompt_ids:
        return [int(t) for part in parts for t in part][:in_len]
    return " ".join(str(p) for p in parts)


def trace_sessions(cfg: WorkloadConfig, maker: PromptMaker) -> list[Session]:
    """JSONL rows {timestamp, input_len | input_length | prompt, output_len | output_length,
    [hash_ids]}; arrivals are the timestamps relative to the first one."""
    if not cfg.trace_file:
        raise ValueError("--dataset-name trace needs --trace-file")
    scale = {"s": 1.0, "ms": 1e-3}[cfg.trace_time_unit]
    rows = []
    for lineno, line in enumerate(Path(cfg.trace_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "timestamp" not in row:
            raise ValueError(f"{cfg.trace_file}:{lineno}: no timestamp")
        rows.append(row)
    rows.sort(key=lambda r: float(r["timestamp"]))
    _, default_out, n = _sizes(cfg)
    rows = rows[:n] if n else rows
    first = float(rows[0]["timestamp"]) if rows else 0.0
    blocks: dict[Any, str | list[int]] = {}
    sessions = []
    for k, row in enumerate(rows):
        out_len = int(_first(row, "output_len", "output_length", "max_tokens") or default_out)
        text = row.get("prompt")
        if isinstance(text, str):
            turn = Turn(text, int(_first(row, "input_len", "input_length") or 0), out_len)
        else:
            in_len = int(_first(row, "input_len", "input_length"))
            turn = Turn(_trace_prompt(row, in_len, cfg, maker, blocks), in_len, out_len)
        arrival = (float(row["timestamp"]) - first) * scale / cfg.trace_speedup
        sessions.append(Session((turn,), arrival_s=arrival, group=k))
    return sessions


_BUILDERS = {
    "random": random_sessions,
    "long-prompt": random_sessions,
    "sharegpt": sharegpt_sessions,
    "shared-prefix": shared_prefix_sessions,
    "multi-turn": multi_turn_sessions,
    "trace": trace_sessions,
}


def build_sessions(cfg: WorkloadConfig, tokenizer: TokenizerLike | None) -> list[Session]:
    """The sessions of one run, the same for the same config, seed and tokenizer."""
    if cfg.dataset not in _BUILDERS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose from {DATASETS}")
    # The dataset's name joins the seed: two workloads run with one seed against a warm server
    # would otherwise share their first words and fake prefix-cache hits.
    maker = PromptMaker(
        tokenizer, np.random.default_rng([cfg.seed, zlib.crc32(cfg.dataset.encode())])
    )
    return _BUILDERS[cfg.dataset](cfg, maker)

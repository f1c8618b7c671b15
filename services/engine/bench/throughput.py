"""Offline throughput: baton's engine vs transformers' batched generate on the same prompts.

    python -m baton.services.engine.bench [--num-prompts 16] [--new-tokens 64] [--dtypes float32]

`python -m baton.services.engine.bench.throughput` is the same. Both sides run on the CPU
(LLM's default device) and get the same chat-templated prompts, greedy decoding and exactly
--new-tokens output tokens per prompt (EOS ignored), all requests submitted at once; each side
runs once to warm up, then --repeats timed runs (best kept). Prints a table and writes JSON
(--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from baton.services.engine.llm import LLM
from baton.services.engine.loader import default_gguf_path
from baton.services.engine.sampling_params import SamplingParams

TOPICS = [
    "the history of the printing press",
    "how vaccines train the immune system",
    "why leaves change colour in autumn",
    "the rules of chess for a beginner",
    "how a bicycle stays upright",
    "the water cycle",
    "what makes bread rise",
    "how airplanes fly",
    "the life of honeybees",
    "how to learn a new language",
    "why the moon has phases",
    "how computers store numbers",
    "the causes of tides",
    "how to plant tomatoes",
    "the basics of saving money",
    "what volcanoes are",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Row:
    system: str
    dtype: str
    num_requests: int
    new_tokens: int
    seconds: float
    tokens_per_s: float


def _prompts(llm: LLM, num: int) -> list[list[int]]:
    tok = llm.engine.tokenizer
    assert tok is not None
    out = []
    for i in range(num):
        msg = f"Explain {TOPICS[i % len(TOPICS)]} in a few paragraphs."
        text = tok.apply_chat_template([{"role": "user", "content": msg}])
        out.append(tok.encode(text))
    return out


def bench_baton(llm: LLM, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up (also fills the prefix cache: reset it below)
    best = float("inf")
    for _ in range(repeats):
        llm.engine.core.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return best


@torch.inference_mode()
def bench_transformers(
    prompts: list[list[int]], new_tokens: int, dtype: torch.dtype, repeats: int
) -> float:
    from transformers import AutoModelForCausalLM

    path = Path(default_gguf_path())
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype
    )
    model.eval()
    pad = 2
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs: dict[str, Any] = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        best = min(best, time.perf_counter() - t0)
        assert out.shape[1] == width + new_tokens
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m baton.services.engine.bench",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_out/engine_bench.json")
    a = ap.parse_args(argv)
    rows: list[Row] = []
    total = a.num_prompts * a.new_tokens
    for name in a.dtypes.split(","):
        llm = LLM(dtype=name)
        prompts = _prompts(llm, a.num_prompts)
        s = bench_baton(llm, prompts, a.new_tokens, a.repeats)
        rows.append(Row("baton", name, a.num_prompts, a.new_tokens, s, total / s))
        del llm
        s = bench_transformers(prompts, a.new_tokens, _DTYPES[name], a.repeats)
        rows.append(Row("transformers", name, a.num_prompts, a.new_tokens, s, total / s))
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(f"{'system':<13} {'dtype':<9} {'reqs':>4} {'new tok':>7} {'seconds':>8} {'tok/s':>8}")
    for r in rows:
        print(
            f"{r.system:<13} {r.dtype:<9} {r.num_requests:>4} {r.new_tokens:>7} "
            f"{r.seconds:>8.2f} {r.tokens_per_s:>8.1f}"
        )
    ratios = {}
    for name in a.dtypes.split(","):
        b = next(r for r in rows if r.system == "baton" and r.dtype == name)
        t = next(r for r in rows if r.system == "transformers" and r.dtype == name)
        ratios[name] = b.tokens_per_s / t.tokens_per_s
        print(f"baton / transformers ({name}): {ratios[name]:.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

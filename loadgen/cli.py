"""`baton bench serve` (flags compatible with `vllm bench serve`) and `baton bench compare`.

services/cli.py mounts these subcommands and passes a tokenizer loader in; loadgen itself
imports nothing of the engine, so `python -m baton.loadgen.cli` works with only a
tokenizer.json (--tokenizer path) or with approximate lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from baton.loadgen.arrivals import parse_rate, parse_rates
from baton.loadgen.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, ClientConfig
from baton.loadgen.metrics import METRICS, parse_goodput
from baton.loadgen.report import (
    build_result,
    format_sweep_table,
    format_table,
    load_json,
    now_stamp,
    rate_json,
    results_of,
    save_json,
)
from baton.loadgen.runner import RunConfig, RunResult, run_rate, run_sweep
from baton.loadgen.text import TokenizerLike
from baton.loadgen.workloads import DATASETS, WorkloadConfig, build_sessions

TokenizerLoader = Callable[[str], TokenizerLike | None]
_ID_DATASETS = ("random", "long-prompt", "shared-prefix", "trace")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    """The `serve` and `compare` subcommands under a `bench` parser."""
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("serve", help="load an OpenAI-compatible server; table, JSON, plots")
    a = p.add_argument
    a("--base-url", default=None, help="default http://HOST:PORT")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--endpoint", default=None, help=f"{COMPLETIONS_ENDPOINT} (default) or {CHAT_ENDPOINT}")
    a("--model", default=None, help="default: the server's first model (/v1/models)")
    a("--tokenizer", default=None, help="model name or tokenizer.json; 'none': approximate")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    a("--dataset-name", default="random", choices=DATASETS)
    a("--num-prompts", type=int, default=None, help="sessions (conversations for multi-turn)")
    a("--request-rate", type=parse_rate, default=math.inf, help="req/s, or inf")
    a("--request-rates", type=parse_rates, default=None, help="sweep, e.g. 1,2,4,inf")
    a("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    a("--max-concurrency", type=int, default=None)
    a("--random-input-len", type=int, default=None, help="random 1024, long-prompt 4096")
    a("--random-output-len", type=int, default=None, help="random 128, long-prompt 16")
    a("--random-range-ratio", type=float, default=0.0)
    a("--prompt-format", default="auto", choices=["auto", "ids", "text"])
    a("--sharegpt-output-len", type=int, default=None)
    a("--prefix-len", type=int, default=2048, help="shared-prefix: tokens per group prefix")
    a("--num-groups", type=int, default=64)
    a("--questions-per-group", type=int, default=16)
    a("--question-len", type=int, default=None, help="shared-prefix question tokens (128)")
    a("--num-turns", type=int, default=5, help="multi-turn: user turns per conversation")
    a("--trace-file", default="")
    a("--trace-time-unit", default="s", choices=["s", "ms"])
    a("--trace-speedup", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--temperature", type=float, default=0.0)
    a("--ignore-eos", action="store_true")
    a("--extra-body", type=json.loads, default={}, help="JSON merged into every request")
    a("--goodput", nargs="+", default=[], help="SLOs in ms: ttft:500 tpot:50 e2el:2000")
    a("--percentile-metrics", default=",".join(METRICS))
    a("--metric-percentiles", default="99", help="e.g. 50,90,95,99")
    a("--timeout", type=float, default=600.0, help="seconds per request")
    a("--max-duration", type=float, default=None, help="seconds per rate; the rest is cut")
    a("--save-result", action="store_true")
    a("--save-detailed", action="store_true", help="also store the generated texts")
    a("--result-dir", default=".")
    a("--result-filename", default=None)
    a("--label", default=None, help="name in compare plots")
    a("--no-plots", action="store_true")
    a("--disable-tqdm", action="store_true")
    a("--skip-initial-test", action="store_true")
    c = sub.add_parser("compare", help="plot several result files side by side")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--out", type=Path, default=Path("compare.png"))
    c.add_argument("--labels", default=None, help="comma-separated, default: each file's label")


def _first_model(base_url: str, api_key: str) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30, trust_env=False)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


class _JsonTokenizer:
    """A tokenizer.json through the `tokenizers` library (no engine import)."""

    def __init__(self, path: str) -> None:
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids))
        return text


def _tokenizer(
    name: str | None, model: str, loader: TokenizerLoader | None
) -> tuple[str, TokenizerLike | None]:
    """(tokenizer id, tokenizer): the named one, smollm2 when the model is SmolLM2, else none."""
    if name is None and "smollm2" in model.lower():
        name = "smollm2"
    if not name or name.lower() == "none":
        return "", None
    try:
        path = Path(name)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return name, _JsonTokenizer(str(path / "tokenizer.json"))
        if path.suffix == ".json" and path.is_file():
            return name, _JsonTokenizer(name)
        if loader is not None:
            return name, loader(name)
    except Exception as e:  # any loader failure: fall back to approximate lengths
        print(
            f"warning: tokenizer {name!r} unavailable ({e}); lengths approximate", file=sys.stderr
        )
    return "", None


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _stem(a: argparse.Namespace, model: str, rates: Sequence[float]) -> str:
    if a.result_filename:
        return Path(a.result_filename).stem
    rate = "sweep" if len(rates) > 1 else f"{rate_json(rates[0])}qps"
    conc = f"-concurrency{a.max_concurrency}" if a.max_concurrency else ""
    return f"baton-{a.dataset_name}-{rate}{conc}-{model.split('/')[-1]}-{now_stamp()}"


def cmd_serve(a: argparse.Namespace, tokenizer_loader: TokenizerLoader | None) -> int:
    base_url = (a.base_url or f"http://{a.host}:{a.port}").rstrip("/")
    endpoint = a.endpoint or (
        CHAT_ENDPOINT if a.dataset_name == "multi-turn" else COMPLETIONS_ENDPOINT
    )
    client = ClientConfig(base_url, endpoint, "", a.api_key, a.timeout, a.temperature)
    if a.dataset_name == "multi-turn" and not client.chat:
        print("multi-turn needs the chat endpoint (history of messages)", file=sys.stderr)
        return 2
    model = a.model or _first_model(base_url, a.api_key)
    tokenizer_id, tokenizer = _tokenizer(a.tokenizer, model, tokenizer_loader)
    if tokenizer is None:
        print(
            "note: no tokenizer; prompt lengths are approximate (n words for n tokens), "
            "reported lengths are the server's usage",
            file=sys.stderr,
        )
    if a.prompt_format == "ids" and client.chat:
        print("--prompt-format ids needs the completions endpoint", file=sys.stderr)
        return 2
    prompt_ids = a.prompt_format == "ids" or (
        a.prompt_format == "auto"
        and not client.chat
        and tokenizer is not None
        and a.dataset_name in _ID_DATASETS
    )
    client = ClientConfig(
        base_url, endpoint, model, a.api_key, a.timeout, a.temperature, a.ignore_eos, a.extra_body
    )
    slos = parse_goodput(a.goodput)
    percentiles = _floats(a.metric_percentiles)
    metrics = [m.strip() for m in a.percentile_metrics.split(",") if m.strip()]
    rates = a.request_rates or [a.request_rate]

    def sessions(seed: int) -> Sequence[Any]:
        return build_sessions(
            WorkloadConfig(
                dataset=a.dataset_name,
                num_prompts=a.num_prompts,
                input_len=a.question_len if a.question_len is not None else a.random_input_len,
                output_len=a.random_output_len,
                range_ratio=a.random_range_ratio,
                seed=seed,
                prompt_ids=prompt_ids,
                prefix_len=a.prefix_len,
                num_groups=a.num_groups,
                questions_per_group=a.questions_per_group,
                num_turns=a.num_turns,
                sharegpt_output_len=a.sharegpt_output_len,
                trace_file=a.trace_file,
                trace_time_unit=a.trace_time_unit,
                trace_speedup=a.trace_speedup,
            ),
            tokenizer,
        )

    label = a.label or f"{a.dataset_name}{'-chat' if client.chat else ''}"
    stem = _stem(a, model, rates)
    out_dir = Path(a.result_dir)
    results: list[dict[str, Any]] = []

    def report(run: RunResult) -> None:
        settings = {
            "date": now_stamp(),
            "backend": "openai-chat" if client.chat else "openai",
            "label": label,
            "model_id": model,
            "tokenizer_id": tokenizer_id or None,
            "base_url": base_url,
            "endpoint": endpoint,
            "dataset_name": a.dataset_name,
            "num_prompts": len(run.sessions),
            "burstiness": a.burstiness,
            "max_concurrency": a.max_concurrency,
            "seed": a.seed,
            "prompt_format": "ids" if prompt_ids else "text",
            "exact_prompt_lengths": tokenizer is not None,
            "timeout": a.timeout,
            "max_duration": a.max_duration,
        }
        result = build_result(
            run,
            settings,
            slos_ms=slos or None,
            percentiles=percentiles,
            metrics=metrics,
            save_texts=a.save_detailed,
        )
        results.append(result)
        print(format_table(result, percentiles, metrics))
        if a.save_result:
            name = stem if len(rates) == 1 else f"{stem}-{rate_json(run.request_rate)}qps"
            save_json(result, out_dir / f"{name}.json")
            if not a.no_plots:
                from baton.loadgen.plots import plot_cdfs  # matplotlib: only when plotting

                plot_cdfs([(label, result)], out_dir / f"{name}-cdf.png", title=name)
            print(f"saved {out_dir / name}.json", file=sys.stderr)

    run = RunConfig(
        request_rate=rates[0],
        burstiness=a.burstiness,
        max_concurrency=a.max_concurrency,
        max_duration_s=a.max_duration,
        seed=a.seed,
        progress=not a.disable_tqdm,
        initial_test=not a.skip_initial_test,
    )
    try:
        if len(rates) == 1:
            report(run_rate(client, run, sessions(a.seed)))
        else:
            run_sweep(client, run, rates, sessions, on_result=report)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(rates) > 1:
        print(format_sweep_table(results))
        if a.save_result:
            sweep = {"type": "sweep", "label": label, "model_id": model, "date": now_stamp()}
            sweep.update({"request_rates": [rate_json(r) for r in rates], "results": results})
            save_json(sweep, out_dir / f"{stem}.json")
            if not a.no_plots:
                from baton.loadgen.plots import plot_sweep

                plot_sweep([(label, results)], out_dir / f"{stem}.png")
    return 0 if any(r["completed"] for r in results) else 1


def cmd_compare(a: argparse.Namespace) -> int:
    """Several result files → one plot: a rate sweep if any file is one, else latency CDFs."""
    from baton.loadgen.plots import plot_cdfs, plot_sweep

    data = [load_json(f) for f in a.files]
    labels = a.labels.split(",") if a.labels else []
    labels += [str(d.get("label") or f.stem) for d, f in zip(data, a.files, strict=True)][
        len(labels) :
    ]
    if len(set(labels)) < len(labels):  # equal labels would merge lines in the legend
        labels = [f"{label} ({f.stem})" for label, f in zip(labels, a.files, strict=True)]
    groups = [(label, results_of(d)) for label, d in zip(labels, data, strict=True)]
    rows = [r for _, rs in groups for r in rs]
    print(format_sweep_table(rows, [label for label, rs in groups for _ in rs]))
    if any(d.get("type") == "sweep" for d in data):
        plot_sweep(groups, a.out)
    else:
        plot_cdfs([(label, rs[0]) for label, rs in groups], a.out, title=" vs ".join(labels))
    print(f"saved {a.out}", file=sys.stderr)
    return 0


def run_bench(a: argparse.Namespace, tokenizer_loader: TokenizerLoader | None = None) -> int:
    """Entry for a parsed `bench` command; tokenizer_loader maps a model name to a tokenizer."""
    if a.bench_command == "compare":
        return cmd_compare(a)
    return cmd_serve(a, tokenizer_loader)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

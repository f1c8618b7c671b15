"""Result JSON under `vllm bench serve`'s field names, and the terminal tables.

A result holds the run's settings (date, backend, model_id, num_prompts, request_rate,
burstiness, max_concurrency, ...), the aggregates of `metrics.summarize` (mean/median/std/p<p>
of ttft/tpot/itl/e2el in ms, throughputs, goodput, error counts) and per-request arrays
(input_lens, output_lens, ttfts, itls, e2els, tpots, start_times in seconds, errors). A sweep
file holds one such result per rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from baton.loadgen.metrics import METRICS, percentile, percentile_key, summarize, tpot_s
from baton.loadgen.runner import RunResult

_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def now_stamp() -> str:
    """vllm's date format in result files: 20250101-120000."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def rate_json(rate: float) -> float | str:
    """JSON has no infinity; vllm writes "inf"."""
    return "inf" if math.isinf(rate) else rate


def rate_value(value: float | str) -> float:
    return math.inf if value == "inf" else float(value)


def build_result(
    run: RunResult,
    settings: Mapping[str, Any],
    *,
    slos_ms: Mapping[str, float] | None,
    percentiles: Sequence[float],
    metrics: Sequence[str] = METRICS,
    save_texts: bool = False,
) -> dict[str, Any]:
    """One rate's JSON: settings, then aggregates, then per-request arrays."""
    recs = sorted(run.records, key=lambda r: r.start_s)
    result: dict[str, Any] = dict(settings)
    result["request_rate"] = rate_json(run.request_rate)
    result["goodput"] = dict(slos_ms or {})
    result["num_requests"] = run.num_requests
    result["not_sent"] = run.num_not_sent
    result.update(
        summarize(recs, run.duration_s, slos_ms=slos_ms, percentiles=percentiles, metrics=metrics)
    )
    result.update(
        {
            "input_lens": [r.prompt_len for r in recs],
            "output_lens": [r.output_len if r.success else 0 for r in recs],
            "ttfts": [r.ttft_s if r.success else 0.0 for r in recs],
            "itls": [r.itl_s if r.success else [] for r in recs],
            "tpots": [tpot_s(r) or 0.0 for r in recs],
            "e2els": [r.e2el_s if r.success else 0.0 for r in recs],
            "start_times": [r.start_s for r in recs],
            "cached_tokens": [r.cached_tokens for r in recs],
            "success": [r.success for r in recs],
            "errors": [f"{r.error_kind}: {r.error}" if not r.success else "" for r in recs],
            "requests_without_usage": sum(1 for r in recs if r.success and not r.usage_reported),
        }
    )
    if save_texts:
        result["generated_texts"] = [r.text for r in recs]
    return result


def samples_ms(result: Mapping[str, Any], name: str) -> list[float]:
    """A metric's per-request samples (ms) of successful requests, from a result's arrays."""
    ok = result.get("success") or [True] * len(result["ttfts"])
    if name == "itl":
        return [
            g * 1000 for good, gaps in zip(ok, result["itls"], strict=True) if good for g in gaps
        ]
    key = {"ttft": "ttfts", "tpot": "tpots", "e2el": "e2els"}[name]
    lens = result["output_lens"]
    return [
        v * 1000
        for good, v, n in zip(ok, result[key], lens, strict=True)
        if good and (name != "tpot" or n > 1)
    ]


def p_ms(result: Mapping[str, Any], name: str, p: float) -> float:
    return percentile(samples_ms(result, name), p)


def _line(label: str, value: Any, fmt: str = "") -> str:
    if isinstance(value, float) and not fmt:
        fmt = ".2f"
    return f"{label:<40} {value:<10{fmt}}"


def format_table(
    result: Mapping[str, Any], percentiles: Sequence[float], metrics: Sequence[str] = METRICS
) -> str:
    """vllm's "Serving Benchmark Result" block, plus goodput, cache hits and errors."""
    lines = [
        "{:=^50}".format(" Serving Benchmark Result "),
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
    ]
    if result.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", result["max_concurrency"]))
    rate = result["request_rate"]
    lines.append(_line("Request rate configured (RPS):", rate if rate == "inf" else float(rate)))
    lines += [
        _line("Benchmark duration (s):", float(result["duration"])),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Prefix-cache hit tokens:", result["total_cached_tokens"]),
        _line("Request throughput (req/s):", float(result["request_throughput"])),
    ]
    if result.get("request_goodput") is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in result["goodput"].items())
        lines.append(_line("Request goodput (req/s):", float(result["request_goodput"])))
        lines.append(_line("Goodput SLOs (ms):", slos))
    lines += [
        _line("Output token throughput (tok/s):", float(result["output_throughput"])),
        _line("Peak output token throughput (tok/s):", float(result["max_output_tokens_per_s"])),
        _line("Peak concurrent requests:", result["max_concurrent_requests"]),
        _line("Total token throughput (tok/s):", float(result["total_token_throughput"])),
    ]
    for name in metrics:
        title, short = _TITLES[name]
        lines.append(f"{title:-^50}")
        lines.append(_line(f"Mean {short} (ms):", float(result[f"mean_{name}_ms"])))
        lines.append(_line(f"Median {short} (ms):", float(result[f"median_{name}_ms"])))
        for p in percentiles:
            key = percentile_key(p)
            lines.append(_line(f"P{key} {short} (ms):", float(result[f"p{key}_{name}_ms"])))
    if result.get("error_counts"):
        lines.append("{:-^50}".format("Errors"))
        for kind, count in result["error_counts"].items():
            lines.append(_line(f"{kind}:", count))
    lines.append("=" * 50)
    return "\n".join(lines)


def format_sweep_table(results: Sequence[Mapping[str, Any]], labels: Sequence[str] = ()) -> str:
    """One row per result: rate, throughput, goodput and p90 latencies (compare and sweeps)."""
    head = (
        f"{'label':<18} {'rate':>6} {'ok':>5} {'err':>4} {'req/s':>7} {'good/s':>7} "
        f"{'tok/s':>8} {'p90 TTFT':>9} {'p90 TPOT':>9} {'p90 ITL':>8} {'p90 E2EL':>9}"
    )
    rows = [head, "-" * len(head)]
    for i, r in enumerate(results):
        label = labels[i] if i < len(labels) else str(r.get("label") or "")
        good = r.get("request_goodput")
        rows.append(
            f"{label[:18]:<18} {r['request_rate']!s:>6} {r['completed']:>5} {r['failed']:>4} "
            f"{r['request_throughput']:>7.2f} {'-' if good is None else f'{good:.2f}':>7} "
            f"{r['output_throughput']:>8.1f} {p_ms(r, 'ttft', 90):>9.1f} "
            f"{p_ms(r, 'tpot', 90):>9.1f} {p_ms(r, 'itl', 90):>8.1f} {p_ms(r, 'e2el', 90):>9.1f}"
        )
    return "\n".join(rows)


def save_json(data: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def results_of(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-rate results of a file: a sweep's list, or the single result itself."""
    if data.get("type") == "sweep":
        return list(data["results"])
    return [dict(data)]

"""Pure functions from request records to the numbers `vllm bench serve` reports.

Conventions follow vllm's `calculate_metrics` so results compare one to one: percentiles use
numpy's default linear interpolation; TPOT is (e2el - ttft) / (output_tokens - 1), i.e. it
excludes the first token and is undefined for single-token outputs (those are left out of the
TPOT statistics but count as meeting a TPOT SLO); ITL is one gap per content chunk; failed
requests count in no latency statistic and never towards goodput.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from baton.loadgen.records import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """numpy's linear-interpolation percentile (vllm's convention); 0.0 for no values."""
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def percentile_key(p: float) -> str:
    """vllm spells p99 as "99" and p99.9 as "99.9"."""
    return str(int(p)) if float(p).is_integer() else str(p)


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first; None when there is no second token."""
    if not record.success or record.output_len <= 1:
        return None
    return (record.e2el_s - record.ttft_s) / (record.output_len - 1)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] (milliseconds) → {"ttft": 500.0, "tpot": 50.0}."""
    slos: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            key, sep, value = part.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"goodput wants KEY:MS with KEY in {SLO_KEYS}, got {part!r}")
            ms = float(value)
            if not ms > 0:
                raise ValueError(f"goodput SLO must be positive: {part!r}")
            slos[key] = ms
    return slos


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """A successful request is good when every given SLO holds (<=, as vllm's check)."""
    if not record.success:
        return False
    observed_s = {
        "ttft": record.ttft_s,
        # vllm counts a single-token output's TPOT as 0: it meets any TPOT SLO.
        "tpot": tpot_s(record) or 0.0,
        "e2el": record.e2el_s,
    }
    return all(observed_s[key] <= ms / 1000.0 for key, ms in slos_ms.items())


def latency_samples_s(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric samples in seconds over successful requests (ITL: every gap of every one)."""
    ok = [r for r in records if r.success]
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    return {
        "ttft": [r.ttft_s for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.e2el_s for r in ok],
    }


def latency_stats_ms(
    samples_s: Sequence[float], name: str, percentiles: Sequence[float]
) -> dict[str, float]:
    """mean/median/std/p<p> of one metric in ms, under vllm's key names."""
    ms = [s * 1000.0 for s in samples_s]
    arr = np.asarray(ms, dtype=np.float64)
    out = {
        f"mean_{name}_ms": float(arr.mean()) if ms else 0.0,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": float(arr.std()) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{percentile_key(p)}_{name}_ms"] = percentile(ms, p)
    return out


def max_concurrency_observed(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, from send and finish times (all requests)."""
    events = []
    for r in records:
        events.append((r.start_s, 1))
        events.append((r.start_s + r.e2el_s, -1))
    # A finish at the same instant as a start frees its slot first.
    events.sort(key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def max_output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """Peak of content chunks per wall-clock second (vllm's max_output_tokens_per_s)."""
    buckets: dict[int, int] = {}
    for r in records:
        if not r.success or r.output_len == 0:
            continue
        t = r.start_s + r.ttft_s
        times = [t]
        for gap in r.itl_s:
            t += gap
            times.append(t)
        for t in times:
            buckets[int(t)] = buckets.get(int(t), 0) + 1
    return float(max(buckets.values())) if buckets else 0.0


def error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Failed requests by kind (http_429, timeout, connection, stream_error, deadline)."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            counts[r.error_kind] = counts.get(r.error_kind, 0) + 1
    return dict(sorted(counts.items()))


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    slos_ms: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99,),
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """The aggregate part of a vllm result JSON (per-request arrays are added by report)."""
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    duration = duration_s if duration_s > 0 else math.inf  # no time: throughputs 0
    good = sum(meets_slos(r, slos_ms) for r in ok) if slos_ms else 0
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos_ms else None,
        "good_requests": good if slos_ms else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": max_output_tokens_per_s(records),
        "max_concurrent_requests": max_concurrency_observed(records),
        "error_counts": error_counts(records),
    }
    samples = latency_samples_s(records)
    for name in metrics:
        out.update(latency_stats_ms(samples[name], name, percentiles))
    return out

"""PNG plots of results: latency CDFs (one run, or several side by side) and rate sweeps.

Figures are drawn through `matplotlib.figure.Figure` + the Agg canvas directly, so nothing
global (pyplot state, the backend) is touched: the plots work headless and inside tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from baton.loadgen.report import p_ms, rate_value, samples_ms

_PANELS = (
    ("ttft", "TTFT (ms)"),
    ("tpot", "TPOT (ms)"),
    ("itl", "ITL (ms)"),
    ("e2el", "E2E latency (ms)"),
)

Labeled = tuple[str, Mapping[str, Any]]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _slo_ms(result: Mapping[str, Any], name: str) -> float | None:
    value = (result.get("goodput") or {}).get(name)
    return float(value) if value is not None else None


def plot_cdfs(runs: Sequence[Labeled], path: Path, title: str = "") -> Path:
    """CDFs of TTFT, TPOT, ITL and E2E latency; one line per run, SLOs as dashed lines."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (name, xlabel) in zip(axes.flat, _PANELS, strict=True):
        for label, result in runs:
            values = np.sort(np.asarray(samples_ms(result, name)))
            if values.size == 0:
                continue
            frac = np.arange(1, values.size + 1) / values.size
            p50 = float(np.percentile(values, 50))
            ax.step(values, frac, where="post", label=f"{label} (p50 {p50:.1f})")
        slo = _slo_ms(runs[0][1], name) if runs else None
        if slo is not None and ax.has_data() and slo <= 1.5 * ax.dataLim.x1:
            ax.axvline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        elif slo is not None:  # far right of every sample: a line there would squash the CDF
            xlabel += f"   [SLO {slo:g} ms, off scale]"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Latency CDFs")
    return _save(fig, path)


def _x_positions(rates: Sequence[float], finite_max: float) -> list[float]:
    """inf has no place on a rate axis: draw it one step right of the largest finite rate."""
    return [finite_max * 1.5 if math.isinf(r) else r for r in rates]


def plot_sweep(sweeps: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path) -> Path:
    """Goodput (or throughput without SLOs) and p90 TTFT / TPOT / E2EL against request rate."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).flat
    all_rates = [rate_value(r["request_rate"]) for _, rs in sweeps for r in rs]
    finite = [r for r in all_rates if not math.isinf(r)]
    finite_max = max(finite) if finite else 1.0
    has_slo = all(r.get("request_goodput") is not None for _, rs in sweeps for r in rs)
    for label, results in sweeps:
        rates = [rate_value(r["request_rate"]) for r in results]
        xs = _x_positions(rates, finite_max)
        order = np.argsort(xs)
        x = [xs[i] for i in order]
        rs = [results[i] for i in order]
        key = "request_goodput" if has_slo else "request_throughput"
        axes[0].plot(x, [r[key] for r in rs], marker="o", label=label)
        for ax, name in zip(axes[1:], ("ttft", "tpot", "e2el"), strict=True):
            ax.plot(x, [p_ms(r, name, 90) for r in rs], marker="o", label=label)
    axes[0].set_ylabel("goodput (req/s)" if has_slo else "throughput (req/s)")
    for ax, name in zip(axes[1:], ("TTFT", "TPOT", "E2E latency"), strict=True):
        ax.set_ylabel(f"p90 {name} (ms)")
    ticks = sorted(set(_x_positions(all_rates, finite_max)))
    tick_labels = ["inf" if t > finite_max else f"{t:g}" for t in ticks]
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(ticks, tick_labels)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    title = "Goodput and p90 latency vs request rate"
    if has_slo and sweeps:
        slos = " ".join(f"{k}:{v:g}ms" for k, v in sweeps[0][1][0]["goodput"].items())
        title += f" (SLO {slos})"
    fig.suptitle(title)
    return _save(fig, path)

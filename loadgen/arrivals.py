"""When each session starts: Poisson or gamma arrivals at a mean rate, all at once, or a trace.

Arrivals are offsets from the start of the run, computed up front from a seeded generator so a
run is reproducible and the schedule can be tested without a clock. Gamma inter-arrival times
follow vllm: shape = burstiness, scale = 1 / (rate * burstiness), so the mean rate holds for any
burstiness; burstiness 1 is Poisson, < 1 burstier, > 1 more regular.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def parse_rate(text: str) -> float:
    """ "4" → 4.0, "inf" → math.inf (every request at t = 0)."""
    rate = float(text)
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    """ "1,2,4,inf" → [1.0, 2.0, 4.0, inf]."""
    rates = [parse_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise ValueError("no request rates given")
    return rates


def interarrival_s(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """n gaps between arrivals, mean 1 / rate; zeros for rate = inf."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    return rng.gamma(shape=burstiness, scale=theta, size=n)


def arrival_offsets_s(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times from the start of the run; the first request goes at once (as in vllm)."""
    if n <= 0:
        return []
    gaps = interarrival_s(n - 1, rate, burstiness, seed)
    return [0.0, *np.cumsum(gaps).tolist()]


def trace_offsets_s(timestamps: Sequence[float], speedup: float = 1.0) -> list[float]:
    """Trace timestamps (seconds) → offsets from the first one, compressed by `speedup`."""
    if not timestamps:
        return []
    if speedup <= 0:
        raise ValueError(f"trace speedup must be > 0, got {speedup}")
    first = min(timestamps)
    return [(t - first) / speedup for t in timestamps]

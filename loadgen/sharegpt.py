"""A synthetic ShareGPT: input and output lengths drawn to match the published statistics.

No download. The means are those the vLLM paper reports for ShareGPT (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
SOSP 2023, §6.1 and Fig. 11a: mean input 161.31 tokens, mean output 337.99 tokens). The shape
is ours: the paper's histograms are unimodal with long right tails, which a log-normal
follows; sigma 1.0 (inputs) and 0.8 (outputs) give that spread. Samples are then filtered as
`vllm bench serve --dataset-name sharegpt` filters real conversations (prompt and output
>= 4 tokens, prompt <= 1024, prompt + output <= 2048), here by clipping, and each mu is
calibrated by bisection so the clipped means still equal the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np

MEAN_INPUT_TOKENS = 161.31
MEAN_OUTPUT_TOKENS = 337.99
SIGMA_INPUT = 1.0
SIGMA_OUTPUT = 0.8
MIN_LEN = 4
MAX_INPUT_LEN = 1024
MAX_TOTAL_LEN = 2048

_CALIBRATION_SAMPLES = 200_000


def _clip_inputs(x: np.ndarray) -> np.ndarray:
    clipped: np.ndarray = np.clip(np.rint(x), MIN_LEN, MAX_INPUT_LEN)
    return clipped


def _clip_outputs(x: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    clipped: np.ndarray = np.clip(np.rint(x), MIN_LEN, MAX_TOTAL_LEN - inputs)
    return clipped


def _bisect_mu(target: float, sigma: float, clipped_mean: Callable[[np.ndarray], float]) -> float:
    """mu of a log-normal whose clipped samples have mean `target` (the mean rises with mu)."""
    z = np.random.default_rng(12345).standard_normal(_CALIBRATION_SAMPLES)
    lo, hi = math.log(target) - 3.0, math.log(target) + 3.0
    for _ in range(50):
        mid = (lo + hi) / 2
        mean = clipped_mean(np.exp(mid + sigma * z))
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (lo + hi) / 2


@cache
def calibrated_mus() -> tuple[float, float]:
    """(mu_input, mu_output), computed once per process (a few ms)."""
    mu_in = _bisect_mu(MEAN_INPUT_TOKENS, SIGMA_INPUT, lambda x: float(_clip_inputs(x).mean()))
    z = np.random.default_rng(54321).standard_normal(_CALIBRATION_SAMPLES)
    inputs = _clip_inputs(np.exp(mu_in + SIGMA_INPUT * z))
    mu_out = _bisect_mu(
        MEAN_OUTPUT_TOKENS, SIGMA_OUTPUT, lambda x: float(_clip_outputs(x, inputs).mean())
    )
    return mu_in, mu_out


def sample_lengths(n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """n (input_len, output_len) pairs with ShareGPT's means and vllm's length filters."""
    mu_in, mu_out = calibrated_mus()
    inputs = _clip_inputs(rng.lognormal(mu_in, SIGMA_INPUT, size=n))
    outputs = _clip_outputs(rng.lognormal(mu_out, SIGMA_OUTPUT, size=n), inputs)
    return [int(x) for x in inputs], [int(x) for x in outputs]

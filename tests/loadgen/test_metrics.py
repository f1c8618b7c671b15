"""loadgen.metrics on hand-built records whose answers are known exactly (vllm's conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from baton.loadgen.metrics import (
    error_counts,
    latency_samples_s,
    max_concurrency_observed,
    max_output_tokens_per_s,
    meets_slos,
    parse_goodput,
    percentile,
    percentile_key,
    summarize,
    tpot_s,
)
from baton.loadgen.records import RequestRecord


def _ok(start: float, ttft: float, itl: list[float], e2el: float, out: int, inp: int = 10):
    return RequestRecord(
        success=True,
        prompt_len=inp,
        output_len=out,
        usage_reported=True,
        start_s=start,
        ttft_s=ttft,
        itl_s=itl,
        e2el_s=e2el,
    )


# A: 4 tokens in 4 chunks. B: a single token. C: 6 tokens in 3 chunks (2 per chunk).
# D: failed after a long wait; it must count nowhere but in the errors.
A = _ok(0.0, 0.1, [0.02, 0.03, 0.05], 0.2, 4, inp=100)
B = _ok(0.1, 0.3, [], 0.3, 1, inp=50)
C = _ok(0.15, 0.05, [0.1, 0.1], 0.25, 6, inp=30)
D = RequestRecord(success=False, error_kind="http_503", prompt_len=70, start_s=0.5, e2el_s=9.0)
D.ttft_s = 5.0
RECORDS = [A, B, C, D]


def test_percentile_interpolates_like_numpy() -> None:
    values = [100.0, 300.0, 50.0]
    assert percentile(values, 50) == 100.0
    assert percentile(values, 90) == pytest.approx(260.0)  # 100 + 0.8 * (300 - 100)
    assert percentile(values, 99) == pytest.approx(296.0)
    assert percentile(values, 100) == 300.0
    assert percentile([], 99) == 0.0
    rng = np.random.default_rng(0)
    xs = rng.random(101).tolist()
    for p in (1, 25, 50, 90, 95, 99, 99.9):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile_key(99) == "99" and percentile_key(99.9) == "99.9"


def test_tpot_excludes_the_first_token_and_is_undefined_for_one_token() -> None:
    assert tpot_s(A) == pytest.approx((0.2 - 0.1) / 3)
    assert tpot_s(B) is None
    # C: usage says 6 tokens in 3 chunks; TPOT divides by tokens, not by chunks.
    assert tpot_s(C) == pytest.approx((0.25 - 0.05) / 5)
    assert tpot_s(D) is None


def test_latency_samples_leave_out_failures_and_single_token_tpot() -> None:
    s = latency_samples_s(RECORDS)
    assert s["ttft"] == [0.1, 0.3, 0.05]
    assert s["tpot"] == pytest.approx([0.1 / 3, 0.04])
    assert s["itl"] == [0.02, 0.03, 0.05, 0.1, 0.1]  # every chunk gap of every request
    assert s["e2el"] == [0.2, 0.3, 0.25]


def test_goodput_with_several_slos() -> None:
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["ttft:500 e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    with pytest.raises(ValueError):
        parse_goodput(["itl:5"])
    with pytest.raises(ValueError):
        parse_goodput(["ttft=5"])

    def good(slos: dict[str, float]) -> list[bool]:
        return [meets_slos(r, slos) for r in RECORDS]

    assert good({"ttft": 150}) == [True, False, True, False]
    assert good({"tpot": 35}) == [True, True, False, False]  # one token: TPOT 0 meets any SLO
    assert good({"ttft": 150, "tpot": 35}) == [True, False, False, False]
    assert good({"ttft": 150, "e2el": 220}) == [True, False, False, False]
    assert good({"ttft": 100}) == [True, False, True, False]  # the bound itself is good
    out = summarize(RECORDS, 2.0, slos_ms={"ttft": 150, "tpot": 50})
    assert out["good_requests"] == 2 and out["request_goodput"] == 1.0
    assert summarize(RECORDS, 2.0)["request_goodput"] is None


def test_summary_matches_hand_computed_values() -> None:
    out = summarize(RECORDS, 2.0, percentiles=(50, 90, 99))
    assert out["completed"] == 3 and out["failed"] == 1
    assert out["total_input_tokens"] == 180  # D's 70 prompt tokens are not counted
    assert out["total_output_tokens"] == 11
    assert out["request_throughput"] == 1.5
    assert out["output_throughput"] == 5.5
    assert out["total_token_throughput"] == pytest.approx(95.5)
    assert out["mean_ttft_ms"] == pytest.approx(150.0)
    assert out["median_ttft_ms"] == pytest.approx(100.0)
    assert out["p90_ttft_ms"] == pytest.approx(260.0)
    assert out["std_ttft_ms"] == pytest.approx(float(np.std([100, 300, 50])))
    assert out["median_tpot_ms"] == pytest.approx((100 / 3 + 40) / 2)
    assert out["mean_itl_ms"] == pytest.approx(60.0)
    assert out["median_itl_ms"] == pytest.approx(50.0)
    assert out["p99_itl_ms"] == pytest.approx(100.0)
    assert out["mean_e2el_ms"] == pytest.approx(250.0)
    assert out["error_counts"] == {"http_503": 1}
    assert out["max_concurrent_requests"] == 3  # A, B and C overlap at t = 0.15
    assert out["p50_ttft_ms"] == out["median_ttft_ms"]


def test_only_single_token_outputs_and_no_requests() -> None:
    out = summarize([B], 1.0)
    assert out["mean_tpot_ms"] == 0.0 and out["p99_tpot_ms"] == 0.0
    assert out["mean_itl_ms"] == 0.0
    assert out["mean_ttft_ms"] == pytest.approx(300.0)
    empty = summarize([], 0.0)
    assert empty["completed"] == 0 and empty["request_throughput"] == 0.0
    assert not math.isnan(empty["output_throughput"])


def test_error_counts_and_peaks() -> None:
    t = RequestRecord(success=False, error_kind="timeout")
    assert error_counts([*RECORDS, t, t]) == {"http_503": 1, "timeout": 2}
    # back-to-back requests (one ends as the next starts) never overlap
    seq = [_ok(0.0, 0.1, [], 1.0, 1), _ok(1.0, 0.1, [], 1.0, 1)]
    assert max_concurrency_observed(seq) == 1
    # A's 4 chunks and C's 3 all land in second 0; B's one token too
    assert max_output_tokens_per_s(RECORDS) == 8.0

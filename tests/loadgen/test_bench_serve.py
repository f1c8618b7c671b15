"""`baton bench serve` against a real colocated `baton serve`: every workload end to end.

One cluster for the module; each workload runs through the CLI entry with small sizes and must
complete with a JSON holding every field vllm's result has (plus ours) and non-empty plots.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.services.cli import main
from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

VLLM_FIELDS = [
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests", "input_lens", "output_lens", "ttfts",
    "itls", "errors",
]  # fmt: skip
OUR_FIELDS = ["label", "goodput", "failed", "error_counts", "e2els", "tpots", "not_sent"]
PCTS = (50, 90, 95, 99)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(
        ServeConfig(port=free_port(), colocated=True, dtype="float32", kv_cache_memory_mb=96)
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _bench(cluster: Cluster, out: Path, name: str, *flags: str) -> dict:
    argv = [
        "bench", "serve", "--base-url", cluster.url, "--save-result", "--result-dir", str(out),
        "--result-filename", f"{name}.json", "--metric-percentiles", "50,90,95,99",
        "--goodput", "ttft:5000", "tpot:1000", "--ignore-eos", "--disable-tqdm",
        "--timeout", "120", "--max-duration", "120", *flags,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / f"{name}.json").read_text())


def _check(result: dict, num_requests: int) -> None:
    for key in VLLM_FIELDS + OUR_FIELDS:
        assert key in result, key
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", *(f"p{p}" for p in PCTS)):
            assert f"{stat}_{m}_ms" in result, (stat, m)
    assert result["completed"] == num_requests, result["errors"]
    assert result["failed"] == 0 and result["error_counts"] == {}
    assert len(result["input_lens"]) == num_requests
    assert result["requests_without_usage"] == 0  # lengths come from the server's usage
    assert all(n > 0 for n in result["input_lens"])
    assert result["mean_ttft_ms"] > 0 and result["request_goodput"] is not None


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMALL = ["--num-prompts", "8", "--random-input-len", "48", "--random-output-len", "16"]


def test_every_workload(cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 0.1 * i, "input_len": 24 + 8 * i, "output_len": 8}) + "\n"
            for i in range(6)
        )
    )
    runs = {
        "random": (8, ["--dataset-name", "random", "--request-rate", "8", *SMALL]),
        "random-chat": (
            6,
            ["--endpoint", "/v1/chat/completions", "--max-concurrency", "3", *SMALL[2:],
             "--num-prompts", "6"],
        ),
        "sharegpt": (6, ["--dataset-name", "sharegpt", "--num-prompts", "6",
                         "--sharegpt-output-len", "12"]),
        "shared-prefix": (8, ["--dataset-name", "shared-prefix", "--prefix-len", "160",
                              "--num-groups", "2", "--questions-per-group", "4",
                              "--question-len", "16", "--random-output-len", "12",
                              "--max-concurrency", "1"]),
        "multi-turn": (9, ["--dataset-name", "multi-turn", "--num-prompts", "3",
                           "--num-turns", "3", "--random-input-len", "16",
                           "--random-output-len", "12"]),
        "long-prompt": (6, ["--dataset-name", "long-prompt", "--num-prompts", "6",
                            "--random-input-len", "512", "--random-output-len", "4"]),
        "trace": (6, ["--dataset-name", "trace", "--trace-file", str(trace)]),
    }  # fmt: skip
    results = {}
    for name, (num, flags) in runs.items():
        results[name] = r = _bench(cluster, tmp_path, name, *flags)
        _check(r, num)
        _png(tmp_path / f"{name}-cdf.png")
    assert "Serving Benchmark Result" in capsys.readouterr().out
    # exact lengths: the smollm2 tokenizer is used, and the server's usage agrees
    assert results["random"]["tokenizer_id"] == "smollm2"
    assert results["random"]["prompt_format"] == "ids"
    assert results["random"]["input_lens"] == [48] * 8  # the prompt sent is the prompt counted
    assert results["long-prompt"]["input_lens"] == [512] * 6
    assert results["random"]["output_lens"] == [16] * 8  # ignore_eos: exactly max_tokens
    assert results["random-chat"]["backend"] == "openai-chat"
    assert results["random-chat"]["max_concurrent_requests"] <= 3
    # shared prefix, one request at a time: every question after a group's first (or after
    # the initial test request, which is group 0's) finds the 160-token prefix in the cache
    assert results["shared-prefix"]["total_cached_tokens"] >= 6 * 160
    # multi-turn: each turn's prompt holds the history, so prompts grow within a conversation
    mt = results["multi-turn"]
    assert mt["input_lens"][-1] > 16 * 3 and max(mt["input_lens"]) > min(mt["input_lens"]) + 24
    # trace: arrivals follow the timestamps
    starts = results["trace"]["start_times"]
    assert starts[-1] == pytest.approx(0.5, abs=0.2)

    # compare two results: a plot and a table
    out = tmp_path / "compare.png"
    argv = ["bench", "compare", str(tmp_path / "random.json"), str(tmp_path / "random-chat.json")]
    assert main([*argv, "--out", str(out)]) == 0
    _png(out)
    assert "random-chat" in capsys.readouterr().out


def test_sweep_and_compare_sweeps(cluster: Cluster, tmp_path: Path) -> None:
    common = ["--request-rates", "4,inf", "--num-prompts", "6", "--random-input-len", "32",
              "--random-output-len", "8"]  # fmt: skip
    a = _bench(cluster, tmp_path, "sweep-a", *common, "--label", "completions")
    b = _bench(
        cluster, tmp_path, "sweep-b", *common, "--endpoint", "/v1/chat/completions",
        "--label", "chat",
    )  # fmt: skip
    for sweep in (a, b):
        assert sweep["type"] == "sweep" and sweep["request_rates"] == [4.0, "inf"]
        for r in sweep["results"]:
            _check(r, 6)
    for rate in ("4.0", "inf"):  # each rate's own result and CDFs beside the sweep's
        assert json.loads((tmp_path / f"sweep-a-{rate}qps.json").read_text())["completed"] == 6
        _png(tmp_path / f"sweep-a-{rate}qps-cdf.png")
    _png(tmp_path / "sweep-a.png")
    out = tmp_path / "sweeps.png"
    files = [str(tmp_path / "sweep-a.json"), str(tmp_path / "sweep-b.json")]
    assert main(["bench", "compare", *files, "--out", str(out)]) == 0
    _png(out)

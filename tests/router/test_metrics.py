"""services/metrics.py: exact exposed names, vLLM buckets, counts read back through the parser."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from baton.services.metrics import (
    ITL_BUCKETS,
    KV_TRANSFER_BYTES_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    Metrics,
    render,
)

HISTOGRAMS = {
    "baton:time_to_first_token_seconds": TTFT_BUCKETS,
    "baton:inter_token_latency_seconds": ITL_BUCKETS,
    "baton:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "baton:request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
    "baton:request_prefill_time_seconds": REQUEST_LATENCY_BUCKETS,
    "baton:ttft_routing_seconds": TTFT_BUCKETS,
    "baton:ttft_prefill_seconds": TTFT_BUCKETS,
    "baton:ttft_transfer_seconds": TTFT_BUCKETS,
    "baton:ttft_first_decode_seconds": TTFT_BUCKETS,
    "baton:kv_transfer_bytes": KV_TRANSFER_BYTES_BUCKETS,
    "baton:kv_transfer_seconds": TTFT_BUCKETS,
}
GAUGES = {"baton:num_requests_running", "baton:num_requests_waiting", "baton:kv_cache_usage_perc"}
COUNTERS = {
    "baton:prompt_tokens_total",
    "baton:generation_tokens_total",
    "baton:prefix_cache_queries_total",
    "baton:prefix_cache_hits_total",
    "baton:num_preemptions_total",
    "baton:request_success_total",
}


def exposed(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """Sample name -> samples, as a scraper reads the text (`_created` series left out)."""
    text = render(registry).decode()
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.setdefault(sample.name, []).append(sample)
    return out


def test_vllm_buckets() -> None:
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0 and len(ITL_BUCKETS) == 19
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    assert KV_TRANSFER_BYTES_BUCKETS[0] == 4 * 1024
    assert KV_TRANSFER_BYTES_BUCKETS[-1] == 1024**3
    ratios = {b / a for a, b in itertools.pairwise(KV_TRANSFER_BYTES_BUCKETS)}
    assert ratios == {4.0}


def test_names_counts_and_labels_round_trip() -> None:
    gateway_registry, worker_registry = CollectorRegistry(), CollectorRegistry()
    gateway = Metrics(gateway_registry, "smollm2", role="gateway")
    worker = Metrics(worker_registry, "smollm2", role="prefill")

    for ttft in (0.003, 0.2, 1.5):
        gateway.time_to_first_token.observe(ttft)
    gateway.inter_token_latency.observe(0.02)
    gateway.e2e_request_latency.observe(2.0)
    gateway.ttft_routing.observe(0.0005)
    gateway.request_success("stop").inc()
    gateway.request_success("stop").inc()
    gateway.request_success("length").inc()
    worker.prompt_tokens.inc(128)
    worker.prefix_cache_queries.inc(128)
    worker.prefix_cache_hits.inc(64)
    worker.num_requests_running.set(3)
    worker.kv_cache_usage.set(0.25)
    worker.observe_kv_transfer(3 * 1024 * 1024, 0.004)

    g = exposed(gateway_registry)
    w = exposed(worker_registry)
    # Each side exposes its own series up front (zeros), so the union covers every name.
    names = set(g) | set(w)
    for name, buckets in HISTOGRAMS.items():
        for suffix in ("_bucket", "_sum", "_count"):
            assert name + suffix in names, name + suffix
        series = g.get(name + "_bucket") or w[name + "_bucket"]
        les = [float(s.labels["le"]) for s in series if s.labels["le"] != "+Inf"]
        assert les == sorted(buckets) and len(les) == len(buckets), name
    assert names >= GAUGES
    assert names >= COUNTERS
    assert "baton:kv_transfer_bytes_sum" in w  # the total KV bytes moved

    ttft_count = g["baton:time_to_first_token_seconds_count"][0]
    assert ttft_count.value == 3 and ttft_count.labels == {"model_name": "smollm2"}
    assert g["baton:time_to_first_token_seconds_sum"][0].value == pytest.approx(1.703)
    le_025 = [s for s in g["baton:time_to_first_token_seconds_bucket"] if s.labels["le"] == "0.25"]
    assert le_025[0].value == 2
    assert g["baton:ttft_routing_seconds_count"][0].value == 1
    success = {s.labels["finished_reason"]: s.value for s in g["baton:request_success_total"]}
    assert success == {"stop": 2, "length": 1}

    prompt = w["baton:prompt_tokens_total"][0]
    assert prompt.value == 128 and prompt.labels == {"model_name": "smollm2", "role": "prefill"}
    assert w["baton:prefix_cache_hits_total"][0].value == 64
    assert w["baton:num_requests_running"][0].value == 3
    assert w["baton:kv_cache_usage_perc"][0].value == 0.25
    assert w["baton:num_preemptions_total"][0].value == 0  # created up front at zero
    kv_buckets = {float(s.labels["le"]): s.value for s in w["baton:kv_transfer_bytes_bucket"]}
    assert kv_buckets[1024**2] == 0 and kv_buckets[4 * 1024**2] == 1
    assert w["baton:kv_transfer_seconds_count"][0].value == 1

    # The gateway's registry holds no worker series and vice versa.
    assert "baton:prompt_tokens_total" not in g
    assert "baton:time_to_first_token_seconds_count" not in w


def test_one_registry_several_roles_through_bind() -> None:
    registry = CollectorRegistry()
    gateway = Metrics(registry, "smollm2")
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry, "smollm2", role="decode")  # families are registered once
    prefill = gateway.bind(role="prefill")
    decode = gateway.bind(role="decode")
    prefill.prompt_tokens.inc(10)
    decode.generation_tokens.inc(3)
    decode.bind(model_name="llama").generation_tokens.inc(5)
    samples = exposed(registry)

    def by_labels(name: str) -> dict[tuple[str, str], float]:
        return {(s.labels["model_name"], s.labels["role"]): s.value for s in samples[name]}

    # Each worker view creates its series at zero; the gateway view adds no worker series.
    assert by_labels("baton:prompt_tokens_total") == {
        ("smollm2", "prefill"): 10,
        ("smollm2", "decode"): 0,
        ("llama", "decode"): 0,
    }
    assert by_labels("baton:generation_tokens_total") == {
        ("smollm2", "prefill"): 0,
        ("smollm2", "decode"): 3,
        ("llama", "decode"): 5,
    }
    assert samples["baton:time_to_first_token_seconds_count"][0].value == 0


def test_rejects_unknown_role() -> None:
    with pytest.raises(ValueError, match="role"):
        Metrics(CollectorRegistry(), "smollm2", role="planner")

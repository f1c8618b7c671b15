"""`baton serve` from the outside: real processes, real Redis, real gRPC, the official client.

Three clusters on loopback: disaggregated over TCP, disaggregated over NIXL, colocated. Greedy
outputs must be identical across them and to the offline engine; the KV handoff must show in
the workers' metrics; aborts must leave both block pools idle; a dead prefill worker must not
stall anything.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from baton import LLM, SamplingParams
from baton.services.cluster_auth import TOKEN_METADATA_KEY
from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press begins",
    "A good recipe for tomato soup needs",
    "In the year 2050, cities will",
    "def fibonacci(n):\n    ",
    "The three primary colours are",
    "Once upon a time, a dragon",
    "To learn a new language quickly, you should",
    "The mitochondria is the powerhouse of",
]
MAX_TOKENS = 24


def _cluster(transport: str, colocated: bool = False) -> Iterator[Cluster]:
    cluster = Cluster(
        ServeConfig(
            port=free_port(),
            dtype="float32",
            transport=transport,
            colocated=colocated,
            kv_cache_memory_mb=96,
            remote_prefill_min_tokens=4,  # every test prompt is prefilled remotely
            router_policy="least-loaded",  # (kv would keep few-token prompts local)
        )
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def offline_texts() -> list[str]:
    llm = LLM(dtype="float32", kv_cache_memory_bytes=64 * 1024**2)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]


def _client(cluster: Cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _model(cluster: Cluster) -> str:
    return cluster.workers[0].model


def _complete_all(cluster: Cluster) -> list[str]:
    client = _client(cluster)
    texts = []
    for prompt in PROMPTS:
        r = client.completions.create(
            model=_model(cluster),
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        texts.append(r.choices[0].text)
    return texts


def _metrics(address: str) -> dict[str, dict[str, float]]:
    """Family name → {sample name: summed value} from one process's /metrics."""
    url = address if address.startswith("http") else f"http://{address}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[s.name] = samples.get(s.name, 0.0) + s.value
    return out


def _worker(cluster: Cluster, role: str):  # type: ignore[no-untyped-def]
    return next(w for w in cluster.workers if w.role == role)


def _wait_idle(
    cluster: Cluster,
    timeout_s: float = 10.0,
    roles: tuple[str, ...] = ("prefill", "decode", "mixed"),
) -> None:
    """Both block pools idle: nothing running, every block free or cached (no references)."""
    import grpc

    from baton.proto import worker_pb2 as pb
    from baton.proto import worker_pb2_grpc as pbg

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        loads = []
        for w in [w for w in cluster.workers if w.role in roles]:
            with grpc.insecure_channel(w.address) as ch:
                stub = pbg.WorkerStub(ch)
                token = (TOKEN_METADATA_KEY, cluster.token)
                loads.append(stub.GetLoadStats(pb.LoadStatsRequest(), timeout=2, metadata=[token]))
        if all(s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0 for s in loads):
            return
        last = loads
        time.sleep(0.2)
    raise AssertionError(f"workers not idle: {last}")


def test_openai_client_chat_and_completions(tcp_cluster: Cluster) -> None:
    client = _client(tcp_cluster)
    model = _model(tcp_cluster)
    assert model in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in (chat.choices[0].message.content or "")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    comp = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.usage is not None
    _wait_idle(tcp_cluster)


def test_disaggregated_tcp_matches_offline_engine(
    tcp_cluster: Cluster, offline_texts: list[str]
) -> None:
    decode = _worker(tcp_cluster, "decode")
    prefill = _worker(tcp_cluster, "prefill")
    before = _metrics(decode.metrics_address)["baton:kv_transfer_bytes"]
    assert _complete_all(tcp_cluster) == offline_texts
    after = _metrics(decode.metrics_address)["baton:kv_transfer_bytes"]
    moved = after["baton:kv_transfer_bytes_sum"] - before["baton:kv_transfer_bytes_sum"]
    assert (
        moved > 0
        and after["baton:kv_transfer_bytes_count"] > before["baton:kv_transfer_bytes_count"]
    )
    sent = _metrics(prefill.metrics_address)["baton:kv_transfer_bytes"]
    assert sent["baton:kv_transfer_bytes_sum"] > 0
    _wait_idle(tcp_cluster)


def test_seeded_sampling_is_the_same_disaggregated_and_offline(tcp_cluster: Cluster) -> None:
    """The first token is sampled on the prefill worker and the rest on the decode worker,
    which advances the request's generator past that token's draws: one seeded stream."""
    llm = LLM(dtype="float32", kv_cache_memory_bytes=32 * 1024**2)
    client = _client(tcp_cluster)
    for seed, prompt in enumerate(PROMPTS[:3]):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed, max_tokens=16)
        offline = llm.generate([prompt], params)[0].outputs[0].text
        served = client.completions.create(
            model=_model(tcp_cluster),
            prompt=prompt,
            max_tokens=16,
            temperature=0.9,
            top_p=0.95,
            seed=seed,
        )
        assert served.choices[0].text == offline, seed
    _wait_idle(tcp_cluster)


def test_every_process_exports_parsable_metrics(tcp_cluster: Cluster) -> None:
    gateway = _metrics(tcp_cluster.url)
    assert (
        gateway["baton:time_to_first_token_seconds"]["baton:time_to_first_token_seconds_count"] > 0
    )
    assert (
        gateway["baton:e2e_request_latency_seconds"]["baton:e2e_request_latency_seconds_count"] > 0
    )
    for split in ("routing", "prefill", "transfer", "first_decode"):
        family = f"baton:ttft_{split}_seconds"
        assert gateway[family][f"{family}_count"] > 0, family
    decode = _metrics(_worker(tcp_cluster, "decode").metrics_address)
    assert (
        decode["baton:time_to_first_token_seconds"]["baton:time_to_first_token_seconds_count"] > 0
    )
    assert decode["baton:kv_transfer_seconds"]["baton:kv_transfer_seconds_count"] > 0
    prefill = _metrics(_worker(tcp_cluster, "prefill").metrics_address)
    assert prefill["baton:kv_transfer_seconds"]["baton:kv_transfer_seconds_count"] > 0


def test_client_disconnect_aborts_on_both_workers(tcp_cluster: Cluster) -> None:
    body = {
        "model": _model(tcp_cluster),
        "prompt": PROMPTS[1],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=tcp_cluster.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data:") for line in got)
        _wait_idle(tcp_cluster)
        # during prefill: a long prompt, the connection dropped before the first token
        long_body = dict(body, prompt=" ".join(["Tell me more about the sea."] * 200))
        with http.stream("POST", "/v1/completions", json=long_body):
            pass
    _wait_idle(tcp_cluster, timeout_s=30)


def test_bad_requests_get_openai_errors_while_a_good_one_completes(tcp_cluster: Cluster) -> None:
    model = _model(tcp_cluster)
    with httpx.Client(base_url=tcp_cluster.url, timeout=60) as http:
        good = {
            "model": model,
            "prompt": PROMPTS[2],
            "max_tokens": 48,
            "stream": True,
            "temperature": 0,
        }
        with http.stream("POST", "/v1/completions", json=good) as resp:
            bad_bodies: list[tuple[bytes, int]] = [
                (b"{not json", 400),
                (json.dumps({"model": model, "prompt": "x", "temperature": "hot"}).encode(), 400),
                (json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode(), 400),
                (json.dumps({"model": model, "prompt": "x " * 9000}).encode(), 400),
                (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404),
                (b'{"model": "m", "prompt": "\xff\xfe"}', 400),
            ]
            for raw, status in bad_bodies:
                r = http.post(
                    "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
                )
                assert r.status_code == status, (raw[:40], r.status_code, r.text)
                err = r.json()["error"]
                assert {"message", "type", "param", "code"} <= set(err)
            text = "".join(resp.iter_lines())
        assert "[DONE]" in text
    _wait_idle(tcp_cluster)


def test_disaggregated_nixl_and_colocated_match_offline(offline_texts: list[str]) -> None:
    for transport, colocated in (("nixl", False), ("tcp", True)):
        for cluster in _cluster(transport, colocated):
            assert _complete_all(cluster) == offline_texts, (transport, colocated)
            if not colocated:
                decode = _metrics(_worker(cluster, "decode").metrics_address)
                assert decode["baton:kv_transfer_bytes"]["baton:kv_transfer_bytes_sum"] > 0
            _wait_idle(cluster)


def test_dead_prefill_worker_falls_back_to_decode(tcp_cluster: Cluster) -> None:
    """Runs last on this cluster: it kills the prefill worker."""
    child = next(c for c in tcp_cluster.children if c.name.startswith("worker-prefill"))
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait(10)
    client = _client(tcp_cluster)
    t0 = time.monotonic()
    for prompt in PROMPTS[:3]:
        r = client.completions.create(
            model=_model(tcp_cluster), prompt=prompt, max_tokens=8, temperature=0
        )
        assert r.choices[0].text
    assert time.monotonic() - t0 < 60
    _wait_idle(tcp_cluster, roles=("decode",))

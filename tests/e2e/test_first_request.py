"""A fresh cluster answers its very first request (an issue once saw it hang for 120 s).

Five clusters started one after another (prefill + decode over TCP, real Redis and gRPC); into
each, the moment it reports ready, two first requests at once: a chat whose role the template
does not know and whose prompt is long enough to be prefilled remotely, and a 4-token
completion prefilled on the decode worker. Each must be answered within 10 s: a hang detector,
not a speed claim (answers take well under a second here).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

NUM_CLUSTERS = 5
ANSWER_WITHIN_S = 10.0


def _first_requests(cluster: Cluster) -> list[str]:
    client = OpenAI(
        base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=ANSWER_WITHIN_S
    )
    model = cluster.workers[0].model

    def chat() -> str:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "narrator", "content": "Hi"}],  # type: ignore[misc, list-item]
            max_tokens=4,
        )
        return r.choices[0].message.content or ""

    def completion() -> str:
        r = client.completions.create(model=model, prompt="Tell me a story", max_tokens=4)
        return r.choices[0].text

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(chat), pool.submit(completion)]
        return [f.result() for f in futures]


def test_five_fresh_clusters_each_answer_their_first_requests() -> None:
    for attempt in range(NUM_CLUSTERS):
        cluster = Cluster(ServeConfig(port=free_port(), dtype="float32", kv_cache_memory_mb=64))
        cluster.start()
        try:
            texts = _first_requests(cluster)
        finally:
            cluster.stop()
        assert all(texts), (attempt, texts)

"""The KV-aware router from the outside: the shared cluster's gateway explains every placement
(x-baton-route) and, fed by the workers' KV events, sees a prompt's prefix where it was cached."""

from __future__ import annotations

import time

import httpx
import pytest

from baton.services.launcher import Cluster

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a careful assistant for a public library in a small town by the sea. You answer "
    "questions about books, authors, loans, fines, events for children and opening hours. You "
    "never invent a title or an author, you never guess a date, and you say so plainly when "
    "you do not know. Keep answers short and friendly, and name the shelf where a book is. "
    "Question: "
)


def _route(cluster: Cluster, prompt: str) -> dict[str, str]:
    r = httpx.post(
        f"{cluster.url}/v1/completions",
        json={"model": cluster.workers[0].model, "prompt": prompt, "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    header = r.headers["x-baton-route"]
    return dict(part.split("=", 1) for part in header.split(";"))


def test_every_placement_is_explained_and_a_cached_prefix_is_seen(tcp_cluster: Cluster) -> None:
    first = _route(tcp_cluster, SYSTEM + "who wrote Middlemarch?")
    # Every policy's decision reports the index's hit (this cluster places least-loaded).
    assert first["policy"] == "least-loaded" and first["decode"] == "decode-1"
    total = int(first["matched"].split("/")[1])
    assert total >= 5 and float(first["ttft_ms"]) > 0
    # The prompt's blocks are cached on decode-1 now; its KV events reach the gateway's index.
    deadline = time.monotonic() + 10
    while True:
        again = _route(tcp_cluster, SYSTEM + "when do you open on Sundays?")
        hit = int(again["matched"].split("/")[0])
        if hit >= total - 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hit >= total - 2, again  # the shared prefix: all but the blocks of the question
    metrics = httpx.get(f"{tcp_cluster.url}/metrics", timeout=10).text
    assert 'baton:router_decisions_total{model_name="' in metrics
    assert "baton:router_ttft_prediction_error_seconds_count" in metrics

"""The disaggregated TCP cluster that several e2e modules share (one start per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port


@pytest.fixture(scope="session")
def tcp_cluster() -> Iterator[Cluster]:
    """`baton serve`'s Cluster in this process: prefill-0 and decode-1 over TCP, every test
    prompt prefilled remotely (least-loaded placement). test_serve.py's last test kills its
    prefill worker."""
    cluster = Cluster(
        ServeConfig(
            port=free_port(),
            dtype="float32",
            transport="tcp",
            kv_cache_memory_mb=96,
            remote_prefill_min_tokens=4,
            # Load-only: every prompt takes the KV handoff these tests exercise (the kv policy
            # keeps a few-token prompt on the decode worker, where it is cheaper).
            router_policy="least-loaded",
        )
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

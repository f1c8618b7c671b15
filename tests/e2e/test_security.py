"""Strangers are kept out of a running cluster (the shared TCP cluster of conftest.py).

A raw gRPC client without the cluster token gets UNAUTHENTICATED from every worker call but
Health; Redis refuses commands without its password; a worker entry forged in Redis (without
the token, so without a valid proof) is never called, so it never sees the token either; no
secret is on any child's command line.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from openai import OpenAI

from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pbg
from baton.router.registry import WorkerInfo, worker_key
from baton.services.cluster_auth import TOKEN_METADATA_KEY
from baton.services.launcher import Cluster

pytestmark = pytest.mark.slow


def _calls(stub: pbg.WorkerStub) -> dict[str, object]:
    """One call of every guarded method, unsent (each a callable taking metadata)."""
    return {
        "Generate": lambda md: list(
            stub.Generate(pb.GenerateRequest(request_id="x", prompt_token_ids=[1, 2]), metadata=md)
        ),
        "Prefill": lambda md: stub.Prefill(pb.PrefillRequest(request_id="x"), metadata=md),
        "Abort": lambda md: stub.Abort(pb.AbortRequest(request_ids=["x"]), metadata=md),
        "GetLoadStats": lambda md: stub.GetLoadStats(pb.LoadStatsRequest(), metadata=md),
    }


def test_worker_calls_without_the_cluster_token_are_unauthenticated(
    tcp_cluster: Cluster,
) -> None:
    for worker in tcp_cluster.workers:
        with grpc.insecure_channel(worker.address) as channel:
            stub = pbg.WorkerStub(channel)
            for name, call in _calls(stub).items():
                for metadata in ([], [(TOKEN_METADATA_KEY, "not-the-token")]):
                    with pytest.raises(grpc.RpcError) as err:
                        call(metadata)  # type: ignore[operator]
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                    assert "cluster token" in (err.value.details() or "")
            # Health stays open for probes; with the token the guarded calls answer.
            assert stub.Health(pb.HealthRequest()).worker_id == worker.worker_id
            token = [(TOKEN_METADATA_KEY, tcp_cluster.token)]
            assert stub.GetLoadStats(pb.LoadStatsRequest(), metadata=token).worker_id
            assert stub.Abort(pb.AbortRequest(request_ids=["x"]), metadata=token).num_aborted == 1


def test_redis_refuses_commands_without_its_password(tcp_cluster: Cluster) -> None:
    server = tcp_cluster.redis_server
    assert server is not None and server.password
    with redis.Redis(host=server.host, port=server.port) as anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            anonymous.keys("baton:*")
    with (
        redis.Redis(host=server.host, port=server.port, password="guess") as wrong,
        pytest.raises(redis.AuthenticationError),
    ):
        wrong.ping()
    with redis.Redis.from_url(tcp_cluster.redis_url) as member:
        assert member.ping()


class _Impostor(pbg.WorkerServicer):
    """A worker lookalike on loopback: records every call and the metadata it came with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def _record(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls.append((name, {k: str(v) for k, v in context.invocation_metadata()}))

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record("Generate", context)
        yield pb.GenerateResponse(request_id=request.request_id)

    def GetLoadStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetLoadStats", context)
        return pb.LoadStats(worker_id="decode-zz")

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("Health", context)
        return pb.HealthResponse(status="serving", worker_id="decode-zz", role="decode")


def test_a_forged_registry_entry_serves_no_request(tcp_cluster: Cluster) -> None:
    impostor = _Impostor()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pbg.add_WorkerServicer_to_server(impostor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    real = next(w for w in tcp_cluster.workers if w.role == "decode")
    forged = [
        WorkerInfo(
            worker_id=wid,
            address=f"127.0.0.1:{port}",
            role="decode",
            model=real.model,
            num_kv_blocks=real.num_kv_blocks * 100,  # "idle and huge": the router's favourite
            block_size=real.block_size,
            transport=real.transport,
            started_unix_s=time.time(),
        )
        for wid in ("decode-zz", "decode-zy")
    ]
    forged[1] = forged[1].signed("a-token-of-our-own")  # a proof, under the wrong token
    stop = threading.Event()

    def keep_registered() -> None:  # an attacker who has the Redis password
        with redis.Redis.from_url(tcp_cluster.redis_url) as r:
            while not stop.is_set():
                for info in forged:
                    r.set(worker_key(info.worker_id), info.to_json(), px=3000)
                stop.wait(0.5)

    writer = threading.Thread(target=keep_registered, daemon=True)
    writer.start()
    try:
        time.sleep(2.5)  # past the gateway's registry refresh
        client = OpenAI(base_url=f"{tcp_cluster.url}/v1", api_key="x", max_retries=0, timeout=60)
        for i in range(6):
            r = client.completions.create(
                model=real.model, prompt=f"Request {i} about rivers", max_tokens=4, temperature=0
            )
            assert r.choices[0].text
    finally:
        stop.set()
        writer.join(5)
        with redis.Redis.from_url(tcp_cluster.redis_url) as r:
            r.delete(*[worker_key(f.worker_id) for f in forged])
        server.stop(0)
    assert impostor.calls == []  # not a request, not a load poll: the token never reached it


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_no_secret_is_on_any_childs_command_line(tcp_cluster: Cluster) -> None:
    server = tcp_cluster.redis_server
    assert server is not None and server.password and server._proc is not None
    pids = [c.proc.pid for c in tcp_cluster.children if c.proc.poll() is None]
    pids.append(server._proc.pid)
    assert len(pids) >= 3
    for pid in pids:
        line = _cmdline(pid)
        assert tcp_cluster.token.encode() not in line, pid
        assert server.password.encode() not in line, pid
    # ...while the children have them, in their environment (readable by this user only)
    gateway = next(c for c in tcp_cluster.children if c.name == "gateway")
    environ = Path(f"/proc/{gateway.proc.pid}/environ").read_bytes()
    assert tcp_cluster.token.encode() in environ


def test_an_unauthenticated_flood_leaves_the_cluster_serving(tcp_cluster: Cluster) -> None:
    """Refusals are cheap and isolated: 200 refused calls, then a normal request completes."""
    worker = next(w for w in tcp_cluster.workers if w.role == "decode")

    async def flood() -> int:
        refused = 0
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pbg.WorkerStub(channel)
            req = pb.GenerateRequest(
                request_id="flood", prompt_token_ids=[1] * 8, params=pb.SamplingParams(n=100000)
            )

            async def one() -> None:
                nonlocal refused
                try:
                    async for _ in stub.Generate(req):
                        pass
                except grpc.aio.AioRpcError as e:
                    refused += e.code() == grpc.StatusCode.UNAUTHENTICATED

            await asyncio.gather(*(one() for _ in range(200)))
        return refused

    assert asyncio.run(flood()) == 200
    client = OpenAI(base_url=f"{tcp_cluster.url}/v1", api_key="x", max_retries=0, timeout=60)
    r = client.completions.create(model=worker.model, prompt="Hello", max_tokens=4)
    assert r.choices[0].text


def test_worker_limits_hold_for_a_member_calling_directly(tcp_cluster: Cluster) -> None:
    """Even with the token, a worker takes no n the gateway would refuse."""
    worker = next(w for w in tcp_cluster.workers if w.role == "decode")
    token = [(TOKEN_METADATA_KEY, tcp_cluster.token)]
    with grpc.insecure_channel(worker.address) as channel:
        req = pb.GenerateRequest(
            request_id="big-n", prompt_token_ids=[1] * 8, params=pb.SamplingParams(n=100000)
        )
        with pytest.raises(grpc.RpcError) as err:
            list(pbg.WorkerStub(channel).Generate(req, metadata=token))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "n must be between 1 and 128" in (err.value.details() or "")

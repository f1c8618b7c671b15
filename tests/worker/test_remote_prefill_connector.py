"""The remote-prefill KV connector's scheduler side inside a real Scheduler (fake runner outputs).

Decode owns the destination (docs/design.md §2): the decode side admits, matches its prefix
cache, allocates every prompt block and waits for the load; the prefill side holds a finished
prompt's blocks until the connector reports them sent.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from baton.kvstore.transports.base import KVCacheSpec, KVTransport, TransportError
from baton.kvstore.transports.bench import random_kv
from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pb_grpc
from baton.services.engine.executor import RankKVLayout
from baton.services.engine.kv_connector import FinishedLoad, KVConnectorOutput
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.scheduler import Scheduler
from baton.services.wire import ChannelPool
from baton.services.worker.connectors.remote_prefill import (
    PullFromPrefill,
    RemotePrefillConfig,
    RemotePrefillConnector,
    RemotePrefillMetadata,
    SendToDecode,
    _Load,
    _Send,
)
from tests.engine.test_scheduler import FakeRunner, make, req, run_to_end, step

SOURCE = PullFromPrefill("127.0.0.1:1", pb.SamplingParams(max_tokens=3))


def with_connector(min_tokens: int = 8, **kw: object) -> tuple[Scheduler, RemotePrefillConnector]:
    connector = RemotePrefillConnector(RemotePrefillConfig("d0", min_tokens=min_tokens))
    s = make(**kw)  # type: ignore[arg-type]
    s.connector = connector
    return s, connector


def remote(rid: str, prompt_len: int, **kw: object) -> Request:
    r = req(rid, prompt_len, **kw)  # type: ignore[arg-type]
    r.kv_transfer = SOURCE
    return r


def loads_of(out: object) -> list[object]:
    meta = getattr(out, "kv_connector_metadata", None)
    return list(meta.loads) if isinstance(meta, RemotePrefillMetadata) else []


def landed(rid: str, first_token: int | None = None, ok: bool = True) -> KVConnectorOutput:
    return KVConnectorOutput(finished_loads=(FinishedLoad(rid, ok, first_token),))


def test_remote_prefill_allocates_the_prompt_and_waits_for_kv() -> None:
    s, _ = with_connector()
    r = FakeRunner(s)
    s.add_request(remote("d", 22, max_tokens=3))
    out = step(s, r)
    assert out.num_scheduled_tokens == {}  # nothing computed locally
    (load,) = loads_of(out)
    assert load.request_id == "d" and load.num_cached_tokens == 0  # type: ignore[attr-defined]
    assert len(load.block_ids) == 6  # type: ignore[attr-defined]  # ceil(22 / 4): partial too
    assert s.requests["d"].status is RequestStatus.WAITING_FOR_KV
    (first,) = s.update_from_connector(landed("d", 42))
    assert first.new_token_ids == (42,)
    out = step(s, r)
    # the runner sees it for the first time, with the prompt already computed
    (new,) = out.new_requests
    assert new.num_computed_tokens == 22 and new.token_ids[-1] == 42
    assert out.num_scheduled_tokens == {"d": 1}
    run_to_end(s, r)


def test_conditional_disaggregation_prefills_short_or_cached_prompts_locally() -> None:
    s, _ = with_connector(min_tokens=8)
    r = FakeRunner(s)
    s.add_request(remote("short", 5))
    out = step(s, r)
    assert out.num_scheduled_tokens == {"short": 5} and not loads_of(out)
    run_to_end(s, r)
    s.add_request(req("warm", 21, max_tokens=1))
    run_to_end(s, r)
    s.add_request(remote("hit", 21))  # 20 of 21 tokens are cached
    out = step(s, r)
    assert out.num_scheduled_tokens == {"hit": 1} and not loads_of(out)
    run_to_end(s, r)


def test_remote_prefill_skips_the_locally_cached_prefix() -> None:
    s, _ = with_connector()
    r = FakeRunner(s)
    s.add_request(req("warm", 12, max_tokens=1))
    run_to_end(s, r)
    s.add_request(remote("d", 40))  # shares the first 12 tokens (3 blocks)
    (load,) = loads_of(step(s, r))
    assert load.num_cached_tokens == 12  # type: ignore[attr-defined]  # the warm prompt's blocks
    assert s.update_from_connector(landed("d", 9))
    run_to_end(s, r)


def test_abort_while_awaiting_kv_keeps_blocks_until_the_transfer_ends() -> None:
    s, _ = with_connector(num_blocks=8)
    r = FakeRunner(s)
    s.add_request(remote("d", 20))
    step(s, r)
    s.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_free_blocks == 3  # 5 blocks still held: a transfer may be writing
    assert s.has_pending_transfers
    assert s.update_from_connector(landed("d", 1)) == []
    assert not s.has_pending_transfers
    s.kv.check_integrity(expect_idle=True)
    # the same through a failed prefill
    s.add_request(remote("e", 20))
    step(s, r)
    s.finish_requests(["e"], RequestStatus.FINISHED_ABORTED)
    s.update_from_connector(landed("e", ok=False))
    s.kv.check_integrity(expect_idle=True)


def test_failed_remote_prefill_falls_back_to_local_and_is_not_retried() -> None:
    s, connector = with_connector()
    r = FakeRunner(s)
    s.add_request(remote("d", 20, max_tokens=2))
    step(s, r)
    connector._failed.add("d")  # what the worker side records when the RPC fails
    s.update_from_connector(landed("d", ok=False))
    out = step(s, r)
    assert out.num_scheduled_tokens == {"d": 20} and not loads_of(out)
    run_to_end(s, r)
    assert "d" not in connector._failed  # forgotten once the request ended


def test_preempted_request_with_outputs_is_recomputed_locally() -> None:
    _, connector = with_connector()
    d = remote("d", 20)
    d.append_output_token(5)
    assert connector.num_matched_tokens(d, 0) == 0


def test_prefill_side_holds_blocks_until_the_send_ends() -> None:
    s, _ = with_connector()
    r = FakeRunner(s)
    p = req("p", 18, max_tokens=1)
    p.kv_transfer = SendToDecode(pb.KVDestination(first_block_index=1, block_ids=[7, 8, 9, 10]))
    s.add_request(p)
    step(s, r)
    assert p.is_finished and "p" in s.held
    out = s.schedule()  # the next step tells the worker side to send
    meta = out.kv_connector_metadata
    assert isinstance(meta, RemotePrefillMetadata)
    (send,) = meta.sends
    assert send.request_id == "p" and len(send.block_ids) == 5
    assert s.has_pending_transfers
    s.update_from_connector(KVConnectorOutput(finished_saves=("p",)))
    assert not s.held
    s.kv.check_integrity(expect_idle=True)


def test_aborted_prefill_is_not_sent() -> None:
    s, connector = with_connector()
    future = connector.expect_send("p")
    p = req("p", 18, max_tokens=1)
    p.kv_transfer = SendToDecode(pb.KVDestination())
    s.add_request(p)
    s.finish_requests(["p"], RequestStatus.FINISHED_ABORTED)
    assert not s.held and connector.build_metadata() is None
    assert future.exception() is not None
    s.kv.check_integrity(expect_idle=True)


def test_destination_names_every_rank_and_a_tp_mismatch_is_refused_before_any_byte() -> None:
    kv = torch.randn(2, 2, 8, 4, 4, 16)  # [layers, K/V, blocks, block_size, heads, dim]
    connector = RemotePrefillConnector(RemotePrefillConfig("d0", transport="tcp"))
    connector.register_kv_caches([RankKVLayout(0, KVCacheSpec.from_tensor(kv), 0, 4)], [kv])
    try:
        dest = connector.destination(_Load("r", tuple(range(20)), 8, (3, 4, 5, 6, 7), SOURCE))
        assert dest.first_block_index == 2 and list(dest.block_ids) == [5, 6, 7]
        (rank,) = dest.ranks
        assert (rank.rank, rank.kv_head_start, rank.num_kv_heads) == (0, 0, 4)
        assert list(rank.kv_shape) == list(kv.shape) and rank.transport_metadata
        assert connector.check_destination(dest) is None
        tokenless = pb.KVDestination()
        tokenless.CopyFrom(dest)
        tokenless.transfer_token = ""
        assert "no transfer token" in (connector.check_destination(tokenless) or "")
        wrong = pb.KVDestination(transport="nixl", ranks=list(dest.ranks))
        assert "transport" in (connector.check_destination(wrong) or "")
        split = pb.KVDestination(
            transport="tcp",
            ranks=[
                pb.KVRankDestination(rank=0, kv_head_start=0, num_kv_heads=2),
                pb.KVRankDestination(rank=1, kv_head_start=2, num_kv_heads=2),
            ],
        )
        assert "tensor-parallel layouts differ" in (connector.check_destination(split) or "")
    finally:
        connector.close()


# ---- transfer tokens over a real Prefill RPC -------------------------------------------------


class _PrefillWorker(pb_grpc.WorkerServicer):
    """The prefill worker's Prefill RPC reduced to its handoff: a real prefill-side connector
    writes its blocks into the destination over real TCP (no engine: the KV is random)."""

    def __init__(self, connector: RemotePrefillConnector, outcome: str) -> None:
        self.connector = connector
        self.outcome = outcome
        self.seen: list[pb.KVDestination] = []
        self.grants_during_rpc: list[int] = []
        self.decode_transport: KVTransport | None = None

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        dest = request.destination
        self.seen.append(dest)
        assert self.decode_transport is not None
        self.grants_during_rpc.append(self.decode_transport.num_grants)
        if self.outcome == "error":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is going away")
        if self.outcome == "hang":  # past the decode side's deadline, or until cancelled
            await asyncio.Event().wait()
        assert self.connector.check_destination(dest) is None
        future = self.connector.expect_send(request.request_id)
        await asyncio.to_thread(self.connector._send, _prefill_send(request.request_id, dest))
        stats = future.result()
        return pb.PrefillResponse(
            request_id=request.request_id, first_token_id=42, kv_bytes=stats.num_bytes
        )


PROMPT_BLOCKS = (0, 1, 2, 3, 4)
"""The prefill side's blocks of the 20-token prompt (4-token blocks)."""


def _prefill_send(request_id: str, dest: pb.KVDestination) -> _Send:
    return _Send(request_id, PROMPT_BLOCKS, dest)


def _connector(
    name: str, kv: torch.Tensor, prefill_timeout_s: float = 30.0
) -> RemotePrefillConnector:
    config = RemotePrefillConfig(name, transport="tcp", prefill_timeout_s=prefill_timeout_s)
    connector = RemotePrefillConnector(config, ChannelPool(token=""))
    connector.register_kv_caches([RankKVLayout(0, KVCacheSpec.from_tensor(kv), 0, 4)], [kv])
    return connector


@pytest.mark.parametrize("outcome", ["ok", "error", "deadline", "cancelled"])
def test_each_prefill_gets_its_own_token_revoked_when_the_rpc_ends(outcome: str) -> None:
    decode_kv = random_kv((2, 2, 10, 4, 4, 16), torch.float32, 50)
    prefill_kv = random_kv((2, 2, 6, 4, 4, 16), torch.float32, 51)
    timeout_s = 0.5 if outcome == "deadline" else 30.0
    decode = _connector("d0", decode_kv, prefill_timeout_s=timeout_s)
    prefill = _connector("p0", prefill_kv)
    behaviour = {"ok": "ok", "error": "error", "deadline": "hang", "cancelled": "hang"}
    worker = _PrefillWorker(prefill, behaviour[outcome])
    decode_transport = worker.decode_transport = decode._transports[0]
    before = decode_kv.clone()

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(worker, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        decode.bind(asyncio.get_running_loop(), lambda: None)
        source = PullFromPrefill(f"127.0.0.1:{port}", pb.SamplingParams(max_tokens=3))
        loads = [_Load(f"r{i}", tuple(range(20)), 8, (3, 4, 5, 6, 7), source) for i in range(2)]
        try:
            if outcome == "cancelled":  # the worker shutting down mid-prefill
                task = asyncio.ensure_future(decode._remote_prefill(loads[0]))
                while not worker.seen:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                for load in loads:  # two prefills: two tokens
                    await decode._remote_prefill(load)
        finally:
            await server.stop(0)
            await decode.aclose()
            await prefill.aclose()

    asyncio.run(run())
    tokens = [dest.transfer_token for dest in worker.seen]
    assert all(len(t) >= 32 for t in tokens) and len(set(tokens)) == len(tokens)
    assert worker.grants_during_rpc == [1] * len(tokens)  # granted before the RPC was sent
    assert decode_transport.num_grants == 0  # every token revoked (closing keeps the table)
    finished = {load.request_id: load for load in decode.get_finished().finished_loads}
    if outcome == "ok":
        assert {rid: (f.ok, f.first_token_id) for rid, f in finished.items()} == {
            "r0": (True, 42),
            "r1": (True, 42),
        }
        assert torch.equal(decode_kv[:, :, [5, 6, 7]], prefill_kv[:, :, [2, 3, 4]])
    else:
        expected = {} if outcome == "cancelled" else {"r0": False, "r1": False}
        assert {rid: f.ok for rid, f in finished.items()} == expected
        assert torch.equal(decode_kv, before)


def test_a_late_write_after_the_rpc_ended_is_refused_and_writes_nothing() -> None:
    """The hazard the revoke closes: the decode side's deadline passed and it prefills the
    blocks itself, while the prefill worker (whose write is shielded) writes on."""
    decode_kv = random_kv((2, 2, 10, 4, 4, 16), torch.float32, 52)
    prefill_kv = random_kv((2, 2, 6, 4, 4, 16), torch.float32, 53)
    decode = _connector("d0", decode_kv, prefill_timeout_s=0.5)
    prefill = _connector("p0", prefill_kv)
    worker = _PrefillWorker(prefill, "hang")
    worker.decode_transport = decode._transports[0]

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(worker, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        decode.bind(asyncio.get_running_loop(), lambda: None)
        source = PullFromPrefill(f"127.0.0.1:{port}", pb.SamplingParams(max_tokens=3))
        try:
            await decode._remote_prefill(
                _Load("late", tuple(range(20)), 8, (3, 4, 5, 6, 7), source)
            )
            (dest,) = worker.seen
            before = decode_kv.clone()
            future = prefill.expect_send("late")
            await asyncio.to_thread(prefill._send, _prefill_send("late", dest))
            with pytest.raises(TransportError, match="transfer token is not granted"):
                future.result()
            assert torch.equal(decode_kv, before)
        finally:
            await server.stop(0)
            await decode.aclose()
            await prefill.aclose()

    asyncio.run(run())
    (load,) = decode.get_finished().finished_loads
    assert not load.ok and "late" in decode._failed

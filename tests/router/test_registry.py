"""Registry and Router against a real redis-server process (docs/design.md §9: no fakes)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

import pytest
import redis
import redis.asyncio as aioredis

from baton.router.breaker import CircuitBreaker
from baton.router.policy import NoWorkerAvailable, WorkerLoad
from baton.router.registry import (
    WorkerInfo,
    WorkerRegistration,
    list_workers,
    worker_key,
)
from baton.router.router import Router
from baton.services.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


def info(worker_id: str, role: str = "decode", model: str = "smollm2") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address=f"127.0.0.1:{6000 + sum(map(ord, worker_id)) % 1000}",
        role=role,  # type: ignore[arg-type]
        model=model,
        num_kv_blocks=512,
        block_size=16,
        transport="tcp",
        started_unix_s=time.time(),
    )


def run(body: Callable[[aioredis.Redis], Awaitable[None]], url: str) -> None:
    """Run one async test body with a client bound to its own event loop."""

    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(main())


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.05)
    return await cond()


class FixedLoads:
    """The caller's load fetcher: answers from a table; a worker in `down` fails its call."""

    def __init__(self, tokens: dict[str, int]) -> None:
        self.tokens = tokens
        self.down: set[str] = set()
        self.calls = 0

    async def __call__(self, worker: WorkerInfo) -> WorkerLoad:
        self.calls += 1
        if worker.worker_id in self.down:
            raise ConnectionError(f"{worker.worker_id} is down")
        return WorkerLoad(worker.worker_id, self.tokens.get(worker.worker_id, 0), 1, 0, 0.2)


def test_redis_server_answers_and_stops() -> None:
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert client.ping()
    assert client.config_get("save") == {"save": ""}  # no persistence
    assert server.log_path.exists()
    server.stop()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(
            f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}"
        ).ping()


def test_register_two_workers_and_list_them(url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        d1, p1, other = info("d1"), info("p1", "prefill"), info("x1", model="llama")
        async with WorkerRegistration(r, d1), WorkerRegistration(r, p1):
            reg = WorkerRegistration(r, other)
            await reg.start()
            assert await list_workers(r) == [d1, p1, other]
            assert await list_workers(r, model="smollm2") == [d1, p1]
            ttl_ms = await r.pttl(worker_key("d1"))
            assert 0 < ttl_ms <= 6000
            await reg.stop()  # stop() deletes at once, no TTL wait
            assert await list_workers(r) == [d1, p1]
        assert await list_workers(r) == []

    run(body, url)


def test_heartbeat_keeps_key_alive_and_key_expires_after_it_stops(url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        reg = WorkerRegistration(r, info("d1"), ttl_s=1.0)
        await reg.start()
        await asyncio.sleep(1.5)  # longer than the TTL: only the heartbeat keeps it
        assert [w.worker_id for w in await list_workers(r)] == ["d1"]
        await reg.stop_heartbeat()  # a crash: no delete
        assert [w.worker_id for w in await list_workers(r)] == ["d1"]

        async def gone() -> bool:
            return await list_workers(r) == []

        assert await wait_until(gone, timeout_s=2.0)

    run(body, url)


def test_malformed_entries_are_skipped(url: str, caplog: pytest.LogCaptureFixture) -> None:
    good = info("good")
    bad_role = good.to_json().replace('"decode"', '"oracle"').replace('"good"', '"badrole"')
    bad_type = good.to_json().replace('"block_size": 16', '"block_size": "16"')
    bad_type = bad_type.replace('"good"', '"badtype"')
    entries = {
        worker_key("junk"): b"\xff{not json",
        worker_key("list"): b"[1, 2]",
        worker_key("missing"): b'{"worker_id": "missing"}',
        worker_key("badrole"): bad_role.encode(),
        worker_key("badtype"): bad_type.encode(),
        worker_key("mismatch"): good.to_json().encode(),  # the id in the value is "good"
    }

    async def body(r: aioredis.Redis) -> None:
        await r.mset(entries)
        await r.set("baton:other", b"not a worker")
        async with WorkerRegistration(r, good):
            with caplog.at_level(logging.WARNING, logger="baton.router.registry"):
                assert await list_workers(r) == [good]
        skipped = {rec.args[0] for rec in caplog.records if isinstance(rec.args, tuple)}
        assert skipped == set(entries)

    run(body, url)


def test_router_places_by_least_load_and_counts_pending_tokens(url: str) -> None:
    loads = FixedLoads({"d1": 500, "d2": 100, "p1": 40, "p2": 20})

    async def body(r: aioredis.Redis) -> None:
        regs = [
            WorkerRegistration(r, info(w, "prefill" if w[0] == "p" else "decode"))
            for w in loads.tokens
        ]
        for reg in regs:
            await reg.start()
        async with Router(
            r, loads, model="smollm2", policy="least-loaded", poll_interval_s=3600
        ) as router:
            first = (await router.place(500, request_id="a")).placement
            assert first.decode.worker_id == "d2"
            assert first.prefill is not None and first.prefill.worker_id == "p2"
            assert router.pending_tokens("d2") == 500 and router.pending_tokens("p2") == 500
            # Reported loads still say d2 (100) and p2 (20) are the least loaded, but with the
            # 500 tokens just placed there they are not: the next request goes elsewhere.
            second = (await router.place(200, request_id="b")).placement
            assert second.decode.worker_id == "d1"
            assert second.prefill is not None and second.prefill.worker_id == "p1"
            router.release("a")
            router.release("a")  # twice is a no-op
            assert router.pending_tokens("d2") == 0
            third = (await router.place(10, request_id="c")).placement
            assert third.decode.worker_id == "d2"
            with pytest.raises(ValueError, match="already placed"):
                await router.place(10, request_id="c")
            # A load report fetched after the placement includes it: pending drops.
            await asyncio.sleep(0.01)
            await router.poll_loads()
            assert router.pending_tokens("d2") == 0 and router.pending_tokens("d1") == 0
            router.release("b")
            router.release("c")
        for reg in regs:
            await reg.stop()

    run(body, url)


def test_router_skips_unhealthy_worker_until_it_answers(url: str) -> None:
    loads = FixedLoads({"d1": 0, "d2": 1000})

    async def body(r: aioredis.Redis) -> None:
        async with WorkerRegistration(r, info("d1")), WorkerRegistration(r, info("d2")):
            router = Router(r, loads, poll_interval_s=0.05, breaker=CircuitBreaker(0.2, 0.4))
            async with router:
                assert (await router.place(10, "a")).placement.decode.worker_id == "d1"
                loads.down.add("d1")

                async def d1_unhealthy() -> bool:
                    return not router.is_healthy("d1")

                assert await wait_until(d1_unhealthy, timeout_s=2.0)  # the background poll
                assert (await router.place(10, "b")).placement.decode.worker_id == "d2"
                loads.down.clear()

                async def d1_back() -> bool:
                    return router.is_healthy("d1")

                assert await wait_until(d1_back, timeout_s=2.0)
                assert (await router.place(10, "c")).placement.decode.worker_id == "d1"
                router.mark_unhealthy("d1")  # a failed call reported by the gateway
                assert (await router.place(10, "d")).placement.decode.worker_id == "d2"
                await router.poll_loads()  # d1 answers its probe, but its breaker is open
                assert not router.is_healthy("d1")
                await asyncio.sleep(0.25)  # the breaker's backoff passes: half open
                loads.down.add("d2")
                await router.poll_loads()
                assert router.is_healthy("d1") and not router.is_healthy("d2")
                assert (await router.place(10, "e")).placement.decode.worker_id == "d1"
                router.mark_unhealthy("d1")  # failing again: open twice as long
                await router.poll_loads()
                await asyncio.sleep(0.25)
                assert not router.is_healthy("d1")
                router.report_success("d1")  # a stream went through: closed
                assert router.is_healthy("d1")

    run(body, url)


def test_no_worker_available_then_on_demand_refresh(url: str) -> None:
    loads = FixedLoads({})

    async def body(r: aioredis.Redis) -> None:
        async with Router(r, loads, refresh_interval_s=3600, poll_interval_s=3600) as router:
            with pytest.raises(NoWorkerAvailable):
                await router.place(10, "a")
            async with WorkerRegistration(r, info("p1", "prefill")):
                with pytest.raises(NoWorkerAvailable):
                    await router.place(10, "b")
                # The cache is fresh (interval 1 h) but empty of decode workers: place()
                # re-reads the registry once before giving up.
                async with WorkerRegistration(r, info("m1", "mixed")):
                    placement = (await router.place(10, "c")).placement
                    assert placement.decode.worker_id == "m1"
                    assert placement.prefill is None  # 10 tokens: cheapest on m1 itself
                    loads.down.add("m1")
                    await router.poll_loads()
                    with pytest.raises(NoWorkerAvailable):
                        await router.place(10, "d")

    run(body, url)


def test_registration_survives_a_redis_restart() -> None:
    """Soft state (docs/design.md §4): the next heartbeat writes the key into the new server."""
    first = RedisServer().start()
    port = first.port

    async def body(r: aioredis.Redis) -> None:
        nonlocal first
        async with WorkerRegistration(r, info("d1"), ttl_s=0.6) as reg:
            first.stop()
            await asyncio.sleep(0.3)  # a heartbeat or two fail and are logged
            first = RedisServer(port=port).start()

            async def back() -> bool:
                try:
                    return [w.worker_id for w in await list_workers(r)] == ["d1"]
                except redis.RedisError:
                    return False

            assert await wait_until(back, timeout_s=3.0)
            assert reg.key == worker_key("d1")

    try:
        run(body, first.url)
    finally:
        first.stop()


def test_entries_without_a_valid_proof_are_skipped_under_a_cluster_token(url: str) -> None:
    token = "cluster-secret"
    ours = info("d1").signed(token)
    unsigned = info("d2")
    forged = info("d3").signed("another-secret")
    tampered = WorkerInfo.from_json(
        info("d4").signed(token).to_json().replace("127.0.0.1", "10.6.6.6")
    )

    async def body(r: aioredis.Redis) -> None:
        for w in (ours, unsigned, forged, tampered):
            await r.set(worker_key(w.worker_id), w.to_json())
        assert await list_workers(r, token=token) == [ours]
        assert len(await list_workers(r)) == 4  # no token: nothing is checked
        loads = FixedLoads({})
        async with Router(r, loads, token=token, poll_interval_s=3600) as router:
            assert [w.worker_id for w in router.workers] == ["d1"]
            assert (await router.place(10, "a")).placement.decode.worker_id == "d1"

    run(body, url)


def test_an_empty_registry_is_not_no_workers(url: str) -> None:
    """Redis restarted and came back empty: the known workers stay while they answer, for
    their grace; one that stops answering, or outstays the grace, is dropped."""
    loads = FixedLoads({"d1": 0, "d2": 10})

    async def body(r: aioredis.Redis) -> None:
        for w in ("d1", "d2"):
            await r.set(worker_key(w), info(w).to_json())
        router = Router(
            r, loads, refresh_interval_s=0.05, poll_interval_s=0.05, missing_grace_s=1.0
        )
        async with router:
            assert len(router.workers) == 2
            await r.flushdb()  # what a restarted Redis holds
            await router.refresh_workers()
            assert [w.worker_id for w in router.workers] == ["d1", "d2"]
            assert (await router.place(10, "a")).placement.decode.worker_id == "d1"
            await r.set(worker_key("d2"), info("d2").to_json())  # d2's next heartbeat
            loads.down.add("d1")  # and d1 dies for real

            async def only_d2() -> bool:
                return [w.worker_id for w in router.workers] == ["d2"]

            assert await wait_until(only_d2, timeout_s=2.0)
            assert (await router.place(10, "b")).placement.decode.worker_id == "d2"
            await r.set(worker_key("d1"), info("d1").to_json())  # d1 re-registers: back
            loads.down.clear()

            async def both() -> bool:
                return len(router.workers) == 2 and router.is_healthy("d1")

            assert await wait_until(both, timeout_s=2.0)
            await r.delete(worker_key("d1"))  # d1 is gone from the registry for good

            async def gone() -> bool:
                return [w.worker_id for w in router.workers] == ["d2"]

            assert await wait_until(gone, timeout_s=3.0)  # after its grace of 1 s

    run(body, url)


def test_a_draining_worker_gets_nothing_new(url: str) -> None:
    class Draining(FixedLoads):
        async def __call__(self, worker: WorkerInfo) -> WorkerLoad:
            load = await super().__call__(worker)
            return replace(load, draining=worker.worker_id in self.draining)

    loads = Draining({"d1": 0, "d2": 1000})
    loads.draining = {"d1"}  # type: ignore[attr-defined]

    async def body(r: aioredis.Redis) -> None:
        async with (
            WorkerRegistration(r, info("d1")),
            WorkerRegistration(r, info("d2")),
            Router(r, loads, poll_interval_s=3600) as router,
        ):
            assert not router.is_healthy("d1")
            assert (await router.place(10, "a")).placement.decode.worker_id == "d2"

    run(body, url)


def test_a_load_poll_that_times_out_during_a_loop_stall_is_no_verdict(url: str) -> None:
    class Slow(FixedLoads):
        async def __call__(self, worker: WorkerInfo) -> WorkerLoad:
            time.sleep(0.5)  # the event loop itself is stalled (a CPU-bound handler)
            return await super().__call__(worker)

    class Hung(FixedLoads):
        async def __call__(self, worker: WorkerInfo) -> WorkerLoad:
            await asyncio.sleep(10)  # the worker does not answer; the loop is fine
            raise AssertionError("unreachable")

    async def body(r: aioredis.Redis) -> None:
        async with WorkerRegistration(r, info("d1")):
            stalled = Router(r, Slow({}), poll_interval_s=3600, fetch_timeout_s=0.1)
            async with stalled:
                await stalled.poll_loads()
                assert stalled.is_healthy("d1")
            hung = Router(r, Hung({}), poll_interval_s=3600, fetch_timeout_s=0.1)
            async with hung:
                assert not hung.is_healthy("d1")

    run(body, url)


def test_a_frozen_redis_never_holds_a_placement() -> None:
    """SIGSTOP on Redis: placements come from the cache; a refresh gives up after its deadline
    (a registry call with no deadline would hang the request that waits on it forever)."""
    import os
    import signal

    server = RedisServer().start()
    assert server._proc is not None
    loads = FixedLoads({"d1": 0})

    async def body(r: aioredis.Redis) -> None:
        await r.set(worker_key("d1"), info("d1").to_json())
        router = Router(r, loads, poll_interval_s=0.05, refresh_interval_s=0.05)
        router.refresh_timeout_s = 0.3
        async with router:
            assert server._proc is not None
            os.kill(server._proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.3)  # background refreshes time out meanwhile
                placement = (await asyncio.wait_for(router.place(10, "a"), 5)).placement
                assert placement.decode.worker_id == "d1"
                loads.down.add("d1")
                await router.poll_loads()
                with pytest.raises(NoWorkerAvailable):  # the on-demand refresh times out
                    await asyncio.wait_for(router.place(10, "b"), 5)
            finally:
                os.kill(server._proc.pid, signal.SIGCONT)

    try:
        run(body, server.url)
    finally:
        server.stop()


def test_circuit_breaker_backs_off_per_outage_and_closes_on_success() -> None:
    breaker = CircuitBreaker(base_s=1.0, max_s=4.0)
    assert breaker.failure("w", now=0.0) == 1.0
    assert breaker.failure("w", now=0.5) == 0.5  # same outage: not counted again
    assert breaker.is_open("w", 0.9) and not breaker.is_open("w", 1.0)
    assert breaker.failure("w", now=1.0) == 2.0  # half open, failed again: twice as long
    assert breaker.failure("w", now=3.0) == 4.0
    assert breaker.failure("w", now=7.0) == 4.0  # capped
    assert breaker.failures("w") == 4
    breaker.success("w")
    assert breaker.failures("w") == 0 and not breaker.is_open("w", 7.5)
    breaker.failure("x", 0.0)
    breaker.retain({"w"})
    assert breaker.failures("x") == 0


def test_slow_probes_cost_a_worker_its_turn_not_its_requests(url: str) -> None:
    """A probe that times out makes its worker slow: skipped while another can serve, used
    rather than a 503. When every probe of a round times out the gateway is the one starved
    (a loaded host): no verdict on anyone."""

    class Hung(FixedLoads):
        hung: frozenset[str] = frozenset()

        async def __call__(self, worker: WorkerInfo) -> WorkerLoad:
            if worker.worker_id in self.hung:
                await asyncio.sleep(10)
            return await super().__call__(worker)

    loads = Hung({"d1": 0, "d2": 500})

    async def body(r: aioredis.Redis) -> None:
        async with (
            WorkerRegistration(r, info("d1")),
            WorkerRegistration(r, info("d2")),
            Router(r, loads, poll_interval_s=3600, fetch_timeout_s=0.1) as router,
        ):
            loads.hung = frozenset({"d1", "d2"})
            await router.poll_loads()
            assert router.is_healthy("d1") and router.is_healthy("d2")
            loads.hung = frozenset({"d1"})
            await router.poll_loads()
            assert not router.is_healthy("d1") and router.is_healthy("d2")
            assert (await router.place(10, "a")).placement.decode.worker_id == "d2"  # though busier
            loads.down.add("d2")
            await router.poll_loads()
            assert (
                await router.place(10, "b")
            ).placement.decode.worker_id == "d1"  # the last resort
            loads.hung = frozenset()
            loads.down.clear()
            await router.poll_loads()
            assert router.is_healthy("d1") and router.is_healthy("d2")

    run(body, url)


def test_a_burst_of_one_prefix_stays_where_its_first_request_went(url: str) -> None:
    """Prompts placed and still running count as held where they run: the second request of a
    burst follows the first before any KV event could say the blocks are there."""
    from baton.router.prefix_index import PrefixIndex

    loads = FixedLoads({"d1": 0, "d2": 0})
    prompt = list(range(1000, 1000 + 16 * 40))  # 40 blocks

    async def body(r: aioredis.Redis) -> None:
        async with (
            WorkerRegistration(r, info("d1")),
            WorkerRegistration(r, info("d2")),
            Router(r, loads, index=PrefixIndex(), poll_interval_s=3600) as router,
        ):
            first = await router.place(prompt, "a")
            assert first.decode_matched_blocks == 0
            second = await router.place([*prompt[:-16], 7] * 1, "b")
            assert second.placement.decode.worker_id == first.placement.decode.worker_id
            assert second.decode_matched_blocks == 39
            router.release("a")
            router.release("b")
            assert router._pending_keys == {first.placement.decode.worker_id: {}}

    run(body, url)

"""The KV-aware placement and its cost model on hand-written matches and loads: pure, no I/O.

Numbers under the default CostModel: 16-token blocks of 2 MiB (128 KiB per token), prefill
8000 tokens/s, host 10 GB/s, disk 2 GB/s, tcp handoff 1 GB/s, 2 ms per remote round trip.
"""

from __future__ import annotations

import math
import random
import re

import pytest

from baton.router.cost_model import CostModel, OnlineCostModel
from baton.router.kv_policy import RouteDecision, choose_kv_placement, price
from baton.router.policy import NoWorkerAvailable, WorkerLoad, decide
from baton.router.prefix_index import PrefixMatch
from baton.router.registry import WorkerInfo

BS = 16
COST = CostModel()


def worker(
    worker_id: str, role: str = "decode", *, transport: str = "tcp", kv_block_bytes: int = 0
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address="127.0.0.1:5000",
        role=role,  # type: ignore[arg-type]
        model="m",
        num_kv_blocks=4096,
        block_size=BS,
        transport=transport,
        started_unix_s=1.0,
        kv_block_bytes=kv_block_bytes,
    )


def load(worker_id: str, tokens: int = 0, waiting: int = 0, draining: bool = False) -> WorkerLoad:
    return WorkerLoad(worker_id, tokens, 0, waiting, 0.1, draining)


def hit(device: int = 0, host: int = 0, disk: int = 0) -> PrefixMatch:
    by_tier = {t: n for t, n in (("device", device), ("host", host), ("disk", disk)) if n}
    return PrefixMatch(device + host + disk, by_tier)


def place(
    workers: list[WorkerInfo],
    matches: dict[str, PrefixMatch],
    num_prompt_tokens: int,
    loads: dict[str, WorkerLoad] | None = None,
    cost: CostModel = COST,
    min_tokens: int = 0,
) -> RouteDecision:
    return choose_kv_placement(
        workers,
        loads or {},
        matches,
        num_prompt_tokens,
        BS,
        cost,
        local_prefill_min_tokens=min_tokens,
    )


# ---- prefix hits and load -------------------------------------------------------------------


def test_deepest_hit_wins_when_loads_are_equal() -> None:
    workers = [worker("d1"), worker("d2"), worker("d3")]
    matches = {"d1": hit(10), "d2": hit(40), "d3": hit(0)}
    d = place(workers, matches, 1024)
    assert d.placement.decode.worker_id == "d2" and d.local_prefill
    assert (d.decode_matched_blocks, d.num_prompt_blocks) == (40, 64)
    assert d.predicted_ttft_s == pytest.approx((1024 - 640) / 8000)


def test_a_hot_worker_loses_to_a_cold_one_when_its_queue_outweighs_the_hit() -> None:
    workers = [worker("hot"), worker("cold")]
    matches = {"hot": hit(40)}  # saves 640 tokens = 80 ms of prefill
    hot_long = place(workers, matches, 1024, {"hot": load("hot", 50_000)})  # 6.25 s of queue
    assert hot_long.placement.decode.worker_id == "cold"
    hot_short = place(workers, matches, 1024, {"hot": load("hot", 400)})  # 50 ms of queue
    assert hot_short.placement.decode.worker_id == "hot"
    # 100 waiting x 2 ms = 200 ms of queue outweigh the hit's 80 ms of TTFT plus the 80 ms of
    # compute it spares (the score weighs recompute: kv_policy.RECOMPUTE_WEIGHT).
    waiting = place(workers, matches, 1024, {"hot": load("hot", 0, waiting=100)})
    assert waiting.placement.decode.worker_id == "cold"
    close = place(workers, matches, 1024, {"hot": load("hot", 0, waiting=50)})  # 100 ms
    assert close.placement.decode.worker_id == "hot" and close.predicted_ttft_s > 0.08


def test_a_device_hit_beats_an_equal_host_hit() -> None:
    d = place([worker("host"), worker("dev")], {"host": hit(host=40), "dev": hit(40)}, 1024)
    assert d.placement.decode.worker_id == "dev"
    host = next(c for c in d.candidates if c.decode_id == "host")
    assert host.tier_s == pytest.approx(40 * BS * 131072 / 10e9)


def test_a_host_hit_beats_no_hit_when_the_copy_is_cheaper_than_recompute() -> None:
    # 40 blocks: copy 84 MB at 10 GB/s = 8 ms; recompute 640 tokens = 80 ms.
    d = place([worker("cold"), worker("host")], {"host": hit(host=40)}, 1024)
    assert d.placement.decode.worker_id == "host"
    # From disk at the default 2 GB/s (42 ms), still cheaper than recompute.
    d = place([worker("cold"), worker("disk")], {"disk": hit(disk=40)}, 1024)
    assert d.placement.decode.worker_id == "disk"


def test_a_disk_hit_loses_when_its_bandwidth_makes_it_slower_than_recompute() -> None:
    # Loading 40 blocks must beat recomputing them: 80 ms of TTFT, plus as much compute spared
    # (kv_policy.RECOMPUTE_WEIGHT): a 336 ms load from a 0.25 GB/s disk does not.
    slow_disk = CostModel(tier_bytes_per_s={"host": 10e9, "disk": 0.25e9})
    d = place([worker("cold"), worker("disk")], {"disk": hit(disk=40)}, 1024, cost=slow_disk)
    assert d.placement.decode.worker_id == "cold"
    # The same at the default disk rate when blocks are heavy (10 MiB: 210 ms for 40).
    heavy = [worker("cold", kv_block_bytes=10 << 20), worker("disk", kv_block_bytes=10 << 20)]
    d = place(heavy, {"disk": hit(disk=40)}, 1024)
    assert d.placement.decode.worker_id == "cold"


def test_a_full_hit_still_computes_the_last_token() -> None:
    # A block-aligned prompt held whole: the engine recomputes its last block.
    d = place([worker("d1")], {"d1": hit(64)}, 1024)
    assert d.decode_matched_blocks == 63
    assert d.predicted_ttft_s == pytest.approx(16 / 8000)


# ---- conditional disaggregation -------------------------------------------------------------


def test_a_small_missing_part_is_prefilled_on_the_decode_worker() -> None:
    workers = [worker("d1"), worker("p1", "prefill")]
    loads = {"d1": load("d1", 20_000)}  # busy: remote would win by the cost model alone
    d = place(workers, {"d1": hit(60)}, 1024, loads, min_tokens=256)  # 64 tokens missing
    assert d.local_prefill and d.placement.prefill is None
    assert all(c.local for c in d.candidates)


def test_a_large_prompt_goes_to_an_idle_prefill_worker() -> None:
    workers = [worker("d1"), worker("p1", "prefill")]
    d = place(workers, {}, 8192, {"d1": load("d1", 20_000)}, min_tokens=256)
    assert d.placement.prefill is not None and d.placement.prefill.worker_id == "p1"
    remote = d.candidates[0]
    assert remote.handoff_s == pytest.approx(8192 * 131072 / 1e9)
    assert d.predicted_ttft_s == pytest.approx(0.002 + 8192 / 8000 + remote.handoff_s)


def test_remote_is_chosen_only_when_it_beats_local() -> None:
    # Both idle, no hits: the handoff and the round trip make remote slower.
    d = place([worker("d1"), worker("p1", "prefill")], {}, 8192, min_tokens=256)
    assert d.local_prefill
    # A fast transport does not change that: the prefill itself costs the same on either.
    fast = [worker("d1", transport="nixl"), worker("p1", "prefill", transport="nixl")]
    assert place(fast, {}, 8192, min_tokens=256).local_prefill


def test_a_prefill_worker_with_a_deep_hit_of_its_own_is_preferred() -> None:
    workers = [worker("d1"), worker("p1", "prefill"), worker("p2", "prefill")]
    matches = {"p2": hit(480)}  # of 512 blocks
    d = place(workers, matches, 8192, {"d1": load("d1", 20_000)}, min_tokens=256)
    assert d.placement.prefill is not None and d.placement.prefill.worker_id == "p2"
    assert (d.decode_matched_blocks, d.prefill_matched_blocks) == (0, 480)
    # It computes only what it misses, but sends all that the decode worker misses.
    assert d.candidates[0].prefill_s == pytest.approx(512 / 8000)
    assert d.candidates[0].handoff_s == pytest.approx(8192 * 131072 / 1e9)


def test_the_prefill_side_is_the_prefill_workers_queue_not_the_decode_workers() -> None:
    workers = [worker("d1"), worker("p1", "prefill"), worker("p2", "prefill")]
    loads = {"d1": load("d1", 40_000), "p1": load("p1", 30_000), "p2": load("p2", 1_000)}
    d = place(workers, {}, 4096, loads)
    assert d.placement.prefill is not None and d.placement.prefill.worker_id == "p2"


# ---- pools and failure ----------------------------------------------------------------------


def test_mixed_workers_decode_and_prefill_themselves() -> None:
    workers = [worker("m1", "mixed"), worker("m2", "mixed")]
    d = place(workers, {"m2": hit(20)}, 1024)
    assert d.placement.decode.worker_id == "m2" and d.local_prefill
    # A mixed worker is never anyone's prefill worker.
    busy = {"m1": load("m1", 90_000), "m2": load("m2", 90_000)}
    assert place(workers, {}, 8192, busy).local_prefill


def test_no_decode_worker_raises() -> None:
    with pytest.raises(NoWorkerAvailable):
        place([worker("p1", "prefill")], {}, 64)
    with pytest.raises(NoWorkerAvailable):
        place([], {}, 64)
    with pytest.raises(NoWorkerAvailable):  # the only decode worker is draining
        place([worker("d1"), worker("p1", "prefill")], {}, 64, {"d1": load("d1", draining=True)})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        place([worker("d1")], {}, -1)
    with pytest.raises(ValueError, match="block_size"):
        choose_kv_placement([worker("d1")], {}, {}, 16, 0, COST)


def test_ties_are_deterministic_whatever_the_input_order() -> None:
    workers = [worker(f"d{i}") for i in range(6)] + [worker("p1", "prefill")]
    rng = random.Random(3)
    chosen = set()
    for _ in range(20):
        rng.shuffle(workers)
        chosen.add(place(workers, {}, 512).placement.decode.worker_id)
    assert chosen == {"d0"}
    # Equal TTFT: the deeper hit wins (d3 holds 64 tokens but has 64 queued: 8 ms either way).
    d = place(workers, {"d3": hit(4)}, 512, {"d3": load("d3", 64)})
    assert d.candidates[0].ttft_s == pytest.approx(d.candidates[1].ttft_s)
    assert d.placement.decode.worker_id == "d3"
    # Equal TTFT and hit: the less loaded (16 tokens queued on d1 cost what one waiting
    # request on d2 does, 2 ms).
    loads = {f"d{i}": load(f"d{i}", 10_000) for i in range(6)}
    loads |= {"d1": load("d1", 16), "d2": load("d2", 0, waiting=1)}
    assert place(workers, {}, 512, loads).placement.decode.worker_id == "d2"


def test_inputs_are_not_mutated() -> None:
    workers = [worker("d1"), worker("p1", "prefill")]
    loads = {"d1": load("d1", 5)}
    matches = {"d1": hit(2, host=1)}
    before = (list(workers), dict(loads), dict(matches))
    place(workers, matches, 100, loads)
    assert (workers, loads, matches) == before


# ---- every policy yields a decision -----------------------------------------------------------


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin"])
def test_load_only_policies_are_priced_by_the_same_model(policy: str) -> None:
    workers = [worker("d1"), worker("d2"), worker("p1", "prefill")]
    loads = {"d1": load("d1", 100), "d2": load("d2", 900)}
    matches = {"d1": hit(3), "d2": hit(30)}
    d = decide(policy, workers, loads, matches, 1024, BS, COST, 0, 2048)
    assert d.placement.decode.worker_id == "d1" and d.local_prefill  # load only, hit ignored
    assert d.decode_matched_blocks == 3
    assert d.predicted_ttft_s == pytest.approx(
        price(workers[0], None, loads, matches, 1024, BS, COST).ttft_s
    )
    assert d.policy in ("least-loaded", "round-robin")


def test_decide_kv_is_choose_kv_placement() -> None:
    workers = [worker("d1"), worker("d2")]
    matches = {"d2": hit(30)}
    assert decide("kv", workers, {}, matches, 1024, BS, COST) == place(workers, matches, 1024)
    with pytest.raises(ValueError, match="policy"):
        decide("random", workers, {}, matches, 1024, BS, COST)


def test_header_is_one_ascii_token_list() -> None:
    workers = [worker("decode-1"), worker("prefill-0", "prefill")]
    d = place(workers, {"decode-1": hit(12)}, 16 * 16 + 5, {"decode-1": load("decode-1", 90_000)})
    assert re.fullmatch(
        r"decode=decode-1;prefill=prefill-0;matched=12/16;ttft_ms=\d+\.\d;policy=kv", d.header()
    )
    local = place([worker("we ird;id=ü")], {}, 64)
    header = local.header()
    assert header.isascii() and " " not in header
    assert header.startswith("decode=we_ird_id__;prefill=-;matched=0/4;")
    assert dict(kv.split("=") for kv in header.split(";"))["policy"] == "kv"
    assert "route decode=" in local.log_line() and "local" in local.log_line()


# ---- the online cost model --------------------------------------------------------------------


def test_online_cost_model_starts_at_the_defaults() -> None:
    assert OnlineCostModel().snapshot() == CostModel()
    snap = OnlineCostModel().snapshot()
    assert snap.prefill_rate("anyone") == 8000 and snap.tier_s("device", 1e12) == 0


def test_online_cost_model_converges_to_observed_rates() -> None:
    online = OnlineCostModel()
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(100, 4000)
        online.observe_prefill("w1", n, n / 2500 * rng.uniform(0.9, 1.1))
        online.observe_queue("w1", n, n / 30_000)
        online.observe_transfer("host", n * 131072, n * 131072 / 3e9)
        online.observe_transfer("handoff:nixl", n * 131072, n * 131072 / 20e9)
        online.observe_rpc(0.0007)
    snap = online.snapshot()
    assert snap.prefill_rate("w1") == pytest.approx(2500, rel=0.1)
    assert snap.prefill_rate("w2") == 8000  # unobserved: the default
    assert snap.drain_rate("w1") == pytest.approx(30_000)
    assert snap.tier_bytes_per_s["host"] == pytest.approx(3e9)
    assert snap.tier_bytes_per_s["disk"] == 2e9
    assert snap.handoff_bytes_per_s["nixl"] == pytest.approx(20e9)
    assert snap.rpc_overhead_s == pytest.approx(0.0007)
    online.forget("w1")
    assert online.snapshot().prefill_rate("w1") == 8000


def test_online_cost_model_ignores_garbage_and_clamps_outliers() -> None:
    online = OnlineCostModel()
    online.observe_prefill("w1", 1000, 0.5)  # 2000 tok/s
    garbage = [
        online.observe_prefill("w1", 1000, 0.0),
        online.observe_prefill("w1", 1000, -1.0),
        online.observe_prefill("w1", 1000, math.nan),
        online.observe_prefill("w1", 1000, math.inf),
        online.observe_prefill("w1", -5, 1.0),
        online.observe_prefill("w1", 1000, 1e-9),  # 1e12 tok/s: not physical
        online.observe_prefill("w1", 3, 1.0),  # too few tokens to measure a rate
        online.observe_transfer("disk", 1 << 20, 0.0),
        online.observe_transfer("handoff:tcp", 1 << 30, math.nan),
        online.observe_transfer("device", 1 << 30, 0.1),
        online.observe_rpc(-0.1),
        online.observe_rpc(math.nan),
        online.observe_queue("w1", 1000, 0.0),
    ]
    assert not any(garbage) and online.num_ignored == len(garbage)
    assert online.snapshot().prefill_rate("w1") == 2000
    assert online.snapshot().rpc_overhead_s == CostModel().rpc_overhead_s
    # One sane-but-wild sample (a 100x stall) moves the estimate by at most alpha x 4x.
    online.observe_prefill("w1", 1000, 50.0)
    assert online.snapshot().prefill_rate("w1") == pytest.approx(2000 - 0.2 * (2000 - 500))
    with pytest.raises(ValueError, match="names no"):
        online.observe_transfer("handoff:", 1 << 20, 1.0)


def test_cost_model_rejects_impossible_rates() -> None:
    with pytest.raises(ValueError):
        CostModel(default_prefill_tokens_per_s=0)
    with pytest.raises(ValueError):
        CostModel(tier_bytes_per_s={"host": math.nan})
    with pytest.raises(ValueError):
        CostModel(rpc_overhead_s=-1)
    assert CostModel().queue_s("w", 8000, 0) == pytest.approx(1.0)


def test_worker_kv_block_bytes_sets_the_price_of_a_block() -> None:
    light = worker("l", kv_block_bytes=BS * 1000)
    assert COST.kv_bytes_per_token(light) == 1000
    assert COST.kv_bytes_per_token(worker("unknown")) == 131072


def test_kv_block_bytes_is_parsed_tolerantly_and_signed() -> None:
    info = worker("d1", kv_block_bytes=2 << 20)
    assert WorkerInfo.from_json(info.to_json()) == info
    old = info.to_json().replace(', "kv_block_bytes": 2097152', "")  # a worker that predates it
    assert "kv_block_bytes" not in old and WorkerInfo.from_json(old).kv_block_bytes == 0
    with pytest.raises(ValueError, match="kv_block_bytes"):
        WorkerInfo.from_json(info.to_json().replace("2097152", '"big"'))
    with pytest.raises(ValueError, match="kv_block_bytes"):
        worker("d1", kv_block_bytes=-1)
    signed = info.signed("secret")
    tampered = WorkerInfo.from_json(signed.to_json().replace("2097152", "1"))
    assert signed.proven("secret") and not tampered.proven("secret")

"""choose_placement on hand-written inputs: pure, no Redis, no clock."""

from __future__ import annotations

import pytest

from baton.router.policy import (
    POLICIES,
    NoWorkerAvailable,
    Placement,
    WorkerLoad,
    canonical_policy,
    choose_placement,
)
from baton.router.registry import WorkerInfo


def worker(worker_id: str, role: str = "decode") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address=f"127.0.0.1:{5000 + len(worker_id)}",
        role=role,  # type: ignore[arg-type]
        model="smollm2",
        num_kv_blocks=1024,
        block_size=16,
        transport="tcp",
        started_unix_s=1.0,
    )


def load(worker_id: str, tokens: int, running: int = 0) -> WorkerLoad:
    return WorkerLoad(worker_id, tokens, running, 0, 0.1)


def test_least_load_picks_fewest_outstanding_tokens() -> None:
    workers = [worker("d1"), worker("d2"), worker("d3")]
    loads = {"d1": load("d1", 500), "d2": load("d2", 100), "d3": load("d3", 300)}
    placement = choose_placement(workers, loads, num_prompt_tokens=64)
    assert placement == Placement(prefill=None, decode=workers[1])


def test_least_load_ties_by_running_then_worker_id() -> None:
    workers = [worker("d3"), worker("d2"), worker("d1")]
    loads = {"d1": load("d1", 100, running=4), "d2": load("d2", 100, 2), "d3": load("d3", 100, 2)}
    assert choose_placement(workers, loads, 10).decode.worker_id == "d2"
    loads["d2"] = load("d2", 100, 3)
    assert choose_placement(workers, loads, 10).decode.worker_id == "d3"


def test_worker_without_a_load_report_counts_as_idle() -> None:
    workers = [worker("d1"), worker("new")]
    assert choose_placement(workers, {"d1": load("d1", 1)}, 10).decode.worker_id == "new"


def test_prefill_pool_and_decode_pool_are_separate() -> None:
    workers = [
        worker("p1", "prefill"),
        worker("p2", "prefill"),
        worker("d1"),
        worker("m1", "mixed"),
    ]
    loads = {
        "p1": load("p1", 900),
        "p2": load("p2", 50),
        "d1": load("d1", 0),  # the least loaded overall, but only a decode worker
        "m1": load("m1", 10),
    }
    placement = choose_placement(workers, loads, 256)
    assert placement.prefill is not None and placement.prefill.worker_id == "p2"
    assert placement.decode.worker_id == "d1"


def test_mixed_worker_decodes_and_prefills_itself_without_prefill_pool() -> None:
    workers = [worker("m1", "mixed"), worker("m2", "mixed")]
    placement = choose_placement(workers, {"m1": load("m1", 7), "m2": load("m2", 3)}, 128)
    assert placement.prefill is None and placement.decode.worker_id == "m2"


def test_prefill_only_cluster_has_no_worker() -> None:
    with pytest.raises(NoWorkerAvailable):
        choose_placement([worker("p1", "prefill")], {}, 10)
    with pytest.raises(NoWorkerAvailable):
        choose_placement([], {}, 10)


def test_round_robin_cycles_each_pool_in_worker_id_order() -> None:
    workers = [worker("d2"), worker("p1", "prefill"), worker("d1"), worker("d3")]
    loads = {"d1": load("d1", 0)}  # ignored by round robin
    decodes, prefills = [], []
    for rr in range(6):
        placement = choose_placement(workers, loads, 32, policy="round-robin", rr_counter=rr)
        decodes.append(placement.decode.worker_id)
        assert placement.prefill is not None
        prefills.append(placement.prefill.worker_id)
    assert decodes == ["d1", "d2", "d3", "d1", "d2", "d3"]
    assert prefills == ["p1"] * 6


def test_policy_names_are_checked() -> None:
    assert POLICIES == ("kv", "least-loaded", "round-robin")
    for name in POLICIES:
        assert canonical_policy(name) == name
    with pytest.raises(ValueError, match="unknown placement policy"):
        canonical_policy("least_load")


def test_kv_policy_without_matches_places_by_load() -> None:
    workers = [worker("d1"), worker("d2"), worker("p1", "prefill")]
    loads = {"d1": load("d1", 4000), "d2": load("d2", 100)}
    placement = choose_placement(workers, loads, 64, policy="kv", local_prefill_max_tokens=256)
    assert placement == Placement(prefill=None, decode=workers[1])


def test_short_prompt_is_prefilled_on_the_decode_worker() -> None:
    workers = [worker("p1", "prefill"), worker("d1")]
    short = choose_placement(workers, {}, 100, local_prefill_max_tokens=256)
    assert short.prefill is None
    long = choose_placement(workers, {}, 257, local_prefill_max_tokens=256)
    assert long.prefill is not None and long.prefill.worker_id == "p1"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        choose_placement([worker("d1")], {}, 1, policy="random")
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        choose_placement([worker("d1")], {}, -1)


def test_inputs_are_not_mutated() -> None:
    workers = [worker("d1"), worker("d2")]
    loads = {"d1": load("d1", 5), "d2": load("d2", 6)}
    before = (list(workers), dict(loads))
    choose_placement(workers, loads, 10)
    assert (workers, loads) == before

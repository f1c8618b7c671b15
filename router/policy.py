"""Placement policies: which decode worker (and which prefill worker) serves a request.

Pure functions over plain data: no I/O, no clocks, no randomness. The Router gathers the
inputs (registered workers, their last known load, its own pending assignments, the prefix
index's matches) and calls `decide` (or `choose_placement`, the placement alone); tests call
them directly with hand-written inputs.

Policies by name (`POLICIES`, the CLI's `--router-policy`):
- "kv": the least predicted TTFT over (decode, prefill-or-local) pairs, from prefix hits per
  tier and load, priced by a CostModel (router/kv_policy.py, router/cost_model.py).
- "least-loaded": fewest outstanding tokens, ties by fewer running, then worker_id.
- "round-robin": the rr_counter-th worker of each pool in worker_id order.
Every policy's choice comes back from `decide` as a RouteDecision priced by the same cost model,
so route headers and metrics read the same whatever chose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from baton.router.registry import WorkerInfo

if TYPE_CHECKING:
    from baton.router.cost_model import CostModel
    from baton.router.kv_policy import RouteDecision
    from baton.router.prefix_index import PrefixMatch

POLICIES: tuple[str, ...] = ("kv", "least-loaded", "round-robin")
DEFAULT_POLICY = "kv"


def canonical_policy(name: str) -> str:
    """name, checked: ValueError on an unknown policy."""
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; choose from {POLICIES}")
    return name


class NoWorkerAvailable(Exception):
    """No healthy decode or mixed worker can take the request (the gateway answers 503)."""


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as it last reported it (polled over gRPC by the gateway)."""

    worker_id: str
    num_outstanding_tokens: int
    """Tokens the worker still has to process: unprefilled prompt tokens plus decode work."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of KV blocks in use, 0..1."""
    draining: bool = False
    """The worker is stopping and takes no new requests."""


@dataclass(frozen=True)
class Placement:
    """Where a request runs. prefill is None when the decode worker prefills it itself."""

    prefill: WorkerInfo | None
    decode: WorkerInfo


def _least_loaded(candidates: Sequence[WorkerInfo], loads: Mapping[str, WorkerLoad]) -> WorkerInfo:
    # A worker with no load report yet (just registered) counts as idle.
    def key(worker: WorkerInfo) -> tuple[int, int, str]:
        load = loads.get(worker.worker_id)
        if load is None:
            return (0, 0, worker.worker_id)
        return (load.num_outstanding_tokens, load.num_running, worker.worker_id)

    return min(candidates, key=key)


def _round_robin(candidates: Sequence[WorkerInfo], rr_counter: int) -> WorkerInfo:
    ordered = sorted(candidates, key=lambda w: w.worker_id)
    return ordered[rr_counter % len(ordered)]


def choose_placement(
    workers: Sequence[WorkerInfo],
    loads: Mapping[str, WorkerLoad],
    num_prompt_tokens: int,
    policy: str = "least-loaded",
    rr_counter: int = 0,
    *,
    local_prefill_max_tokens: int = 0,
) -> Placement:
    """Pick a decode worker (role decode or mixed) and a prefill worker (role prefill).

    policy: a name of POLICIES or an alias. prefill is None when no prefill worker exists, or
    when the prompt has at most local_prefill_max_tokens tokens (conditional disaggregation: a
    short prompt costs less to prefill on the decode worker than to hand off,
    docs/design.md §2). "kv" here has no prefix matches and prices with the default CostModel:
    use `decide` to give it both.
    Raises NoWorkerAvailable when there is no decode or mixed worker.
    """
    policy = canonical_policy(policy)
    if num_prompt_tokens < 0:
        raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
    if policy == "kv":
        # Deferred: kv_policy builds on this module's types (WorkerLoad, Placement, ...).
        from baton.router.cost_model import CostModel
        from baton.router.kv_policy import choose_kv_placement

        block_size = workers[0].block_size if workers else 1
        return choose_kv_placement(
            workers,
            loads,
            {},
            num_prompt_tokens,
            block_size,
            CostModel(),
            local_prefill_min_tokens=local_prefill_max_tokens + 1,
        ).placement
    decode_pool = [w for w in workers if w.role in ("decode", "mixed")]
    if not decode_pool:
        raise NoWorkerAvailable(f"no decode or mixed worker among {len(workers)} workers")
    prefill_pool = [w for w in workers if w.role == "prefill"]

    if policy == "round-robin":
        decode = _round_robin(decode_pool, rr_counter)
    else:
        decode = _least_loaded(decode_pool, loads)

    prefill: WorkerInfo | None = None
    if prefill_pool and num_prompt_tokens > local_prefill_max_tokens:
        if policy == "round-robin":
            prefill = _round_robin(prefill_pool, rr_counter)
        else:
            prefill = _least_loaded(prefill_pool, loads)
    return Placement(prefill=prefill, decode=decode)


def decide(
    policy: str,
    workers: Sequence[WorkerInfo],
    loads: Mapping[str, WorkerLoad],
    matches: Mapping[str, PrefixMatch],
    num_prompt_tokens: int,
    block_size: int,
    cost: CostModel,
    rr_counter: int = 0,
    local_prefill_min_tokens: int = 0,
) -> RouteDecision:
    """Place a request by the named policy and price the choice with `cost`.

    "kv" is choose_kv_placement (matches and cost choose the pair). The load-only policies
    choose as choose_placement does (a prompt shorter than local_prefill_min_tokens stays
    local) and ignore the matches for the choice, but the decision reports the chosen pair's
    hits and predicted TTFT from them, so every policy's header and metrics compare.
    Raises NoWorkerAvailable when there is no decode or mixed worker.
    """
    from baton.router.kv_policy import choose_kv_placement, price, to_decision  # see above

    policy = canonical_policy(policy)
    if policy == "kv":
        return choose_kv_placement(
            workers,
            loads,
            matches,
            num_prompt_tokens,
            block_size,
            cost,
            local_prefill_min_tokens=local_prefill_min_tokens,
        )
    placement = choose_placement(
        workers,
        loads,
        num_prompt_tokens,
        policy,
        rr_counter,
        local_prefill_max_tokens=local_prefill_min_tokens - 1,
    )
    chosen = price(
        placement.decode, placement.prefill, loads, matches, num_prompt_tokens, block_size, cost
    )
    return to_decision(policy, chosen, workers, num_prompt_tokens, block_size)

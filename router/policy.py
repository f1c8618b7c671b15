"""Placement policies: which decode worker (and which prefill worker) serves a request.

Pure functions over plain data: no I/O, no clocks, no randomness. The Router gathers the
inputs (registered workers, their last known load, its own pending assignments) and calls
`choose_placement`; tests call it directly with hand-written inputs.

The score is load alone: no prefix index feeds it yet (docs/design.md §3 builds one from KV
events). The inputs are plain data that the caller assembles, and the function takes the prompt
size, so that a score can weigh the prompt blocks a decode worker already holds against its load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from baton.router.registry import WorkerInfo

POLICIES = ("least_load", "round_robin")


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
    policy: str = "least_load",
    rr_counter: int = 0,
    *,
    local_prefill_max_tokens: int = 0,
) -> Placement:
    """Pick a decode worker (role decode or mixed) and a prefill worker (role prefill).

    policy "least_load": fewest outstanding tokens, ties by fewer running, then worker_id.
    policy "round_robin": the rr_counter-th worker of each pool in worker_id order.
    prefill is None when no prefill worker exists, or when the prompt has at most
    local_prefill_max_tokens tokens (conditional disaggregation: a short prompt costs less to
    prefill on the decode worker than to hand off, docs/design.md §2).
    Raises NoWorkerAvailable when there is no decode or mixed worker.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; choose from {POLICIES}")
    if num_prompt_tokens < 0:
        raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
    decode_pool = [w for w in workers if w.role in ("decode", "mixed")]
    if not decode_pool:
        raise NoWorkerAvailable(f"no decode or mixed worker among {len(workers)} workers")
    prefill_pool = [w for w in workers if w.role == "prefill"]

    if policy == "round_robin":
        decode = _round_robin(decode_pool, rr_counter)
    else:
        decode = _least_loaded(decode_pool, loads)

    prefill: WorkerInfo | None = None
    if prefill_pool and num_prompt_tokens > local_prefill_max_tokens:
        if policy == "round_robin":
            prefill = _round_robin(prefill_pool, rr_counter)
        else:
            prefill = _least_loaded(prefill_pool, loads)
    return Placement(prefill=prefill, decode=decode)

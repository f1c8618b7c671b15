"""The Router: registry + polled load + its own recent assignments → a Placement per request.

It runs inside the gateway. Two inputs change under it: the worker list (Redis, refreshed about
every second or on demand) and each worker's load (polled by a caller-provided fetcher, the
gateway's gRPC call, about every half second). Between two polls the reported load is stale, so
the router adds the prompt tokens it has assigned since (pending tokens) — otherwise a burst of
requests inside one poll interval would all land on the same "least loaded" worker.
The choice itself is `policy.decide`, a pure function: under "kv" the decode worker and the
prefill worker (or none) with the least predicted time to first token, from the prefix index's
matches of the prompt's block keys (router/prefix_index.py, fed by the workers' KV events) and
the loads, priced by an online cost model (router/cost_model.py) that learns from what the
gateway observes (observe()); every decision is a RouteDecision, logged and returned.

The registry is soft state (docs/design.md §4): a worker missing from it (Redis restarted and
came back empty, a heartbeat lost) stays placeable for `missing_grace_s` while its own load
polls answer; only its failing polls, a draining report or the grace running out drop it. An
empty registry is therefore never read as "no workers". With a cluster `token`, an entry whose
proof does not hold is ignored (router/registry.py).

A load poll that times out while the event loop itself was stalled (a wait that took far past
its timeout) says nothing about the worker and is not held against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from baton.kvstore.block_hash import BlockHashExtra, hash_blocks
from baton.router.breaker import CircuitBreaker
from baton.router.cost_model import OnlineCostModel
from baton.router.kv_policy import RouteDecision
from baton.router.policy import (
    DEFAULT_POLICY,
    NoWorkerAvailable,
    WorkerLoad,
    canonical_policy,
    decide,
)
from baton.router.prefix_index import BlockKey, PrefixIndex, PrefixMatch
from baton.router.registry import WorkerInfo, list_workers

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

_NO_MATCH = PrefixMatch(0, {})

LoadFetcher = Callable[[WorkerInfo], Awaitable[WorkerLoad]]


@dataclass(frozen=True)
class FirstTokenReport:
    """What a request's first message says about how its first token came about."""

    num_prompt_tokens: int
    num_cached_tokens: int
    prefilled_remotely: bool
    queue_s: float
    prefill_s: float
    transfer_s: float
    kv_bytes_received: int


"""Asks one worker for its load (the gateway's gRPC call); raising marks the worker unhealthy."""


class Router:
    """Places requests on healthy registered workers; see the module docstring.

    Lifecycle: `async with Router(...)` (or start()/stop()) runs the background refresh + poll
    loop. place()/release() bracket each request; mark_unhealthy() reports a worker that failed
    a call. All methods run on one event loop (no locks beyond the refresh one).
    """

    def __init__(
        self,
        redis: Redis,
        load_fetcher: LoadFetcher,
        *,
        model: str | None = None,
        policy: str = DEFAULT_POLICY,
        refresh_interval_s: float = 1.0,
        poll_interval_s: float = 0.5,
        fetch_timeout_s: float = 1.0,
        refresh_timeout_s: float = 2.0,
        local_prefill_min_tokens: int = 0,
        token: str = "",
        missing_grace_s: float = 15.0,
        breaker: CircuitBreaker | None = None,
        index: PrefixIndex | None = None,
        cost: OnlineCostModel | None = None,
    ) -> None:
        self.redis = redis
        self.load_fetcher = load_fetcher
        self.model = model
        self.policy = canonical_policy(policy)
        self.index = index
        """Which worker holds which block (None: no index, every match is empty)."""
        self.on_workers: Callable[[Sequence[WorkerInfo]], None] | None = None
        """Told the worker list after every refresh (the KV events reader follows it)."""
        self.cost = cost or OnlineCostModel()
        self.refresh_interval_s = refresh_interval_s
        self.poll_interval_s = poll_interval_s
        self.fetch_timeout_s = fetch_timeout_s
        self.refresh_timeout_s = refresh_timeout_s
        self.local_prefill_min_tokens = local_prefill_min_tokens
        self.token = token
        self.missing_grace_s = missing_grace_s
        self.breaker = breaker or CircuitBreaker()

        self._workers: list[WorkerInfo] = []
        self._missing_since: dict[str, float] = {}
        """worker id → when a refresh first did not find it in the registry (kept meanwhile)."""
        self._refreshed_at: float | None = None  # monotonic time of the last refresh attempt
        self._refresh_gen = 0
        self._refresh_lock = asyncio.Lock()
        self._reported: dict[str, WorkerLoad] = {}
        self._unhealthy: set[str] = set()
        self._slow: set[str] = set()
        """Workers whose last load probe timed out: placed only when no healthy one can."""
        # request_id -> worker ids it was placed on (prefill and decode), until release().
        self._assignments: dict[str, tuple[str, ...]] = {}
        # worker_id -> {request_id: (num_tokens, placed_at)} for assignments that no load report
        # from that worker can include yet (placed after the last successful fetch began).
        self._unreflected: dict[str, dict[str, tuple[int, float]]] = {}
        self._rr_counter = 0
        self._pending_keys: dict[str, dict[BlockKey, int]] = {}
        """worker → block keys of the prompts placed there and still running (with counts)."""
        self._pending_of: dict[str, tuple[str, list[BlockKey]]] = {}
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Refresh and poll once (so the first placement sees real loads), then loop."""
        if self._task is not None:
            raise RuntimeError("router already started")
        await self.refresh_workers()
        await self.poll_loads()
        self._task = asyncio.create_task(self._run(), name="router-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                if self._is_stale():
                    await self.refresh_workers()
                await self.poll_loads()
            except Exception:  # the loop must outlive any one bad round
                logger.exception("router poll round failed")

    # ---- state -----------------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerInfo]:
        """The cached registry (healthy or not)."""
        return list(self._workers)

    def healthy_workers(self) -> list[WorkerInfo]:
        return [w for w in self._workers if self.is_healthy(w.worker_id)]

    def is_healthy(self, worker_id: str) -> bool:
        """Its load probe answers in time and its circuit breaker is not open."""
        return worker_id not in self._slow and self._usable(worker_id)

    def _usable(self, worker_id: str) -> bool:
        """Not known to fail: a slow probe aside, it may take a request."""
        return worker_id not in self._unhealthy and not self.breaker.is_open(
            worker_id, time.monotonic()
        )

    def pending_tokens(self, worker_id: str) -> int:
        """Tokens assigned to the worker that its last load report cannot include yet."""
        return sum(n for n, _ in self._unreflected.get(worker_id, {}).values())

    def loads(self) -> dict[str, WorkerLoad]:
        """Each worker's last reported load plus what was assigned to it since."""
        effective: dict[str, WorkerLoad] = {}
        for worker in self._workers:
            wid = worker.worker_id
            pending = self._unreflected.get(wid, {})
            base = self._reported.get(wid) or WorkerLoad(wid, 0, 0, 0, 0.0)
            effective[wid] = replace(
                base,
                num_outstanding_tokens=base.num_outstanding_tokens + self.pending_tokens(wid),
                num_waiting=base.num_waiting + len(pending),
            )
        return effective

    def mark_unhealthy(self, worker_id: str) -> None:
        """A call to the worker failed: skip it until its load fetch answers again and its
        circuit breaker's backoff (doubling per failure since its last success) has passed."""
        backoff = self.breaker.failure(worker_id, time.monotonic())
        logger.warning(
            "worker %s marked unhealthy (failure %d: skipped for %.1f s, then until it answers)",
            worker_id,
            self.breaker.failures(worker_id),
            backoff,
        )
        self._unhealthy.add(worker_id)

    def report_success(self, worker_id: str) -> None:
        """A call to the worker went through (it streamed): its breaker closes."""
        self.breaker.success(worker_id)

    # ---- refresh and poll ------------------------------------------------------------------

    def _is_stale(self) -> bool:
        return (
            self._refreshed_at is None
            or time.monotonic() - self._refreshed_at >= self.refresh_interval_s
        )

    async def refresh_workers(self) -> list[WorkerInfo]:
        """Re-read the registry now; keeps the cached list if Redis does not answer."""
        gen = self._refresh_gen
        async with self._refresh_lock:
            # Callers that queued behind a refresh share its result instead of repeating it.
            if self._refresh_gen == gen:
                await self._refresh()
        return list(self._workers)

    async def _refresh(self) -> None:
        try:
            listed = await asyncio.wait_for(
                list_workers(self.redis, self.model, self.token), self.refresh_timeout_s
            )
        except (RedisError, OSError, TimeoutError) as e:
            logger.warning(
                "registry refresh failed, keeping %d cached workers: %s", len(self._workers), e
            )
        else:
            workers = self._merge(listed, time.monotonic())
            self._workers = workers
            if self.on_workers is not None:
                self.on_workers(workers)
            live = {w.worker_id for w in workers}
            for table in (self._reported, self._unreflected):
                for wid in [wid for wid in table if wid not in live]:
                    del table[wid]
            self._unhealthy &= live
            self._slow &= live
            self.breaker.retain(live)
        # A failed attempt counts too: a Redis outage must not turn every place() into a retry.
        self._refreshed_at = time.monotonic()
        self._refresh_gen += 1

    def _merge(self, listed: list[WorkerInfo], now: float) -> list[WorkerInfo]:
        """The registry's workers, plus the known ones it lacks that are healthy and within
        their grace (soft state: see the module docstring)."""
        found = {w.worker_id for w in listed}
        for wid in [wid for wid in self._missing_since if wid in found]:
            del self._missing_since[wid]
        kept = []
        for worker in self._workers:
            wid = worker.worker_id
            if wid in found:
                continue
            since = self._missing_since.setdefault(wid, now)
            if wid not in self._unhealthy and now - since < self.missing_grace_s:
                kept.append(worker)
            else:
                del self._missing_since[wid]
                logger.info("worker %s left the registry; dropped", wid)
        return sorted([*listed, *kept], key=lambda w: w.worker_id)

    async def poll_loads(self) -> None:
        """Fetch every registered worker's load once, concurrently. A probe that timed out
        makes its worker slow (placed only when no other can take a request); when every
        probe of a round timed out, the fault is this side's (its loop or host is starved):
        no verdict on any worker."""
        workers = list(self._workers)
        timed_out = await asyncio.gather(*(self._poll_one(w) for w in workers))
        late = [w for w, t in zip(workers, timed_out, strict=True) if t]
        if late and len(late) == len(workers) and len(workers) > 1:
            logger.warning("every load probe timed out: the gateway is starved; no verdict")
            return
        for worker in late:
            if worker.worker_id not in self._slow:
                logger.warning("load probe of %s (%s) timed out", worker.worker_id, worker.address)
            self._slow.add(worker.worker_id)

    async def _poll_one(self, worker: WorkerInfo) -> bool:
        """One probe; True when it timed out (poll_loads decides what that means)."""
        wid = worker.worker_id
        fetch_started = time.monotonic()
        try:
            load = await asyncio.wait_for(self.load_fetcher(worker), self.fetch_timeout_s)
        except TimeoutError:
            # A wait that took far past its timeout: the loop stalled, not (necessarily) the
            # worker: no verdict.
            return time.monotonic() - fetch_started <= 2 * self.fetch_timeout_s
        except Exception as e:
            self._fetch_failed(worker, repr(e))
            return False
        self._slow.discard(wid)
        if load.draining:
            if wid not in self._unhealthy:
                logger.info("worker %s is draining; placing nothing more there", wid)
            self._unhealthy.add(wid)
            return False
        if wid in self._unhealthy:
            logger.info("worker %s answers again", wid)
            self._unhealthy.discard(wid)
        self._reported[wid] = load
        # Assignments placed before this fetch began were dispatched by then (the gateway sends
        # right after place()), so the report counts them: drop them from pending.
        pending = self._unreflected.get(wid)
        if pending:
            for rid in [rid for rid, (_, t) in pending.items() if t < fetch_started]:
                del pending[rid]
        return False

    def _fetch_failed(self, worker: WorkerInfo, why: str) -> None:
        if worker.worker_id not in self._unhealthy:
            logger.warning(
                "load fetch from %s (%s) failed: %s", worker.worker_id, worker.address, why
            )
        self._unhealthy.add(worker.worker_id)

    # ---- placement -------------------------------------------------------------------------

    async def place(
        self, prompt: int | Sequence[int], request_id: str, cache_salt: str = ""
    ) -> RouteDecision:
        """Choose workers for a request and count its tokens on them until release(request_id).

        prompt: the prompt's token ids (matched against the prefix index under cache_salt, the
        tenant's salt), or only its length (nothing matched). Raises NoWorkerAvailable when no
        healthy decode/mixed worker is registered (after one on-demand refresh: a worker may
        have registered since the cache was filled). Never waits on Redis longer than
        refresh_timeout_s.
        """
        if request_id in self._assignments:
            raise ValueError(f"request {request_id!r} is already placed")
        num_prompt_tokens = prompt if isinstance(prompt, int) else len(prompt)
        tokens: Sequence[int] = () if isinstance(prompt, int) else prompt
        hashed: dict[tuple[str, int], list[BlockKey]] = {}

        def keys_of(model: str, block_size: int) -> list[BlockKey]:
            """The prompt's block keys as `model`'s engines key them (kvstore/block_hash.py:
            the model id and the tenant's salt), hashed once per request."""
            if (model, block_size) not in hashed:
                extra = BlockHashExtra(model, cache_salt).encode()
                hashed[model, block_size] = hash_blocks(tokens, block_size, extra)
            return hashed[model, block_size]

        # The background loop keeps the cache fresh: Redis is off the request path unless the
        # cache has no worker for this request, and then it is asked once, under a deadline.
        try:
            decision = self._choose(keys_of, num_prompt_tokens)
        except NoWorkerAvailable:
            await self.refresh_workers()
            try:
                decision = self._choose(keys_of, num_prompt_tokens)
            except NoWorkerAvailable:
                # Better a slow worker than a 503: one whose probe timed out may still serve.
                slow = [w for w in self._workers if w.worker_id in self._slow]
                usable = [w for w in slow if self._usable(w.worker_id)]
                decision = self._choose(keys_of, num_prompt_tokens, usable)
        self._rr_counter += 1
        logger.debug("%s %s", request_id, decision.log_line())
        placement = decision.placement
        chosen = (
            [placement.decode]
            if placement.prefill is None
            else [placement.prefill, placement.decode]
        )
        now = time.monotonic()
        ids = tuple(dict.fromkeys(w.worker_id for w in chosen))
        self._assignments[request_id] = ids
        for wid in ids:
            self._unreflected.setdefault(wid, {})[request_id] = (num_prompt_tokens, now)
        if tokens:
            decode = placement.decode
            self._hold_pending(
                request_id, decode.worker_id, keys_of(decode.model, decode.block_size)
            )
        return decision

    def _choose(
        self,
        keys_of: Callable[[str, int], list[BlockKey]],
        num_prompt_tokens: int,
        workers: list[WorkerInfo] | None = None,
    ) -> RouteDecision:
        workers = self.healthy_workers() if workers is None else workers
        block_size = next((w.block_size for w in workers if w.role != "prefill"), 16)
        return decide(
            self.policy,
            workers,
            self.loads(),
            self._matches(lambda model: keys_of(model, block_size), workers, block_size),
            num_prompt_tokens,
            block_size,
            self.cost.snapshot(),
            self._rr_counter,
            self.local_prefill_min_tokens,
        )

    def _matches(
        self,
        keys_of: Callable[[str], list[BlockKey]],
        workers: list[WorkerInfo],
        block_size: int,
    ) -> dict[str, PrefixMatch]:
        """Each worker's leading blocks of the prompt: those the index has from its events,
        then those of prompts placed there and still running (their KV is being computed
        there now, not yet reported: a burst of one prefix must not spread over workers)."""
        if self.index is None or not workers:
            return {}
        by_model: dict[str, list[str]] = {}
        for w in workers:
            if w.block_size == block_size:
                by_model.setdefault(w.model, []).append(w.worker_id)
        matches: dict[str, PrefixMatch] = {}
        for model, ids in by_model.items():
            keys = keys_of(model)
            if not keys:
                continue
            indexed = self.index.match(keys, ids)
            for wid in ids:
                matches[wid] = self._with_pending(wid, keys, indexed.get(wid, _NO_MATCH))
        return matches

    def _with_pending(self, wid: str, keys: list[BlockKey], match: PrefixMatch) -> PrefixMatch:
        pending = self._pending_keys.get(wid)
        if not pending:
            return match
        depth = match.num_blocks
        while depth < len(keys) and keys[depth] in pending:
            depth += 1
        if depth == match.num_blocks:
            return match
        by_tier = dict(match.blocks_by_tier)
        by_tier["device"] = by_tier.get("device", 0) + depth - match.num_blocks
        return PrefixMatch(depth, by_tier)

    def _hold_pending(self, request_id: str, wid: str, keys: list[BlockKey]) -> None:
        table = self._pending_keys.setdefault(wid, {})
        for key in keys:
            table[key] = table.get(key, 0) + 1
        self._pending_of[request_id] = (wid, keys)

    def _drop_pending(self, request_id: str) -> None:
        wid, keys = self._pending_of.pop(request_id, ("", []))
        table = self._pending_keys.get(wid)
        if table is None:
            return
        for key in keys:
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    def observe(self, decision: RouteDecision, first: FirstTokenReport) -> None:
        """What the request's first message reported: the cost model learns from it."""
        decode = decision.placement.decode.worker_id
        prefill = decision.placement.prefill
        computed = max(first.num_prompt_tokens - first.num_cached_tokens, 0)
        if first.prefilled_remotely and prefill is not None:
            self.cost.observe_prefill(prefill.worker_id, computed, first.prefill_s)
            transport = decision.placement.decode.transport
            self.cost.observe_transfer(
                f"handoff:{transport}", first.kv_bytes_received, first.transfer_s
            )
        elif not first.prefilled_remotely:
            self.cost.observe_prefill(decode, computed, first.prefill_s)
        ahead = self.loads().get(decode)
        if ahead is not None:
            self.cost.observe_queue(decode, ahead.num_outstanding_tokens, first.queue_s)

    def release(self, request_id: str) -> None:
        """The request finished or was aborted; releasing twice (or an unknown id) is a no-op."""
        self._drop_pending(request_id)
        for wid in self._assignments.pop(request_id, ()):
            pending = self._unreflected.get(wid)
            if pending is not None:
                pending.pop(request_id, None)

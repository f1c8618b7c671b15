"""The KV-aware placement: the (decode, prefill-or-local) pair with the least predicted TTFT.

Pure: plain inputs (workers, their loads, the prefix index's matches, a CostModel), no I/O.
The decode worker owns the request (docs/design.md §2): it uses the prompt blocks it holds and
either prefills the rest itself (local) or has a prefill worker write them (remote). Prices,
in seconds, with h_w = worker w's usable hit in tokens and m_w = prompt tokens - h_w:

    local(d)     = queue(d) + tier(d) + m_d / prefill_rate(d)
    remote(d, p) = rpc + admit(d) + max(tier(d), queue(p) + tier(p) + m_p / prefill_rate(p))
                   + m_d * kv_bytes_per_token(d) / handoff_rate(d.transport)

    queue(w) = outstanding_tokens(w) / drain_rate(w) + waiting(w) * wait_per_request
    tier(w)  = sum over tiers t of blocks_on_t * block_size * kv_bytes_per_token(w) / rate(t)
    admit(d) = waiting(d) * wait_per_request

d loads its own lower-tier blocks while p computes (hence the max); p computes from its own hit
whatever d holds (it needs the earlier KV to attend to) and sends only what d misses. A hit is
usable up to the prompt's last token minus one, floored to a block (the engine always computes
the last token: kv_cache_manager caps the match at (num_tokens - 1) // block_size).

Only the p side of remote(d, p) depends on p, and max() keeps its order, so the best p is the
same for every d: pricing is O(#decode + #prefill), not their product.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from baton.router.cost_model import CostModel
from baton.router.policy import NoWorkerAvailable, Placement, WorkerLoad
from baton.router.prefix_index import TIERS, PrefixMatch
from baton.router.registry import WorkerInfo

_NO_MATCH = PrefixMatch(0)
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]")
_LOG_CANDIDATES = 4
"""Candidates a log line lists (best first)."""


RECOMPUTE_WEIGHT = 1.0
"""Weight of recompute time beyond its share of TTFT (CandidateCost.score_s)."""


@dataclass(frozen=True)
class CandidateCost:
    """One priced option: where it runs and what its predicted TTFT is made of (seconds)."""

    decode_id: str
    prefill_id: str | None
    """None: the decode worker prefills itself."""
    ttft_s: float
    queue_s: float
    """Wait before the prefill starts (on the decode worker if local, else the prefill one)."""
    tier_s: float
    """Copying lower-tier hit blocks up to the device (the prefilling worker's)."""
    prefill_s: float
    handoff_s: float
    overhead_s: float
    """Remote only: the RPC round trip plus the decode worker's admission wait."""
    decode_matched_blocks: int
    prefill_matched_blocks: int
    load_tokens: int
    """Outstanding tokens on the workers involved (a tie-break)."""

    @property
    def local(self) -> bool:
        return self.prefill_id is None

    @property
    def score_s(self) -> float:
        """What the choice minimises: the predicted TTFT plus the compute the option spends
        on prompt tokens it recomputes (RECOMPUTE_WEIGHT times its prefill time). A token
        recomputed costs this request its time, and every request queued behind it the same
        again: of two options with equal TTFT, the one that reuses cached KV wins (a burst of
        one prefix stays on the worker computing it, rather than computing it twice)."""
        return self.ttft_s + RECOMPUTE_WEIGHT * self.prefill_s

    def sort_key(self) -> tuple[float, int, bool, int, int, str, str]:
        """Least score; ties: deeper decode hit, local before remote, deeper prefill hit,
        less load, worker ids. Rounded to the nanosecond so float noise is a tie."""
        return (
            round(self.score_s, 9),
            -self.decode_matched_blocks,
            not self.local,
            -self.prefill_matched_blocks,
            self.load_tokens,
            self.decode_id,
            self.prefill_id or "",
        )

    def short(self) -> str:
        """e.g. `d1<-p0 41.3ms (q=1.0 t=0.0 c=38.2 h=0.1 o=2.0)`, times in ms."""
        where = f"{self.decode_id}<-{self.prefill_id or 'local'}"
        parts = (self.queue_s, self.tier_s, self.prefill_s, self.handoff_s, self.overhead_s)
        q, t, c, h, o = (f"{x * 1e3:.1f}" for x in parts)
        return f"{where} {self.ttft_s * 1e3:.1f}ms (q={q} t={t} c={c} h={h} o={o})"


@dataclass(frozen=True)
class RouteDecision:
    """A placement with the prediction behind it: what headers, logs and metrics report."""

    placement: Placement
    policy: str
    predicted_ttft_s: float
    decode_matched_blocks: int
    prefill_matched_blocks: int
    """The prefill worker's own hit (0 when local)."""
    num_prompt_blocks: int
    """Full blocks of the prompt (the most any worker can match)."""
    candidates: tuple[CandidateCost, ...] = ()
    """Priced options, best (the chosen one) first."""

    @property
    def local_prefill(self) -> bool:
        return self.placement.prefill is None

    def header(self) -> str:
        """Value of the `x-baton-route` response header: ASCII, `;`-separated `key=value`, e.g.
        `decode=decode-1;prefill=prefill-0;matched=12/16;ttft_ms=41.3;policy=kv`
        (`prefill=-` when the decode worker prefills itself)."""
        prefill = self.placement.prefill
        return ";".join(
            (
                f"decode={_header_safe(self.placement.decode.worker_id)}",
                f"prefill={'-' if prefill is None else _header_safe(prefill.worker_id)}",
                f"matched={self.decode_matched_blocks}/{self.num_prompt_blocks}",
                f"ttft_ms={self.predicted_ttft_s * 1e3:.1f}",
                f"policy={_header_safe(self.policy)}",
            )
        )

    def log_line(self) -> str:
        """One line for the router's log: the header plus the best few priced options."""
        options = " | ".join(c.short() for c in self.candidates[:_LOG_CANDIDATES])
        more = len(self.candidates) - _LOG_CANDIDATES
        tail = f" | +{more} more" if more > 0 else ""
        return (
            f"route {self.header()} prefill_matched={self.prefill_matched_blocks} "
            f"options: {options}{tail}"
        )


def _header_safe(text: str) -> str:
    # Worker ids are free text: keep a header value one token (no spaces, ';', '=', non-ASCII).
    return _UNSAFE.sub("_", text) or "_"


# ---- pricing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    """What one worker would spend to get the prompt's KV onto its device (seconds)."""

    queue_s: float
    tier_s: float
    prefill_s: float
    matched_blocks: int
    num_missing_tokens: int
    num_outstanding_tokens: int
    num_waiting: int

    @property
    def ready_s(self) -> float:
        return self.queue_s + self.tier_s + self.prefill_s


def _usable_blocks(match: PrefixMatch, num_prompt_tokens: int, block_size: int) -> int:
    if num_prompt_tokens <= 0:
        return 0
    return max(0, min(match.num_blocks, (num_prompt_tokens - 1) // block_size))


def _side(
    worker: WorkerInfo,
    load: WorkerLoad | None,
    match: PrefixMatch,
    num_prompt_tokens: int,
    block_size: int,
    cost: CostModel,
) -> _Side:
    wid = worker.worker_id
    outstanding = load.num_outstanding_tokens if load is not None else 0
    waiting = load.num_waiting if load is not None else 0
    usable = _usable_blocks(match, num_prompt_tokens, block_size)
    block_bytes = block_size * cost.kv_bytes_per_token(worker)
    # The usable hit counted tier by tier, fastest first (which blocks fall off the end does
    # not matter: at most one, the prompt's last).
    tier_s, left = 0.0, usable
    for tier in TIERS:
        n = min(match.on(tier), left)
        left -= n
        tier_s += cost.tier_s(tier, n * block_bytes)
    missing = num_prompt_tokens - usable * block_size
    return _Side(
        queue_s=cost.queue_s(wid, outstanding, waiting),
        tier_s=tier_s,
        prefill_s=cost.prefill_s(wid, missing),
        matched_blocks=usable,
        num_missing_tokens=missing,
        num_outstanding_tokens=outstanding,
        num_waiting=waiting,
    )


def _local(decode: WorkerInfo, d: _Side) -> CandidateCost:
    return CandidateCost(
        decode_id=decode.worker_id,
        prefill_id=None,
        ttft_s=d.ready_s,
        queue_s=d.queue_s,
        tier_s=d.tier_s,
        prefill_s=d.prefill_s,
        handoff_s=0.0,
        overhead_s=0.0,
        decode_matched_blocks=d.matched_blocks,
        prefill_matched_blocks=0,
        load_tokens=d.num_outstanding_tokens,
    )


def _remote(
    decode: WorkerInfo, d: _Side, prefill: WorkerInfo, p: _Side, cost: CostModel
) -> CandidateCost:
    handoff_s = cost.handoff_s(
        decode.transport, d.num_missing_tokens * cost.kv_bytes_per_token(decode)
    )
    overhead_s = cost.rpc_overhead_s + d.num_waiting * cost.wait_s_per_waiting_request
    return CandidateCost(
        decode_id=decode.worker_id,
        prefill_id=prefill.worker_id,
        ttft_s=overhead_s + max(d.tier_s, p.ready_s) + handoff_s,
        queue_s=p.queue_s,
        tier_s=p.tier_s,
        prefill_s=p.prefill_s,
        handoff_s=handoff_s,
        overhead_s=overhead_s,
        decode_matched_blocks=d.matched_blocks,
        prefill_matched_blocks=p.matched_blocks,
        load_tokens=d.num_outstanding_tokens + p.num_outstanding_tokens,
    )


def price(
    decode: WorkerInfo,
    prefill: WorkerInfo | None,
    loads: Mapping[str, WorkerLoad],
    matches: Mapping[str, PrefixMatch],
    num_prompt_tokens: int,
    block_size: int,
    cost: CostModel,
) -> CandidateCost:
    """The predicted TTFT of one given pair (prefill None: local), by the formulas above."""
    args = (num_prompt_tokens, block_size, cost)
    d = _side(decode, loads.get(decode.worker_id), _match(matches, decode), *args)
    if prefill is None:
        return _local(decode, d)
    p = _side(prefill, loads.get(prefill.worker_id), _match(matches, prefill), *args)
    return _remote(decode, d, prefill, p, cost)


def _match(matches: Mapping[str, PrefixMatch], worker: WorkerInfo) -> PrefixMatch:
    return matches.get(worker.worker_id, _NO_MATCH)


def _check_args(num_prompt_tokens: int, block_size: int) -> None:
    if num_prompt_tokens < 0:
        raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


# ---- the policy ---------------------------------------------------------------------------


def choose_kv_placement(
    workers: Sequence[WorkerInfo],
    loads: Mapping[str, WorkerLoad],
    matches: Mapping[str, PrefixMatch],
    num_prompt_tokens: int,
    block_size: int,
    cost: CostModel,
    *,
    local_prefill_min_tokens: int = 0,
) -> RouteDecision:
    """The pair with the least predicted TTFT (see the module docstring).

    workers: the placeable ones (a worker whose load says draining is skipped). loads: a worker
    without one counts as idle. matches: PrefixIndex.match of the prompt's block keys (hashed
    with `block_size` tokens per block); a worker absent holds nothing. Conditional
    disaggregation (docs/design.md §2): a remote prefill is priced only for a decode worker
    missing at least local_prefill_min_tokens of the prompt, and chosen only if it beats every
    local option. Raises NoWorkerAvailable when no decode or mixed worker is placeable.
    """
    _check_args(num_prompt_tokens, block_size)
    live = [w for w in workers if not _draining(loads.get(w.worker_id))]
    decode_pool = [w for w in live if w.role in ("decode", "mixed")]
    if not decode_pool:
        raise NoWorkerAvailable(f"no placeable decode or mixed worker among {len(workers)}")
    args = (num_prompt_tokens, block_size, cost)

    best_prefill: tuple[WorkerInfo, _Side] | None = None
    best_key: tuple[float, int, int, str] | None = None
    for w in live:
        if w.role != "prefill":
            continue
        p = _side(w, loads.get(w.worker_id), _match(matches, w), *args)
        key = (round(p.ready_s, 9), -p.matched_blocks, p.num_outstanding_tokens, w.worker_id)
        if best_key is None or key < best_key:
            best_prefill, best_key = (w, p), key

    candidates: list[CandidateCost] = []
    for w in decode_pool:
        d = _side(w, loads.get(w.worker_id), _match(matches, w), *args)
        candidates.append(_local(w, d))
        if best_prefill is not None and d.num_missing_tokens >= local_prefill_min_tokens:
            candidates.append(_remote(w, d, *best_prefill, cost))
    candidates.sort(key=CandidateCost.sort_key)
    return to_decision("kv", candidates[0], live, num_prompt_tokens, block_size, tuple(candidates))


def to_decision(
    policy: str,
    chosen: CandidateCost,
    workers: Sequence[WorkerInfo],
    num_prompt_tokens: int,
    block_size: int,
    candidates: tuple[CandidateCost, ...] = (),
) -> RouteDecision:
    """A RouteDecision for a priced pair (its workers looked up by id in `workers`)."""
    by_id = {w.worker_id: w for w in workers}
    prefill = None if chosen.prefill_id is None else by_id[chosen.prefill_id]
    return RouteDecision(
        placement=Placement(prefill=prefill, decode=by_id[chosen.decode_id]),
        policy=policy,
        predicted_ttft_s=chosen.ttft_s,
        decode_matched_blocks=chosen.decode_matched_blocks,
        prefill_matched_blocks=chosen.prefill_matched_blocks,
        num_prompt_blocks=num_prompt_tokens // block_size,
        candidates=candidates or (chosen,),
    )


def _draining(load: WorkerLoad | None) -> bool:
    return load is not None and load.draining

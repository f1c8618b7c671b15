"""The router's exact prefix index: block key -> {worker: tier}, built from workers' KV events.

docs/design.md §3: the index is fed by each worker's event stream (router/kv_events_reader.py)
and rebuilt from a worker's snapshot whenever its stream cannot be trusted (a gap, a new epoch,
a trimmed stream, a Redis restart). It is soft state (§4): a wrong or missing entry costs a
recompute or a worse placement, never a wrong answer, since workers re-check every block.

Keys are the chained block keys of kvstore/block_hash.py, so a prompt's leading blocks held by
a worker are exactly a run of its keys from the first on: `match` walks a request's keys once
and stops at the first key no candidate holds. Tiers are names ("device", "host", "disk",
fastest first); a block held on several tiers of one worker counts on its fastest.

Pure Python, one event loop: no locks, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

BlockKey = bytes
TIERS: tuple[str, ...] = ("device", "host", "disk")
"""Tier names, fastest first (the engine's StorageTier values)."""
_RANK = {name: i for i, name in enumerate(TIERS)}


@dataclass(frozen=True)
class PrefixMatch:
    """How much of a request's prompt one worker holds."""

    num_blocks: int
    """Leading blocks of the prompt the worker holds on some tier."""
    blocks_by_tier: Mapping[str, int] = field(default_factory=dict)
    """Of those, how many on each tier (each block counted on its fastest)."""

    def on(self, tier: str) -> int:
        return self.blocks_by_tier.get(tier, 0)


class PrefixIndex:
    """block key -> {worker id: fastest tier}; per worker, its keys on each tier."""

    def __init__(self) -> None:
        self._holders: dict[BlockKey, dict[str, str]] = {}
        self._keys: dict[str, dict[str, set[BlockKey]]] = {}
        """worker -> tier -> keys (a key may sit on several tiers of one worker)."""

    # ---- updates (from events and snapshots) ------------------------------------------------

    def store(self, worker_id: str, tier: str, keys: Iterable[BlockKey]) -> None:
        _check_tier(tier)
        mine = self._keys.setdefault(worker_id, {}).setdefault(tier, set())
        for key in keys:
            mine.add(key)
            holders = self._holders.setdefault(key, {})
            held = holders.get(worker_id)
            if held is None or _RANK[tier] < _RANK[held]:
                holders[worker_id] = tier

    def remove(self, worker_id: str, tier: str, keys: Iterable[BlockKey]) -> None:
        _check_tier(tier)
        tiers = self._keys.get(worker_id)
        if tiers is None or tier not in tiers:
            return
        mine = tiers[tier]
        for key in keys:
            if key in mine:
                mine.discard(key)
                self._forget(worker_id, key, tiers)

    def clear(self, worker_id: str, tier: str | None = None) -> None:
        """Drop the worker's keys on one tier (None: every tier, e.g. the worker left)."""
        tiers = self._keys.get(worker_id)
        if tiers is None:
            return
        for name in [tier] if tier is not None else list(tiers):
            for key in tiers.pop(name, set()):
                self._forget(worker_id, key, tiers)
        if not tiers:
            del self._keys[worker_id]

    def replace(self, worker_id: str, keys_by_tier: Mapping[str, Iterable[BlockKey]]) -> None:
        """The worker's whole content, from a snapshot: everything else of it is dropped."""
        self.clear(worker_id)
        for tier, keys in keys_by_tier.items():
            self.store(worker_id, tier, keys)

    def _forget(self, worker_id: str, key: BlockKey, tiers: Mapping[str, set[BlockKey]]) -> None:
        """key left one of the worker's tiers: it is held on its next fastest, or not at all."""
        holders = self._holders.get(key)
        if holders is None:
            return
        remaining = [t for t in TIERS if key in tiers.get(t, ())]
        if remaining:
            holders[worker_id] = remaining[0]
            return
        holders.pop(worker_id, None)
        if not holders:
            del self._holders[key]

    # ---- queries ---------------------------------------------------------------------------

    def match(
        self, keys: Sequence[BlockKey], workers: Iterable[str] | None = None
    ) -> dict[str, PrefixMatch]:
        """Per worker (every indexed one, or those given), the leading blocks of `keys` it
        holds. Cost: one dict lookup per key until no candidate holds the next one."""
        candidates = set(self._keys) if workers is None else set(workers) & set(self._keys)
        counts: dict[str, dict[str, int]] = {w: {} for w in candidates}
        depth = dict.fromkeys(candidates, 0)
        for i, key in enumerate(keys):
            if not candidates:
                break
            holders = self._holders.get(key)
            if holders is None:
                break
            for worker in list(candidates):
                tier = holders.get(worker)
                if tier is None:
                    candidates.discard(worker)
                    continue
                depth[worker] = i + 1
                by_tier = counts[worker]
                by_tier[tier] = by_tier.get(tier, 0) + 1
        return {w: PrefixMatch(depth[w], counts[w]) for w in depth}

    def keys_of(self, worker_id: str) -> dict[str, set[BlockKey]]:
        """The worker's keys per tier (a copy): what a test compares with its snapshot."""
        return {t: set(k) for t, k in self._keys.get(worker_id, {}).items() if k}

    @property
    def workers(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        """Distinct keys indexed."""
        return len(self._holders)


def _check_tier(tier: str) -> None:
    if tier not in _RANK:
        raise ValueError(f"unknown tier {tier!r}; tiers are {TIERS}")

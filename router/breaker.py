"""A circuit breaker per worker: one that keeps failing requests is left alone for longer.

A failed call (unreachable, a missed stream deadline) opens the worker's breaker for a backoff
that doubles with each failure since its last success (base_s, 2 base_s, ... up to max_s; calls
that fail while it is open are the same outage and do not count again); while
open, the router places nothing there even if its load probe answers (a worker can answer probes
and still fail every request). When the backoff has passed the breaker is half open: requests may
go there again, and the first one that streams closes it (resets the count), while another
failure opens it for twice as long.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0


class CircuitBreaker:
    def __init__(self, base_s: float = 1.0, max_s: float = 30.0) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError("need 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self._states: dict[str, _State] = {}

    def failure(self, worker_id: str, now: float) -> float:
        """Record a failed call; returns how long the breaker stays open (s)."""
        state = self._states.setdefault(worker_id, _State())
        if now < state.open_until:
            return state.open_until - now  # the same outage, seen by another call
        state.failures += 1
        backoff: float = min(self.base_s * 2.0 ** (state.failures - 1), self.max_s)
        state.open_until = now + backoff
        return backoff

    def success(self, worker_id: str) -> None:
        """A call went through: the breaker closes and forgets past failures."""
        self._states.pop(worker_id, None)

    def is_open(self, worker_id: str, now: float) -> bool:
        state = self._states.get(worker_id)
        return state is not None and now < state.open_until

    def failures(self, worker_id: str) -> int:
        state = self._states.get(worker_id)
        return state.failures if state is not None else 0

    def retain(self, worker_ids: set[str]) -> None:
        """Forget the workers that left the cluster."""
        for wid in [wid for wid in self._states if wid not in worker_ids]:
            del self._states[wid]

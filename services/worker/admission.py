"""Which requests a worker admits: a bounded queue, shared fairly among its callers.

A request of n sequences is refused (RESOURCE_EXHAUSTED, an HTTP 429 at the gateway) when its n
would make more than `max_queued` sequences wait. Once the queue is more than half full, a
caller that already holds more than its fair share of the worker's sequences (1 / the number of
callers with sequences here) is refused too: one gateway replica (or one runaway client behind
it) cannot take the whole queue from the others, while a lone caller keeps all of it.
"""

from __future__ import annotations


class Admission:
    def __init__(self, max_queued: int) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        self.max_queued = max_queued
        self._held: dict[str, int] = {}
        """caller → its sequences admitted and not yet finished."""

    @property
    def total(self) -> int:
        """Sequences admitted and not yet finished, over all callers."""
        return sum(self._held.values())

    def held(self, caller: str) -> int:
        return self._held.get(caller, 0)

    def refusal(self, caller: str, n: int, num_waiting: int) -> str | None:
        """Why a request of n sequences from caller is refused now (None: it is admitted)."""
        if num_waiting + n > self.max_queued:
            return (
                f"{num_waiting} sequences are queued on this worker; {n} more would pass its "
                f"limit of {self.max_queued}"
            )
        if 2 * (num_waiting + n) <= self.max_queued:
            return None
        callers = set(self._held) | {caller}
        total = self.total + n
        if len(callers) > 1 and self.held(caller) + n > total / len(callers):
            return (
                f"the queue is over half full and caller {caller!r} holds more than its share "
                f"({self.held(caller)} of {total - n} sequences among {len(callers)} callers)"
            )
        return None

    def add(self, caller: str, n: int) -> None:
        self._held[caller] = self.held(caller) + n

    def remove(self, caller: str, n: int) -> None:
        left = self.held(caller) - n
        if left > 0:
            self._held[caller] = left
        else:
            self._held.pop(caller, None)

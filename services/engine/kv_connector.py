"""The KV connector: the one seam through which KV enters or leaves an engine's paged cache.

One class, two roles (the shape of a KV connector with a scheduler side and a worker side; see
docs/design.md §2 "Decode owns the destination"):

- The **scheduler side** decides, on the engine thread, inside `Scheduler`:
  `num_matched_tokens` (how many of a waiting request's tokens beyond its local prefix hit will
  arrive from outside), `after_allocation` (the blocks those tokens go into now exist),
  `request_finished` (hold the finished request's blocks because they are still being sent, or
  free them now), and `build_metadata` (what the worker side must do this step; it travels in
  `SchedulerOutput.kv_connector_metadata`).
- The **worker side** moves bytes, called by the executor around each step: `start_load_kv`
  before the forward, `wait_for_save` after it, and `get_finished`: which requests' loads and
  saves have ended since the last call. (Per-layer hooks, a load awaited and a save started
  layer by layer inside the forward, join the contract with the first connector that overlaps
  transfers with compute; the remote prefill moves whole prompts.)

The scheduler keeps only what any connector needs: requests waiting for an asynchronous load
(whose blocks must outlive an abort until the load ends) and finished requests whose blocks
are held for a save. Everything about where KV comes from or goes to is the connector's.

Threads: both sides run on the engine thread (the executor calls the worker side of rank 0 in
process); completions that arrive on other threads are queued by the connector and handed over
by `get_finished`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from baton.services.engine.step_io import TokenLogprobs

if TYPE_CHECKING:
    import torch

    from baton.services.engine.executor import RankKVLayout
    from baton.services.engine.request import Request


@dataclass(frozen=True)
class FinishedLoad:
    """An asynchronous load that ended, successfully or not."""

    request_id: str
    ok: bool
    """False: the blocks hold unspecified data; the request is prefilled here instead."""
    first_token_id: int | None = None
    """Set when the remote side also sampled the request's first token (a remote prefill)."""
    first_logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class KVConnectorOutput:
    """What the worker side reports after a step: the transfers that ended since the last one."""

    finished_loads: tuple[FinishedLoad, ...] = ()
    finished_saves: tuple[str, ...] = ()
    """Requests whose held blocks have been sent (or failed to be): free them now."""


@dataclass(frozen=True)
class KVConnectorMetadata:
    """One step's instructions from the scheduler side to the worker side. Connectors subclass
    it with their own frozen fields; the scheduler and executor only carry it."""


class KVConnector(ABC):
    """A connector's both roles; see the module docstring for the contract and the threads."""

    # ---- scheduler side --------------------------------------------------------------------

    @abstractmethod
    def num_matched_tokens(self, request: Request, num_local_hit_tokens: int) -> int:
        """Tokens of `request` beyond its `num_local_hit_tokens` (a whole number of blocks)
        that this connector will supply (0: none, compute them here). Loads are asynchronous:
        the request waits, holding its blocks, until a finished load names it; a load that
        brings no first token supplies at most all but the last prompt token. Called on every
        admission attempt; must not change state (the scheduler may not be able to allocate,
        and asks again next step)."""

    @abstractmethod
    def after_allocation(
        self, request: Request, block_ids: Sequence[int], num_local_hit_tokens: int, num: int
    ) -> None:
        """The request's blocks exist: `block_ids` covers the prompt; tokens
        [num_local_hit_tokens, num_local_hit_tokens + num) are to be supplied by this connector."""

    @abstractmethod
    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        """A request ended (any reason). True: hold its blocks until `finished_saves` names it
        (the connector is sending them); False: free them now."""

    @abstractmethod
    def build_metadata(self) -> KVConnectorMetadata | None:
        """This step's instructions for the worker side (None: nothing to do); resets the
        scheduler side's per-step state."""

    # ---- worker side -----------------------------------------------------------------------

    @abstractmethod
    def register_kv_caches(
        self, layouts: Sequence[RankKVLayout], kv_caches: Sequence[torch.Tensor]
    ) -> None:
        """The paged KV tensors this worker side serves (one per local rank, in rank order),
        with every rank's layout; called once, before the first step. The tensors outlive the
        connector and are never reallocated."""

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        """Start (or, for synchronous loads, do) this step's loads and saves; before the
        forward, on every step, even an empty one."""

    def wait_for_save(self) -> None:  # noqa: B027 (optional hook)
        """After the forward: saves this step must finish before its blocks can be reused."""

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput:
        """Loads and saves that ended since the last call (each reported exactly once)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release transports and threads; idempotent."""

"""The attention backend contract: plan a step once, write its K/V, attend every layer.

A backend is one implementation of paged causal attention over the engine's KV cache (the
torch reference, our Triton kernels, FlashInfer). The runner makes one per engine
(registry.create_backend) and, every step, calls `plan` once; the plan travels in the step's
AttentionMetadata (layers/attention.py) beside the backend itself, and each layer calls
`write_kv` and `forward` with it. The engine never branches on which backend it holds: what
differs between them is a capability below (CUDA graphs, the folded decode prologue).

Layout every backend reads and writes (one layer's slice of the engine's cache):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (kv_cache[0], [1])
    slot of a token:  block_id * block_size + offset in its block

Packed ragged batch: sequence s owns rows query_start_loc[s]:query_start_loc[s + 1] of q
([num_tokens, num_heads, head_dim]); its context after this step is seq_lens[s] tokens, its
new tokens last, each attending causally to everything before it (bottom-right aligned). Its
blocks are row s of block_tables, in order (padding entries are never read).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic

import torch
from typing_extensions import TypeVar

if TYPE_CHECKING:  # Triton is not a dependency of the CPU install
    from baton.kernels.triton_decode import DecodePrologue

PlanT = TypeVar("PlanT", default=Any)
"""A backend's plan: its own frozen dataclass, built once per step and shared by every layer."""


class AttentionBackendUnavailable(RuntimeError):
    """The named backend cannot run here (wrong device, or its kernel library is missing)."""


@dataclass(frozen=True)
class AttentionSpec:
    """The attention shape one engine serves: fixed for its lifetime, given at construction."""

    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """KV heads per layer (num_heads is a multiple of it: grouped-query attention)."""
    head_dim: int
    dtype: torch.dtype
    """q's and the KV cache's dtype."""


class AttentionBackend(ABC, Generic[PlanT]):
    """Paged causal attention over the engine's KV cache, planned once per step.

    Contract:
      - `plan` runs once per step, before the forward, from the step's host lists and its
        device block tables; it may copy host data to the device but never waits for the
        device (under async scheduling the previous step is still running). Its result is
        read-only and shared by every layer.
      - `write_kv` puts this step's K/V into one layer's cache at slot_mapping (a slot < 0
        is skipped where the backend's kernel allows it; the torch reference has no padding).
        A model may instead write them in a fused kernel of its own (the CUDA prologue) and
        call `forward` alone: the cache layout is the same for every backend.
      - `forward` attends q over one layer's cache, the step's K/V already in it, and returns
        a new [num_tokens, num_heads, head_dim] tensor in q's dtype.
      - Capabilities are class attributes, readable without constructing the backend or
        importing its kernels (the registry and EngineConfig ask them on any host); the
        kernel libraries are imported in __init__.

    Constructed once per engine, by registry.create_backend, as cls(spec, device); owns the
    resources its kernels need across steps (FlashInfer's workspace).
    """

    name: ClassVar[str]
    """The registry key (registry.py holds the names)."""
    device_types: ClassVar[tuple[str, ...]]
    """torch device types it runs on."""
    supports_cuda_graphs: ClassVar[bool] = False
    """plan_static_decode works: decode steps may replay from CUDA graphs."""
    folds_prologue: ClassVar[bool] = False
    """can_fold_prologue may hold: forward_folded does the attention prologue (q/k norm,
    RoPE, the K/V write) inside the decode kernel."""
    requires: ClassVar[str] = ""
    """The package its kernels need beyond torch (named when is_available fails)."""
    serves_other_devices: ClassVar[bool] = False
    """On a device not in device_types the device's default backend serves this name instead
    of an error: "triton" is EngineConfig's default, which CPU engines have always run as the
    torch reference."""

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        """Import the kernels and allocate what they keep across steps on `device`."""

    @classmethod
    def is_available(cls) -> bool:
        """Whether its kernel library imports here (not whether a device is present)."""
        return True

    # ---- per step

    @abstractmethod
    def plan(
        self,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        query_start_loc: list[int],
        block_size: int,
    ) -> PlanT:
        """This step's plan. block_tables: [num_seqs, max_blocks] int on the backend's device;
        seq_lens: num_seqs context lengths after the step; query_start_loc: num_seqs + 1
        offsets of each sequence's new tokens in the packed batch."""

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Scatter key, value [num_tokens, num_kv_heads, head_dim] into one layer's caches at
        slot_mapping [num_tokens] int64."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: PlanT,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of q [num_tokens, num_heads, head_dim] (rows may be strided) over
        one layer's caches → [num_tokens, num_heads, head_dim]."""

    def static_inputs(self, plan: PlanT) -> bool:
        """Whether the plan's tables, the slot mapping and the positions are buffers filled
        before the step's first kernel (a CUDA graph's), which kernels may read early (PDL)."""
        return False

    # ---- capabilities (the defaults say "not supported")

    def plan_static_decode(
        self,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        max_model_len: int,
    ) -> PlanT:
        """A pure-decode plan over a CUDA graph's buffers, copying nothing: row b is sequence
        b, block_tables [B, max_blocks] and seq_lens [B] hold whatever the host put there
        before each replay (a padding row has seq_len 0 and gets zeros), contexts up to
        max_model_len. Only where supports_cuda_graphs."""
        raise NotImplementedError(f"attention backend {self.name!r} runs no CUDA graphs")

    def can_fold_prologue(self, plan: PlanT) -> bool:
        """Whether forward_folded may run this step (only where folds_prologue)."""
        return False

    def forward_folded(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: PlanT,
        scale: float,
        prologue: DecodePrologue,
    ) -> torch.Tensor:
        """Decode attention with the prologue done by the kernel (can_fold_prologue holds): q
        and the prologue's k are unrotated, and this step's K/V are not in the cache yet."""
        raise NotImplementedError(f"attention backend {self.name!r} folds no prologue")

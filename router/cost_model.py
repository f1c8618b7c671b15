"""What a placement costs in seconds: the rates the KV-aware policy prices TTFT with.

`CostModel` is a frozen table of rates (prefill tokens/s per worker, queue drain tokens/s,
bytes/s per KV tier and per handoff transport, fixed per-request overheads) and the few
formulas that turn a count into seconds. `OnlineCostModel` learns the rates from what workers
report (an EWMA per rate, with absurd samples ignored and outliers clamped) and hands the
policy a `snapshot()`. Pure: no I/O, no clocks; the caller feeds observations.

Defaults, before any observation (each is replaced by the first sane sample of its rate):

- prefill 8000 tokens/s per worker: GPU scale for a 7-8B model under load (one H200 prefills
  Llama-3.1-8B at about 40k tokens/s alone, docs/perf.md; a busy worker shares its steps).
  WorkerInfo carries no device today, so every unknown worker gets the same rate; since the
  policy compares workers, an equal guess keeps their ranking by queue and hit.
- queue drain = the worker's prefill rate: its outstanding tokens (prompt tokens left plus
  tokens left to generate) are worked off at roughly that rate until observe_queue says better.
- host tier 10 GB/s (pinned DRAM → device over PCIe/NVLink-C2C, well below peak), disk 2 GB/s
  (one NVMe SSD); "device" is free.
- handoff tcp 1 GB/s (docs/perf.md measures 1.0-1.4 GB/s on loopback), nixl 10 GB/s (RDMA/NVLink,
  a conservative share of a 25-50 GB/s NIC), mooncake 5 GB/s; another transport 1 GB/s.
- a remote prefill's round trip (decode → prefill RPC, transfer setup) 2 ms; each request
  waiting ahead in a worker's queue 2 ms (one admission and one scheduler step boundary).
- KV bytes per token, for a worker that does not announce `kv_block_bytes`: 128 KiB, which is
  Llama-3.1-8B in bf16 (32 layers x 8 KV heads x 128 dims x K and V x 2 bytes). Nothing about
  the worker derives it; it only sets how heavy a block is against recompute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from baton.router.registry import WorkerInfo

FREE_TIER = "device"
"""Blocks on this tier are used in place: no copy."""
HANDOFF_PREFIX = "handoff:"
"""observe_transfer kinds of a prefill → decode handoff are "handoff:<transport>"."""

DEFAULT_TIER_BYTES_PER_S: Mapping[str, float] = MappingProxyType({"host": 10e9, "disk": 2e9})
DEFAULT_HANDOFF_BYTES_PER_S: Mapping[str, float] = MappingProxyType(
    {"tcp": 1e9, "nixl": 10e9, "mooncake": 5e9}
)
DEFAULT_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
"""131072 bytes: Llama-3.1-8B, bf16 (see the module docstring)."""


def _frozen(mapping: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(mapping))


def _check_rates(name: str, values: Mapping[str, float]) -> None:
    for key, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}[{key!r}] must be a finite rate > 0, got {value}")


@dataclass(frozen=True)
class CostModel:
    """Rates and fixed costs that price a placement; every rate is > 0 and finite."""

    default_prefill_tokens_per_s: float = 8000.0
    """Prefill rate of a worker with no entry in prefill_tokens_per_s."""
    prefill_tokens_per_s: Mapping[str, float] = field(default_factory=dict)
    """worker id -> prompt tokens computed per second."""
    drain_tokens_per_s: Mapping[str, float] = field(default_factory=dict)
    """worker id -> outstanding tokens worked off per second (absent: its prefill rate)."""
    wait_s_per_waiting_request: float = 0.002
    """Fixed wait each request already queued on a worker adds."""
    tier_bytes_per_s: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TIER_BYTES_PER_S)
    """Tier name -> bytes/s to bring a block from it to the device ("device" is free)."""
    default_tier_bytes_per_s: float = 2e9
    """A tier not in tier_bytes_per_s (priced like disk)."""
    handoff_bytes_per_s: Mapping[str, float] = field(
        default_factory=lambda: DEFAULT_HANDOFF_BYTES_PER_S
    )
    """Transport -> bytes/s of the prefill → decode KV handoff."""
    default_handoff_bytes_per_s: float = 1e9
    """A transport not in handoff_bytes_per_s."""
    rpc_overhead_s: float = 0.002
    """What a remote prefill adds whatever its size: the RPC round trip and transfer setup."""
    default_kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    """KV bytes of one token (all layers, K and V) on a worker with kv_block_bytes == 0."""

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "drain_tokens_per_s"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
            _check_rates(name, getattr(self, name))
        for name in ("tier_bytes_per_s", "handoff_bytes_per_s"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
            _check_rates(name, getattr(self, name))
        _check_rates(
            "rate",
            {
                "default_prefill_tokens_per_s": self.default_prefill_tokens_per_s,
                "default_tier_bytes_per_s": self.default_tier_bytes_per_s,
                "default_handoff_bytes_per_s": self.default_handoff_bytes_per_s,
                "default_kv_bytes_per_token": float(self.default_kv_bytes_per_token),
            },
        )
        for name in ("wait_s_per_waiting_request", "rpc_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")

    # ---- rates ----------------------------------------------------------------------------

    def prefill_rate(self, worker_id: str) -> float:
        """Prompt tokens/s the worker computes."""
        return self.prefill_tokens_per_s.get(worker_id, self.default_prefill_tokens_per_s)

    def drain_rate(self, worker_id: str) -> float:
        """Outstanding tokens/s the worker works off."""
        return self.drain_tokens_per_s.get(worker_id, self.prefill_rate(worker_id))

    def kv_bytes_per_token(self, worker: WorkerInfo) -> float:
        """KV bytes of one token on the worker: its announced block size, else the default."""
        if worker.kv_block_bytes > 0:
            return worker.kv_block_bytes / worker.block_size
        return float(self.default_kv_bytes_per_token)

    # ---- seconds --------------------------------------------------------------------------

    def prefill_s(self, worker_id: str, num_tokens: int) -> float:
        """Seconds to compute num_tokens prompt tokens on the worker."""
        return max(num_tokens, 0) / self.prefill_rate(worker_id)

    def queue_s(self, worker_id: str, num_outstanding_tokens: int, num_waiting: int) -> float:
        """Seconds before the worker starts a new request: its backlog drained, plus a fixed
        wait per request queued ahead."""
        return (
            max(num_outstanding_tokens, 0) / self.drain_rate(worker_id)
            + max(num_waiting, 0) * self.wait_s_per_waiting_request
        )

    def tier_s(self, tier: str, num_bytes: float) -> float:
        """Seconds to bring num_bytes of KV from `tier` to the device (0 on the device)."""
        if tier == FREE_TIER or num_bytes <= 0:
            return 0.0
        return num_bytes / self.tier_bytes_per_s.get(tier, self.default_tier_bytes_per_s)

    def handoff_s(self, transport: str, num_bytes: float) -> float:
        """Seconds to move num_bytes of KV from a prefill worker to a decode worker."""
        if num_bytes <= 0:
            return 0.0
        rate = self.handoff_bytes_per_s.get(transport, self.default_handoff_bytes_per_s)
        return num_bytes / rate


# ---- learning the rates -------------------------------------------------------------------

MIN_SANE_TOKENS_PER_S = 1.0
MAX_SANE_TOKENS_PER_S = 1e8
MIN_SANE_BYTES_PER_S = 1e5
MAX_SANE_BYTES_PER_S = 1e13
MAX_SANE_OVERHEAD_S = 10.0


class _Ewma:
    """An EWMA of a rate: the first sane sample replaces the prior, later ones move it by
    `alpha`, each first clamped to [estimate / max_ratio, estimate * max_ratio] so that one
    outlier (a GC pause, a cold cache) cannot swing it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, sample: float, alpha: float, max_ratio: float) -> None:
        if self.value is None:
            self.value = sample
            return
        clamped = min(max(sample, self.value / max_ratio), self.value * max_ratio)
        self.value += alpha * (clamped - self.value)


def _sane(x: float) -> bool:
    return math.isfinite(x) and x > 0


class OnlineCostModel:
    """Learns a CostModel's rates from observations; `snapshot()` is what a policy reads.

    Each rate (per worker, per tier, per transport) is its own EWMA over samples; a sample with
    a zero, negative, NaN or infinite count or duration, a rate outside physical bounds
    (MIN/MAX_SANE_*), or too little work to measure a rate (fixed costs dominate it) is
    ignored and counted in `num_ignored`. Not thread-safe: one event loop feeds it.
    """

    def __init__(
        self,
        prior: CostModel | None = None,
        *,
        alpha: float = 0.2,
        max_ratio: float = 4.0,
        min_prefill_tokens: int = 64,
        min_transfer_bytes: int = 64 * 1024,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not max_ratio > 1:
            raise ValueError(f"max_ratio must be > 1, got {max_ratio}")
        self.prior = prior if prior is not None else CostModel()
        self.alpha = alpha
        self.max_ratio = max_ratio
        self.min_prefill_tokens = min_prefill_tokens
        self.min_transfer_bytes = min_transfer_bytes
        self._prefill: dict[str, _Ewma] = {}
        self._drain: dict[str, _Ewma] = {}
        self._tier: dict[str, _Ewma] = {}
        self._handoff: dict[str, _Ewma] = {}
        self._rpc = _Ewma()
        self.num_ignored = 0
        """Samples thrown away as absurd or too small to measure."""

    def observe_prefill(self, worker_id: str, num_tokens_computed: int, seconds: float) -> bool:
        """A worker computed num_tokens_computed prompt tokens in `seconds`. Returns whether
        the sample was used."""
        if num_tokens_computed < max(self.min_prefill_tokens, 1):
            return self._ignore()
        return self._rate(
            self._prefill, worker_id, num_tokens_computed, seconds, MAX_SANE_TOKENS_PER_S
        )

    def observe_queue(self, worker_id: str, num_tokens_ahead: int, seconds: float) -> bool:
        """A request waited `seconds` on the worker behind num_tokens_ahead outstanding tokens
        (its load report's count when it was placed). Teaches the drain rate."""
        if num_tokens_ahead < max(self.min_prefill_tokens, 1):
            return self._ignore()
        return self._rate(self._drain, worker_id, num_tokens_ahead, seconds, MAX_SANE_TOKENS_PER_S)

    def observe_transfer(self, kind: str, num_bytes: int, seconds: float) -> bool:
        """num_bytes of KV moved in `seconds`; kind is a tier name ("host", "disk") for a copy
        up to the device, or "handoff:<transport>" for a prefill → decode handoff."""
        if kind.startswith(HANDOFF_PREFIX):
            table, key = self._handoff, kind[len(HANDOFF_PREFIX) :]
        else:
            table, key = self._tier, kind
        if not key:
            raise ValueError(f"transfer kind {kind!r} names no tier or transport")
        if key == FREE_TIER and table is self._tier:
            return self._ignore()  # device blocks are used in place: nothing to learn
        if num_bytes < max(self.min_transfer_bytes, 1):
            return self._ignore()
        if not (_sane(num_bytes) and _sane(seconds)):
            return self._ignore()
        rate = num_bytes / seconds
        if not MIN_SANE_BYTES_PER_S <= rate <= MAX_SANE_BYTES_PER_S:
            return self._ignore()
        table.setdefault(key, _Ewma()).update(rate, self.alpha, self.max_ratio)
        return True

    def observe_rpc(self, seconds: float) -> bool:
        """A remote prefill's fixed cost (its RPC round trip with no tokens to compute)."""
        if not (_sane(seconds) and seconds <= MAX_SANE_OVERHEAD_S):
            return self._ignore()
        self._rpc.update(seconds, self.alpha, self.max_ratio)
        return True

    def forget(self, worker_id: str) -> None:
        """Drop a worker's learned rates (it left; a new one under its id starts from the prior)."""
        self._prefill.pop(worker_id, None)
        self._drain.pop(worker_id, None)

    def snapshot(self) -> CostModel:
        """The prior with every learned rate in place of its default."""
        p = self.prior
        return replace(
            p,
            prefill_tokens_per_s={**p.prefill_tokens_per_s, **_values(self._prefill)},
            drain_tokens_per_s={**p.drain_tokens_per_s, **_values(self._drain)},
            tier_bytes_per_s={**p.tier_bytes_per_s, **_values(self._tier)},
            handoff_bytes_per_s={**p.handoff_bytes_per_s, **_values(self._handoff)},
            rpc_overhead_s=p.rpc_overhead_s if self._rpc.value is None else self._rpc.value,
        )

    def _rate(
        self, table: dict[str, _Ewma], key: str, amount: float, seconds: float, max_rate: float
    ) -> bool:
        if not (_sane(amount) and _sane(seconds)):
            return self._ignore()
        rate = amount / seconds
        if not MIN_SANE_TOKENS_PER_S <= rate <= max_rate:
            return self._ignore()
        table.setdefault(key, _Ewma()).update(rate, self.alpha, self.max_ratio)
        return True

    def _ignore(self) -> bool:
        self.num_ignored += 1
        return False


def _values(table: Mapping[str, _Ewma]) -> dict[str, float]:
    return {k: e.value for k, e in table.items() if e.value is not None}

"""Frozen, uninitialised linear and embedding layers whose weights come from a checkpoint.

Why not nn.Linear / nn.Embedding: their random init costs seconds on a real model and is thrown
away by load_weights, and their parameters require grad, so a caller that forgets no_grad would
build an autograd graph every step. Fused projections (qkv, gate_up) are one Linear whose output
rows are the concatenation of several checkpoint tensors ("shards"), loaded with load_shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels.cpu_linear import can_pack, pack_weight, packed_linear

SKINNY_MAX_ROWS = 16
"""CUDA: up to this many rows (decode batches) go to the Triton skinny GEMM, which streams
the weight faster than cuBLAS at these shapes (docs/perf.md); larger ones to cuBLAS."""
FUSED_NORM_MAX_ROWS = 4
"""CUDA decode batches up to this size fold the RMSNorms into the skinny GEMMs (llama.py).
Each GEMM program then streams the norm weight beside x for every row it serves: a net gain
at 1-4 rows (-0.07 / -0.09 ms per Llama-3.1-8B step on an H100), a loss at 16 (+0.14 ms)."""


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x @ weight^T (+ bias), picking the kernel by device and row count. The product is
    rounded to x's dtype; out_dtype (e.g. fp32 logits) widens it after, which the skinny GEMM
    does as it stores (no separate upcast)."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS:
        from baton.kernels.triton_gemv import skinny_linear, supports

        if supports(x, weight):
            out = None
            if out_dtype is not None and out_dtype != x.dtype:
                out = x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)
            return skinny_linear(x, weight, bias, out=out)
    y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def _frozen(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ W^T (+ b); W is [sum(out_sizes), in_features], shard i owns its out_sizes[i] rows.

    One matmul for several projections (q/k/v, gate/up) cuts kernel launches and reads x once.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.out_features = sum(self.out_sizes)
        self.weight = _frozen(self.out_features, in_features, dtype=dtype, device=device)
        self.bias: nn.Parameter | None = (
            _frozen(self.out_features, dtype=dtype, device=device) if bias else None
        )
        self.packed: torch.Tensor | None = None
        """oneDNN-packed weight once pack_for_cpu ran (then `weight` is released)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias, self.out_features)
        return linear(x, self.weight, self.bias)

    def pack_for_cpu(self) -> bool:
        """Swap the plain weight for a oneDNN-packed one (CPU inference); False if not possible.

        The plain weight is released to keep one copy in memory: call after loading weights.
        """
        if self.packed is not None or not can_pack(self.weight):
            return self.packed is not None
        self.packed = pack_weight(self.weight.data)
        self.weight = _frozen(0, self.in_features, dtype=self.weight.dtype, device="cpu")
        return True

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor ("weight" or "bias") into the rows of shard `shard`."""
        param = self.weight if param_name == "weight" else self.bias
        if param is None or param_name not in ("weight", "bias"):
            raise KeyError(f"Linear has no parameter {param_name!r}")
        start = sum(self.out_sizes[:shard])
        rows = param.data[start : start + self.out_sizes[shard]]
        if rows.shape != tensor.shape:
            raise ValueError(
                f"shard {shard} of {param_name}: expected {rows.shape}, got {tensor.shape}"
            )
        rows.copy_(tensor)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_sizes}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """Token embedding table [num_embeddings, dim]; also the LM head when embeddings are tied."""

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.weight = _frozen(num_embeddings, dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

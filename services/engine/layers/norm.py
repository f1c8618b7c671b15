"""RMSNorm with HF's numerics: variance in float32, normalised value cast back before the weight.

Matching HF's exact op order (not F.rms_norm, whose fused reduction differs in the last bits) keeps
greedy outputs identical to transformers, which is the engine's end-to-end oracle. On CUDA the
same numerics run as one Triton kernel (kernels/triton_ops.py), which also fuses the residual add
of the pre-norm block: `residual += x; x = norm(residual)` reads and writes each tensor once.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim; weight broadcasts from the right."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned scale (initialised to ones)."""

    def __init__(
        self,
        size: int,
        eps: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from baton.kernels.triton_ops import rms_norm as triton_rms_norm

            return triton_rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); the sum is rounded to the model dtype first.

        On CUDA the sum is written into `residual` (the caller hands over its buffer); on CPU
        both inputs are left untouched.
        """
        if x.is_cuda:
            from baton.kernels.triton_ops import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        summed = residual + x
        return rms_norm(summed, self.weight, self.eps), summed

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

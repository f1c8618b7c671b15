"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul.

On CUDA at decode sizes (<= 16 rows) the down projection's skinny GEMM applies SiLU·up as it
loads its input, so the activation never round-trips through memory as a separate kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.services.engine.layers.linear import SKINNY_MAX_ROWS, Linear


class SwiGLUMLP(nn.Module):
    """gate_up_proj holds [gate; up] rows (shards 0 and 1), so x is read by one GEMM, not two."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, (intermediate_size, intermediate_size), dtype=dtype, device=device
        )
        self.down_proj = Linear(intermediate_size, (hidden_size,), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up: torch.Tensor = self.gate_up_proj(x)
        if gate_up.is_cuda and gate_up.dim() == 2 and gate_up.shape[0] <= SKINNY_MAX_ROWS:
            from baton.kernels.triton_gemv import skinny_linear, supports

            weight = self.down_proj.weight
            if supports(gate_up, weight, act="silu_mul"):  # decode: SiLU·up inside the GEMM
                return skinny_linear(gate_up, weight, act="silu_mul")
        if gate_up.is_cuda:  # one Triton kernel instead of three elementwise passes
            from baton.kernels.triton_ops import silu_and_mul

            act = silu_and_mul(gate_up)
        else:
            gate = gate_up[..., : self.intermediate_size]
            act = F.silu(gate) * gate_up[..., self.intermediate_size :]
        out: torch.Tensor = self.down_proj(act)
        return out

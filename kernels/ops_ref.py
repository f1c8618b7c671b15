"""Plain-torch references for the element-wise and row-wise kernels in triton_ops.py.

Each mirrors the CPU engine's layer op for op (services/engine/layers: norm.py, rotary.py, mlp.py),
including where results are rounded back to the model dtype, so a kernel that matches these
matches the engine. They take any float dtype: tests run them on float64 copies of the inputs to
get a higher-precision oracle, and on the model dtype to pin them to the engine bit for bit.
kernels/ imports nothing from baton.services (tests/unit/test_import_rules.py), hence the copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.kernels.attention_ref import write_kv_cache

__all__ = [
    "fused_add_rms_norm_ref",
    "qk_norm_rope_write_kv_ref",
    "rms_norm_ref",
    "rope_ref",
    "silu_and_mul_ref",
    "write_kv_cache",
]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim, HF numerics.

    The variance is taken in float32 (or wider, for a float64 oracle) and the normalised value is
    cast back to x's dtype *before* the weight multiply, as HF's LlamaRMSNorm does.
    """
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the pre-norm block's `hidden = hidden + sublayer`.

    The sum is rounded to the residual's dtype before the norm reads it, exactly as the engine's
    `hidden + self.mlp(...)` materialises it; inputs are left untouched.
    """
    new_residual = residual + x
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rope_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor
) -> torch.Tensor:
    """Neox rotary embedding of x [T, heads, D] at positions [T] → rotated copy of x.

    cos_half, sin_half: [max_positions, D // 2], the engine's RotaryEmbedding tables. Dim i is
    paired with i + D/2: out = x * cos + rotate_half(x) * sin, computed in x's dtype.
    """
    cos_h = cos_half.index_select(0, positions).to(x.dtype)
    sin_h = sin_half.index_select(0, positions).to(x.dtype)
    cos = torch.cat((cos_h, cos_h), dim=-1).unsqueeze(1)
    sin = torch.cat((sin_h, sin_h), dim=-1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] holding [gate | up] → silu(gate) * up, [..., I] (SwiGLUMLP's activation)."""
    half = x.shape[-1] // 2
    assert x.shape[-1] == 2 * half, x.shape
    return F.silu(x[..., :half]) * x[..., half:]


def qk_norm_rope_write_kv_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue: [per-head rms_norm_ref] -> rope_ref -> write_kv_cache.

    Returns rotated copies of q and k (inputs untouched); the caches are written at the slots
    >= 0 (negative slots are padding).
    """
    if q_norm_weight is not None and k_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q, k = rope_ref(q, positions, cos_half, sin_half), rope_ref(k, positions, cos_half, sin_half)
    live = slot_mapping >= 0
    write_kv_cache(k[live], v[live], k_cache, v_cache, slot_mapping[live].long())
    return q, k

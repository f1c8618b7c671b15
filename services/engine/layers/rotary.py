"""Rotary position embedding (neox / HF "rotate_half" layout) indexed by a positions tensor.

cos/sin for every position up to max_positions are computed once at build time, exactly as HF
computes them per step (fp32 `position * inv_freq`), so a step only gathers rows: no trig in the
hot path. RotaryEmbedding.step gathers once per forward (on CUDA a Triton kernel gathers in each
layer, from positions, so CUDA graphs replay it) and all layers reuse the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from baton.services.engine.models.base import RopeScaling

if TYPE_CHECKING:  # Triton is not a dependency of the CPU install
    from baton.kernels.triton_decode import DecodePrologue


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32), with Llama-3.1 scaling when asked for."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise NotImplementedError(f"rope_type {scaling.rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Transcription of transformers' `_compute_llama3_parameters` (same ops, same rounding).

    Low frequencies (wavelength above original_max / low_freq_factor) are divided by `factor`,
    high ones kept, and the band between interpolated smoothly.
    """
    old_context_len = s.original_max_position_embeddings
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / s.factor + (
        smooth_factor * inv_freq_llama
    )
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the neox pairing of dim i with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D] from cos_sin → rotated copy of x, [T, heads, D]."""
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class RopeStep:
    """RoPE at one step's positions: gathered cos/sin on CPU, the tables plus a Triton kernel on
    CUDA (which reads positions itself, so a CUDA graph replays it on new positions)."""

    positions: torch.Tensor
    cos_half: torch.Tensor
    sin_half: torch.Tensor
    cos: torch.Tensor | None
    """[T, 1, D] (CPU only)."""
    sin: torch.Tensor | None

    def rotate_and_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        static_index: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CUDA: the attention prologue in one kernel. Optional per-head RMSNorm of q and k
        (norms = q weight, k weight, eps), RoPE in place, k and v written at slot_mapping.
        static_index: positions and slot_mapping are a CUDA graph's input buffers (read early
        under PDL; see qk_norm_rope_write_kv)."""
        from baton.kernels.triton_prologue import qk_norm_rope_write_kv

        q_w, k_w, eps = norms if norms is not None else (None, None, 1e-6)
        return qk_norm_rope_write_kv(
            self.positions,
            q,
            k,
            v,
            self.cos_half,
            self.sin_half,
            k_cache,
            v_cache,
            slot_mapping,
            q_norm_weight=q_w,
            k_norm_weight=k_w,
            eps=eps,
            static_index=static_index,
        )

    def decode_prologue(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> DecodePrologue:
        """CUDA decode: the same prologue as rotate_and_write_kv, handed to the decode kernel
        to run (a triton_decode.DecodePrologue; q is the kernel's own argument)."""
        from baton.kernels.triton_decode import DecodePrologue

        q_w, k_w, eps = norms if norms is not None else (None, None, 1e-6)
        return DecodePrologue(
            k, v, self.positions, self.cos_half, self.sin_half, slot_mapping, q_w, k_w, eps
        )

    def rotate_packed(self, qk: torch.Tensor) -> torch.Tensor:
        """q and k heads side by side [T, Hq + Hk, D] → a rotated copy (the CPU path)."""
        assert self.cos is not None and self.sin is not None, "rotate_packed is the CPU path"
        return apply_rotary(qk, self.cos, self.sin)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables [max_positions, head_dim // 2] in the model dtype.

    Half-width tables halve the memory (128 MiB → 64 MiB at 128k positions); cos_sin duplicates
    the halves for just this step's tokens, as HF's `cat((freqs, freqs))` does.
    """

    cos_half: torch.Tensor
    sin_half: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        scaling: RopeScaling,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        inv_freq = rope_inv_freq(head_dim, base, scaling)
        positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_half", freqs.cos().to(dtype=dtype, device=device), False)
        self.register_buffer("sin_half", freqs.sin().to(dtype=dtype, device=device), False)

    def step(self, positions: torch.Tensor) -> RopeStep:
        """This step's rotation, built once per forward and shared by every layer."""
        if positions.is_cuda:  # the Triton kernel gathers from the half tables itself
            return RopeStep(positions, self.cos_half, self.sin_half, None, None)
        cos, sin = self.cos_sin(positions)
        return RopeStep(positions, self.cos_half, self.sin_half, cos, sin)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 → (cos, sin), each [T, 1, head_dim], ready for apply_rotary."""
        cos_half = self.cos_half.index_select(0, positions)
        sin_half = self.sin_half.index_select(0, positions)
        cos = torch.cat((cos_half, cos_half), dim=-1).unsqueeze(1)
        sin = torch.cat((sin_half, sin_half), dim=-1).unsqueeze(1)
        return cos, sin

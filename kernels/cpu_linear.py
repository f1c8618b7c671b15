"""Linear layers with weights pre-packed for oneDNN: the CPU path's matmul.

Decode on CPU is bound by reading weights from memory. oneDNN's blocked weight layout, packed
once at start-up, reads them about twice as fast as F.linear on a plain [out, in] matrix
(measured on this project's 2-core dev box: bf16 [16x576]·[576x3072] 0.48 → 0.25 ms, fp32
0.95 → 0.44 ms; docs/perf.md). F.linear stays the reference and the path on other devices.
"""

from __future__ import annotations

import torch

_PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def can_pack(weight: torch.Tensor) -> bool:
    """Whether pack_weight applies: a CPU tensor of a dtype oneDNN packs, oneDNN present."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and weight.dim() == 2
        and _onednn_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] plain weight → an opaque oneDNN-packed tensor for packed_linear."""
    assert can_pack(weight), (weight.device, weight.dtype, weight.shape)
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    return packed


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x @ W^T + b with W packed by pack_weight. x: [..., in] → [..., out_features]."""
    assert x.dtype == packed.dtype, (x.dtype, packed.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    assert y.shape[-1] == out_features, (y.shape, out_features)
    return y.view(*lead, out_features)

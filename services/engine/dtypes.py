"""Which dtype an engine computes in: "auto" picks bf16 where the hardware runs it natively."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls then run ~2x (AMX: up to 5x) faster than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in text or " amx_bf16" in text


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """ "auto" → bf16 on CUDA and on CPUs with native bf16, else float32 (vLLM does the same)."""
    if name == "auto":
        if device.startswith("cuda") or (device == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(CHOICES)}, got {name!r}")
    return DTYPES[name]

"""Host → device copies that never stall the GPU stream.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits for the whole
stream, so under async scheduling it would wait for the step still running. These helpers stage
through pinned memory (PyTorch's caching host allocator keeps a freed pinned block until the
copy that read it has run) and copy with non_blocking=True.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    values: Sequence[int] | Sequence[float] | Sequence[bool],
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`, copied without a stream sync on CUDA."""
    device = torch.device(device)
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def array_to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A numpy array on `device` (same dtype), copied without a stream sync on CUDA."""
    device = torch.device(device)
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)

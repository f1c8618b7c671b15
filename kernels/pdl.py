"""Programmatic dependent launch (PDL, Hopper and later): one process-wide switch.

A decode step is a chain of ~300 kernels, most of them a few microseconds long. Between two
dependent kernels the GPU normally drains the first, then launches the second: a gap of about a
microsecond each time. With PDL a kernel is launched with `launch_pdl=True`; its programs may
start while the previous kernel still runs, do whatever does not depend on it (index math,
prefetching weights into L2), and then block in `tl.extra.cuda.gdc_wait()` until the previous
kernel has finished and its writes are visible. `gdc_launch_dependents()` lets the next kernel's
programs start early in turn.

The contract every kernel here follows when compiled with USE_PDL=True:
  - no read of an activation (anything a previous kernel wrote) and no write to global memory
    before gdc_wait(): reads of weights and of buffers fixed since the graph was captured
    (cos/sin tables, block tables are NOT such: the host refills them) may come first;
  - gdc_launch_dependents() only after gdc_wait() (so chains of waiting programs never pile up);
  - every program calls gdc_wait() (a program that returns early must wait first), so a kernel
    completes only after its predecessor: completion stays transitive along the chain.
Kernels not launched with launch_pdl (torch's own ops) serialise as usual, and gdc_wait() in a
kernel launched without PDL returns at once: mixing is safe.

The engine turns PDL on (`set_enabled(True)`) on a device that supports it; kernel wrappers read
`enabled()` at launch (it is False under the Triton interpreter and on CPU).
"""

from __future__ import annotations

import os

import torch

_enabled = False


def supported(device: torch.device) -> bool:
    """Whether kernels on `device` may be launched with PDL (CUDA, compute capability >= 9.0)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


def set_enabled(on: bool) -> None:
    """Turn PDL launches on or off for every kernel wrapper in baton.kernels."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether kernel wrappers launch with PDL now (never under the Triton interpreter)."""
    return _enabled and os.environ.get("TRITON_INTERPRET") != "1"


def launch_kwargs() -> dict[str, bool]:
    """Extra keyword arguments for a Triton launch: {"launch_pdl": True} when PDL is on."""
    return {"launch_pdl": True} if enabled() else {}

"""Name-keyed, lazy registry of attention backends: the one place their names are written.

Lazy because the backends' kernel libraries are optional or heavy: a CPU install has no
FlashInfer, and Triton (present) must not be imported on the CPU path (its interpreter switch
is read at import). Importing a backend's module imports none of its kernels (they load when a
backend is constructed), so its class's capabilities can be read on any host.

EngineConfig.attention_backend takes one of backend_choices(): a registered name, or "auto"
for the device's default (torch on CPU, triton on CUDA).
"""

from __future__ import annotations

import importlib

import torch

from baton.services.engine.attention.base import (
    AttentionBackend,
    AttentionBackendUnavailable,
    AttentionSpec,
)

_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("baton.services.engine.attention.torch_ref", "TorchAttentionBackend"),
    "triton": ("baton.services.engine.attention.triton", "TritonAttentionBackend"),
    "flashinfer": ("baton.services.engine.attention.flashinfer", "FlashInferAttentionBackend"),
}
_DEVICE_DEFAULTS: dict[str, str] = {"cpu": "torch", "cuda": "triton"}

AUTO = "auto"
"""The device's default backend (_DEVICE_DEFAULTS)."""


def backend_names() -> tuple[str, ...]:
    """Every registered backend, available on this host or not."""
    return tuple(_BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """What EngineConfig.attention_backend (and so the CLI flag) accepts: "auto" and every
    registered name."""
    return (AUTO, *_BACKENDS)


def backend_class(name: str) -> type[AttentionBackend]:
    """The class registered as name (its module imports no kernel library); ValueError lists
    the known names."""
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        known = ", ".join(backend_choices())
        raise ValueError(f"unknown attention backend {name!r}; known: {known}") from None
    cls: type[AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, AttentionBackend) and cls.name == name, (cls, name)
    return cls


def default_backend(device_type: str) -> str:
    """The backend "auto" means on this device type."""
    try:
        return _DEVICE_DEFAULTS[device_type]
    except KeyError:
        raise AttentionBackendUnavailable(f"no attention backend runs on {device_type}") from None


def resolve_backend_name(name: str, device_type: str) -> str:
    """The backend that serves `name` on this device type: "auto" and a name whose class
    serves_other_devices become the device's default there; ValueError for an unknown name,
    AttentionBackendUnavailable for one that does not run on this device type."""
    if name == AUTO:
        return default_backend(device_type)
    cls = backend_class(name)
    if device_type in cls.device_types:
        return name
    if cls.serves_other_devices:
        return default_backend(device_type)
    runs_on = ", ".join(cls.device_types)
    here = ", ".join(available_backends(device_type)) or "none"
    raise AttentionBackendUnavailable(
        f"attention backend {name!r} runs on {runs_on}, not {device_type}; "
        f"available on {device_type}: {here}"
    )


def available_backends(device_type: str) -> tuple[str, ...]:
    """Registered backends that run on this device type and whose kernel library imports here
    (asking imports it: FlashInfer takes seconds)."""
    return tuple(
        name
        for name in _BACKENDS
        if device_type in (cls := backend_class(name)).device_types and cls.is_available()
    )


def supports_cuda_graphs(name: str) -> bool:
    """Whether the backend serving `name` on CUDA replays decode steps from CUDA graphs."""
    return backend_class(resolve_backend_name(name, "cuda")).supports_cuda_graphs


def create_backend(name: str, spec: AttentionSpec, device: torch.device) -> AttentionBackend:
    """The backend serving `name` on `device`, its resources allocated there (see
    AttentionBackend for the contract); a clear error when it cannot run here."""
    resolved = resolve_backend_name(name, device.type)
    cls = backend_class(resolved)
    if not cls.is_available():
        here = ", ".join(available_backends(device.type)) or "none"
        raise AttentionBackendUnavailable(
            f"attention backend {resolved!r} needs {cls.requires}, which does not import here; "
            f"available on {device.type}: {here}"
        )
    return cls(spec, device)

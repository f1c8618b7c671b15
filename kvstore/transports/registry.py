"""Name-keyed, lazy registry of KV transports (the name travels in KVDestination.transport).

Lazy because each transport drags in a native library (UCX via NIXL, Mooncake's engine and
libibverbs): a worker imports only the one it was configured with, and a host without Mooncake
can still run tcp and nixl.
"""

from __future__ import annotations

import importlib

import torch

from baton.kvstore.transports.base import KVTransport, TransportConfig

_TRANSPORTS: dict[str, tuple[str, str]] = {
    "tcp": ("baton.kvstore.transports.tcp", "TcpTransport"),
    "nixl": ("baton.kvstore.transports.nixl", "NixlTransport"),
    "mooncake": ("baton.kvstore.transports.mooncake", "MooncakeTransport"),
}


def transport_names() -> list[str]:
    """Every registered name, available on this host or not."""
    return list(_TRANSPORTS)


def transport_class(name: str) -> type[KVTransport]:
    """Import and return the class registered as name; ImportError if its library is missing."""
    try:
        module_name, class_name = _TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {transport_names()}") from None
    cls: type[KVTransport] = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, KVTransport) and cls.name == name
    return cls


def is_available(name: str) -> bool:
    """Whether name's native library imports on this host."""
    try:
        transport_class(name)
    except ImportError:
        return False
    return True


def create_transport(
    name: str, kv_cache: torch.Tensor, worker_id: str, config: TransportConfig | None = None
) -> KVTransport:
    """A transport serving kv_cache for worker_id (see KVTransport for the contract)."""
    return transport_class(name)(kv_cache, worker_id, config)

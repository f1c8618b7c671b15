"""What every loader returns, and the steps they share (build from the registry, stream tensors)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from baton.services.engine.models.base import CausalLM, ModelArchConfig
from baton.services.engine.models.registry import get_model_class
from baton.services.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for forward(), with its shape, its tokenizer (None if none shipped), its id."""

    model: CausalLM
    arch: ModelArchConfig
    tokenizer: Tokenizer | None
    model_id: str
    """Stable short name for APIs and logs, e.g. "SmolLM2-135M-Instruct"."""


def build_model(arch: ModelArchConfig, dtype: torch.dtype, device: str) -> CausalLM:
    """An uninitialised model of the registered family for `arch`, in eval mode."""
    cls = get_model_class(arch.architecture)
    return cls(arch, dtype=dtype, device=device).eval()


def iter_safetensors(files: Sequence[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, one at a time (peak memory: one tensor)."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, f.get_tensor(name)


def load_weights_single_threaded(
    model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """model.load_weights with torch's intra-op pool at one thread for the duration.

    Weight loading is hundreds of memory-bound copies; on a busy 2-core host, two OpenMP threads
    per copy spin-wait on each other and loading takes ~2.5 s instead of ~0.4 s (540 MB, measured).
    One thread loses nothing when the host is idle.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.load_weights(weights)
    finally:
        torch.set_num_threads(threads)

"""Random weights for an architecture: benchmarks and shape tests without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from baton.services.engine.loader.common import LoadedModel, build_model
from baton.services.engine.loader.safetensors_loader import load_tokenizer_if_present
from baton.services.engine.models.base import CausalLM
from baton.services.engine.models.hf_config import arch_config_from_hf


@torch.no_grad()
def init_random_(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Seeded N(0, std) matrices, unit norms, zero biases: activations stay O(1) through depth.

    Drawn on the CPU generator, so the same seed gives the same weights on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def load_dummy(
    config_path: str | Path, *, dtype: torch.dtype, device: str, seed: int
) -> LoadedModel:
    """A model shaped by an HF config.json with random weights; its folder's tokenizer if any."""
    path = Path(config_path)
    arch = arch_config_from_hf(json.loads(path.read_text(encoding="utf-8")))
    model = build_model(arch, dtype, device)
    init_random_(model, seed)
    tokenizer = load_tokenizer_if_present(path.parent, arch.eos_token_ids)
    model_id = f"dummy-{path.parent.resolve().name}"
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, model_id=model_id)

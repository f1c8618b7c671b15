"""Random weights for an architecture: benchmarks and shape tests without a checkpoint.

`dummy:<name>` takes a config bundled in models/configs (llama-3.1-8b, qwen3-8b, smollm2-135m:
the real HF config.json of each, written here since nothing is fetched from a hub);
`dummy:<path/config.json>` takes any HF config. The tokenizer comes from beside the config
(sources.dummy_tokenizer_dir); the bundled llama-3.1-8b and qwen3-8b ship one made offline by
scripts/make_dummy_tokenizers.py, covering their whole vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from baton.services.engine.loader.common import LoadedModel, build_model
from baton.services.engine.loader.sources import (
    dummy_model_id,
    load_dummy_tokenizer,
    resolve_dummy_config,
)
from baton.services.engine.models.base import CausalLM
from baton.services.engine.models.hf_config import arch_config_from_hf


@torch.no_grad()
def init_random_(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Seeded N(0, std) matrices, unit norms, zero biases: activations stay O(1) through depth.

    Drawn where the weights live, with a generator of that device: the same seed gives the same
    weights on a given device type (an 8B model draws in well under a second on a GPU, where
    the CPU would take a minute).
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            device = param.device
            if device not in generators:
                generators[device] = torch.Generator(device).manual_seed(seed)
            noise = torch.randn(
                param.shape, generator=generators[device], device=device, dtype=torch.float32
            )
            param.copy_(noise.mul_(std))


def load_dummy(
    config_path: str | Path, *, dtype: torch.dtype, device: str, seed: int
) -> LoadedModel:
    """A model shaped by an HF config.json with random weights, and its tokenizer if any."""
    path = resolve_dummy_config(str(config_path))
    arch = arch_config_from_hf(json.loads(path.read_text(encoding="utf-8")))
    # The tokenizer first: a mismatched one fails before seconds of random init.
    tokenizer = load_dummy_tokenizer(path, arch.vocab_size, arch.eos_token_ids)
    model = build_model(arch, dtype, device)
    init_random_(model, seed)
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, model_id=dummy_model_id(path))

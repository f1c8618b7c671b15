"""Load an HF model folder: config.json + *.safetensors (+ tokenizer.json, optional)."""

from __future__ import annotations

from pathlib import Path

import torch

from baton.services.engine.loader.common import (
    LoadedModel,
    build_model,
    iter_safetensors,
    load_weights_single_threaded,
)
from baton.services.engine.loader.sources import (
    hf_model_id,
    load_tokenizer_if_present,
    read_hf_config,
)
from baton.services.engine.models.hf_config import arch_config_from_hf


def load_hf_dir(hf_dir: str | Path, *, dtype: torch.dtype, device: str) -> LoadedModel:
    """Build the model named by config.json and load every *.safetensors file into it."""
    root = Path(hf_dir)
    arch = arch_config_from_hf(read_hf_config(root))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {root}")
    model = build_model(arch, dtype, device)
    load_weights_single_threaded(model, iter_safetensors(files))
    tokenizer = load_tokenizer_if_present(root, arch.eos_token_ids)
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, model_id=hf_model_id(root))

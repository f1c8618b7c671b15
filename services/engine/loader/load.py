"""load_model: a model spec → a LoadedModel (weights on a device), dispatching on its source."""

from __future__ import annotations

import torch

from baton.services.engine.loader.common import LoadedModel
from baton.services.engine.loader.dummy_loader import load_dummy
from baton.services.engine.loader.gguf_loader import load_gguf
from baton.services.engine.loader.safetensors_loader import load_hf_dir
from baton.services.engine.loader.sources import DEFAULT_MODEL, resolve_model


def load_model(
    model: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load `model` (see the package docstring for the accepted forms); seed only for dummy."""
    source = resolve_model(model)
    if source.kind == "gguf":
        loaded = load_gguf(source.path, dtype=dtype, device=device)
    elif source.kind == "hf":
        loaded = load_hf_dir(source.path, dtype=dtype, device=device)
    else:
        loaded = load_dummy(source.path, dtype=dtype, device=device, seed=seed)
    # Each loader names its model with sources.py's functions, as resolve_model does.
    assert loaded.model_id == source.model_id, (loaded.model_id, source.model_id)
    return loaded

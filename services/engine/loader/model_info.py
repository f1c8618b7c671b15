"""What a front end needs of a model, without its weights and without torch (the gateway).

The gateway tokenizes, renders chat templates, checks prompt lengths and names the model; it
reads all of that from the files beside the weights, through the same sources.py the engine
loads from, so both sides agree on the model id and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.services.engine.loader.gguf_cache import cache_dir_for
from baton.services.engine.loader.sources import (
    DEFAULT_MODEL,
    load_dummy_tokenizer,
    load_tokenizer_if_present,
    read_hf_config,
    resolve_model,
    token_ids,
)
from baton.services.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """A model's id, tokenizer and limits: the fields of its config a front end uses."""

    model_id: str
    """The same id the engine's LoadedModel carries for this spec."""
    tokenizer: Tokenizer | None
    """None when the model ships none (tiny test configs); the gateway then cannot serve it."""
    vocab_size: int
    max_position_embeddings: int
    """The model's context length (the engine may be configured to serve less)."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    """The config's (and generation_config's) eos ids; the tokenizer's add to them."""


def load_model_info(model: str = DEFAULT_MODEL) -> ModelInfo:
    """Id, tokenizer and limits of `model` (any spec load_model takes), reading no weights.

    A GGUF model is read from its converted cache folder. Only when that does not exist yet
    (a gateway started before any worker converted this file) is it converted here: that step
    dequantizes the weights and imports torch, once per file version.
    """
    source = resolve_model(model)
    eos: tuple[int, ...]
    if source.kind == "dummy":
        config = _read_json(source.path)
        eos = token_ids(config.get("eos_token_id"))
        tokenizer = load_dummy_tokenizer(source.path, int(config["vocab_size"]), eos)
    else:
        folder = source.path if source.kind == "hf" else _gguf_folder(source.path)
        config = read_hf_config(folder)
        eos = token_ids(config.get("eos_token_id"))
        tokenizer = load_tokenizer_if_present(folder, eos)
    bos = config.get("bos_token_id")
    return ModelInfo(
        model_id=source.model_id,
        tokenizer=tokenizer,
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos,
    )


def _gguf_folder(gguf_path: Path) -> Path:
    cached = cache_dir_for(gguf_path)
    if cached.is_dir():
        return cached
    from baton.services.engine.loader.gguf_loader import ensure_converted  # torch: cold path only

    return ensure_converted(gguf_path)


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data

"""Load an HF model folder: config.json + *.safetensors (+ tokenizer.json, optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from baton.services.engine.loader.common import (
    LoadedModel,
    build_model,
    iter_safetensors,
    load_weights_single_threaded,
)
from baton.services.engine.models.hf_config import arch_config_from_hf
from baton.services.engine.tokenizer import Tokenizer


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos ids appended to eos_token_id.

    HF generation stops on generation_config's eos list (Llama-3 lists several there that
    config.json lacks), so the engine must know all of them.
    """
    cfg: dict[str, Any] = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    gen_path = hf_dir / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        eos = [cfg.get("eos_token_id"), gen.get("eos_token_id")]
        merged: list[int] = []
        for value in eos:
            for token_id in [value] if isinstance(value, int) else value or []:
                if token_id not in merged:
                    merged.append(int(token_id))
        cfg["eos_token_id"] = merged or None
    return cfg


def load_tokenizer_if_present(
    hf_dir: Path, extra_eos_token_ids: tuple[int, ...]
) -> Tokenizer | None:
    """The folder's tokenizer, or None when it ships no tokenizer.json (tiny test models)."""
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_pretrained_dir(hf_dir, extra_eos_token_ids=extra_eos_token_ids)


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
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, model_id=root.resolve().name)

"""Random weights for an architecture: benchmarks and shape tests without a checkpoint.

`dummy:<name>` takes a config bundled in models/configs (llama-3.1-8b, qwen3-8b, smollm2-135m:
the real HF config.json of each, written here since nothing is fetched from a hub);
`dummy:<path/config.json>` takes any HF config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from baton.services.engine.loader.common import LoadedModel, build_model
from baton.services.engine.loader.safetensors_loader import load_tokenizer_if_present
from baton.services.engine.models.base import CausalLM
from baton.services.engine.models.hf_config import arch_config_from_hf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config(name_or_path: str) -> Path:
    """A bundled config's name (e.g. "llama-3.1-8b") or a path to an HF config.json."""
    bundled = CONFIG_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and bundled.is_file():
        return bundled
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"dummy model config {name_or_path!r}: not a file, nor one of {bundled_configs()}"
        )
    return path


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
    """A model shaped by an HF config.json with random weights; its folder's tokenizer if any."""
    path = resolve_config(str(config_path))
    arch = arch_config_from_hf(json.loads(path.read_text(encoding="utf-8")))
    model = build_model(arch, dtype, device)
    init_random_(model, seed)
    tokenizer = load_tokenizer_if_present(path.parent, arch.eos_token_ids)
    name = path.stem if path.parent == CONFIG_DIR else path.parent.resolve().name
    model_id = f"dummy-{name}"
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, model_id=model_id)

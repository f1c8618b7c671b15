"""Lazy, name-keyed registry of model families: a name maps to the module and class to import.

Keys are our family names ("llama", "qwen2", "qwen3") and HF `architectures` entries
("LlamaForCausalLM", ...). Importing a family's module only when asked keeps `import baton`
cheap and lets a family add heavy imports without slowing the others.
"""

from __future__ import annotations

import importlib

from baton.services.engine.models.base import CausalLM

_LLAMA = ("baton.services.engine.models.llama", "LlamaForCausalLM")

_REGISTRY: dict[str, tuple[str, str]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "LlamaForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
}


def register_model(name: str, module: str, class_name: str) -> None:
    """Make `name` resolve to `module.class_name` (imported on first get_model_class)."""
    _REGISTRY[name] = (module, class_name)


def supported_models() -> list[str]:
    """Every registered family and architecture name, sorted."""
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[CausalLM]:
    """The CausalLM class for a family or HF architecture name; KeyError lists the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; supported: {', '.join(supported_models())}")
    module_name, class_name = _REGISTRY[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise TypeError(f"{module_name}.{class_name} is not a CausalLM")
    return cls

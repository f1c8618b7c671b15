"""Model specs → where the model is, what it is called, where its tokenizer is: torch-free.

The engine's load_model and the gateway's load_model_info both start here, so a worker and a
gateway given the same spec agree on the model id (which also keys the KV block hashes and the
router's worker lookup) and on the tokenizer. The spec forms and the tokenizer rules are in
the package docstring (loader/__init__.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from baton.services.engine.loader.gguf_cache import default_gguf_path, gguf_model_id
from baton.services.engine.tokenizer import Tokenizer, find_tokenizer_file

DEFAULT_MODEL = "smollm2"
DUMMY_PREFIX = "dummy:"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"
"""The bundled HF configs (`<name>.json`) and their tokenizers (`<name>.tokenizer/`)."""
TOKENIZER_DIR_SUFFIX = ".tokenizer"


@dataclass(frozen=True)
class ModelSource:
    """What a model spec names."""

    kind: Literal["gguf", "hf", "dummy"]
    path: Path
    """The .gguf file, the HF folder, or the dummy model's config.json."""
    model_id: str
    """The id every part uses for this model (APIs, registry, block hashes)."""


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelSource:
    """The source a spec names; ValueError (or FileNotFoundError) if it names none."""
    if spec == DEFAULT_MODEL:
        path = default_gguf_path()
        return ModelSource("gguf", path, gguf_model_id(path))
    if spec.startswith(DUMMY_PREFIX):
        config = resolve_dummy_config(spec[len(DUMMY_PREFIX) :])
        return ModelSource("dummy", config, dummy_model_id(config))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path, gguf_model_id(path))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path, hf_model_id(path))
    raise ValueError(
        f"cannot load {spec!r}: expected {DEFAULT_MODEL!r}, a .gguf file, an HF folder with "
        f"config.json, or {DUMMY_PREFIX}<config.json or one of {bundled_configs()}>"
    )


# ---- model ids ----------------------------------------------------------------------------------


def hf_model_id(hf_dir: Path) -> str:
    """An HF folder is called by its name ("/models/Qwen3-8B/" → "Qwen3-8B")."""
    return hf_dir.resolve().name


def dummy_model_id(config_path: Path) -> str:
    """ "dummy-<bundled name>", or "dummy-<the config's folder name>" for any other config."""
    path = config_path.resolve()
    name = path.stem if path.parent == CONFIG_DIR else path.parent.name
    return f"dummy-{name}"


# ---- dummy configs ------------------------------------------------------------------------------


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_dummy_config(name_or_path: str) -> Path:
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


def dummy_tokenizer_dir(config_path: Path) -> Path:
    """`<stem>.tokenizer/` beside the config if that folder exists, else the config's folder."""
    beside = config_path.with_name(config_path.stem + TOKENIZER_DIR_SUFFIX)
    return beside if beside.is_dir() else config_path.parent


def load_dummy_tokenizer(
    config_path: Path, vocab_size: int, extra_eos_token_ids: tuple[int, ...]
) -> Tokenizer | None:
    """The dummy model's tokenizer (None if it has none); ValueError if it outgrows the vocab.

    A tokenizer paired with a config by hand must not produce ids the model has no row for.
    """
    folder = dummy_tokenizer_dir(config_path)
    tokenizer = load_tokenizer_if_present(folder, extra_eos_token_ids)
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} ids but {config_path} a "
            f"vocabulary of {vocab_size}"
        )
    return tokenizer


# ---- HF folders ---------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos ids appended to eos_token_id.

    HF generation stops on generation_config's eos list (Llama-3 lists several there that
    config.json lacks), so the engine must know all of them.
    """
    cfg: dict[str, Any] = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    gen_path = hf_dir / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        merged: list[int] = []
        for token_id in token_ids(cfg.get("eos_token_id")) + token_ids(gen.get("eos_token_id")):
            if token_id not in merged:
                merged.append(token_id)
        cfg["eos_token_id"] = merged or None
    return cfg


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF config's token id field (absent, an int, or a list) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_tokenizer_if_present(
    hf_dir: Path, extra_eos_token_ids: tuple[int, ...]
) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none (tiny test models); see TOKENIZER_FILES."""
    if find_tokenizer_file(hf_dir) is None:
        return None
    return Tokenizer.from_pretrained_dir(hf_dir, extra_eos_token_ids=extra_eos_token_ids)

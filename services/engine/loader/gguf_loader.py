"""Load a llama.cpp GGUF file by converting it once into a cached HF folder.

Cold path (seconds): read metadata → ModelArchConfig; dequantize every tensor to float32 with
`gguf.quants.dequantize`; rename GGUF → HF names; undo llama.cpp's Q/K row permutation (llama
arch only, exactly as transformers does); convert the tokenizer with transformers' GGUF support;
write model.safetensors + config.json + tokenizer.json + tokenizer_config.json.
Warm path (< 2 s): the cache folder is an ordinary HF folder, read by safetensors_loader; the GGUF
file itself is only stat()-ed for the cache key.

Cache: the folder gguf_cache.cache_dir_for names (keyed by the file's path, size and mtime). It is
written under a temporary name and renamed into place, so a crash mid-conversion never leaves a
half cache that later loads would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file

from baton.services.engine.layers.rotary import rope_inv_freq
from baton.services.engine.loader.common import LoadedModel
from baton.services.engine.loader.gguf_cache import cache_dir_for, gguf_model_id
from baton.services.engine.loader.safetensors_loader import load_hf_dir
from baton.services.engine.models.base import ModelArchConfig, RopeScaling
from baton.services.engine.models.hf_config import hf_config_from_arch

# GGUF tensor name (after "blk.N.") → HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def load_gguf(gguf_path: str | Path, *, dtype: torch.dtype, device: str) -> LoadedModel:
    """Load through the cache, converting the GGUF first if this version is not cached yet."""
    path = Path(gguf_path)
    loaded = load_hf_dir(ensure_converted(path), dtype=dtype, device=device)
    return replace(loaded, model_id=gguf_model_id(path))


def ensure_converted(path: Path) -> Path:
    """The cached HF folder of this GGUF file, converting it first if needed."""
    cached = cache_dir_for(path)
    if not cached.is_dir():
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            convert_gguf(path, tmp)
            os.rename(tmp, cached)
        except OSError:
            if not cached.is_dir():  # not a lost race with another process: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write an HF folder (fp32 safetensors, config, tokenizer) equivalent to the GGUF."""
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    arch = arch_config_from_gguf(reader, tensors)
    arch_name = reader_arch(reader)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if hf_name is not None:
            state[hf_name] = _dequantize(tensor, arch, arch_name)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_from_arch(arch) | {"baton_gguf_source": str(gguf_path.resolve())}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _convert_tokenizer(reader, gguf_path, out_dir)


def reader_arch(reader: GGUFReader) -> str:
    return str(_field(reader, "general.architecture"))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def arch_config_from_gguf(reader: GGUFReader, tensors: dict[str, ReaderTensor]) -> ModelArchConfig:
    """ModelArchConfig from `{arch}.*` metadata; bias, q/k norm and tying from tensor presence."""
    arch_name = reader_arch(reader)
    if arch_name not in ("llama", "qwen2", "qwen3"):
        raise NotImplementedError(f"GGUF architecture {arch_name!r} is not supported")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch_name}.{key}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    theta = float(meta("rope.freq_base", 10000.0))
    vocab = meta("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelArchConfig(
        architecture=arch_name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, tensors, arch_name, head_dim, theta),
        max_position_embeddings=int(meta("context_length", 8192)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _rope_scaling(
    reader: GGUFReader,
    tensors: dict[str, ReaderTensor],
    arch_name: str,
    head_dim: int,
    theta: float,
) -> RopeScaling:
    """Llama-3.1 scaling from the `rope_freqs` tensor llama.cpp writes instead of metadata.

    rope_freqs holds inv_freq / scaled_inv_freq per frequency; we accept it only if the
    standard llama3 parameters (low 1, high 4, factor = its max) reproduce it.
    """
    scaling_type = _field(reader, f"{arch_name}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise NotImplementedError(f"GGUF rope scaling {scaling_type!r} is not supported")
    if "rope_freqs.weight" not in tensors:
        return RopeScaling()
    ratios = torch.from_numpy(_to_f32(tensors["rope_freqs.weight"]).reshape(-1))
    original = _field(reader, f"{arch_name}.rope.scaling.original_context_length", 8192)
    candidate = RopeScaling(
        rope_type="llama3",
        factor=float(ratios.max()),
        original_max_position_embeddings=int(original),
    )
    base = rope_inv_freq(head_dim, theta, RopeScaling())
    scaled = rope_inv_freq(head_dim, theta, candidate)
    if not torch.allclose(base / scaled, ratios, rtol=1e-3):
        raise NotImplementedError("rope_freqs does not match llama3 rope scaling")
    return candidate


def _hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, None for tensors we recompute (rope_freqs)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem == "rope_freqs":
        return None
    raise KeyError(f"unknown GGUF tensor {gguf_name!r}")


def _to_f32(tensor: ReaderTensor) -> np.ndarray[Any, Any]:
    """Dequantized float32 array in HF's [out, in] order (GGUF lists dims reversed)."""
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _dequantize(tensor: ReaderTensor, arch: ModelArchConfig, arch_name: str) -> torch.Tensor:
    weight = _to_f32(tensor)
    if arch_name == "llama":
        if ".attn_q." in tensor.name:
            weight = _reverse_permute(weight, arch.num_heads)
        elif ".attn_k." in tensor.name:
            weight = _reverse_permute(weight, arch.num_kv_heads)
    # F32 tensors come back as read-only views of the file's memmap: copy those (and only those).
    return torch.from_numpy(np.require(weight, requirements=["C_CONTIGUOUS", "WRITEABLE"]))


def _reverse_permute(weight: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """Undo llama.cpp's Q/K row order (interleaved rotary pairs) back to HF's rotate_half order.

    Same reshape/swap as transformers' LlamaTensorProcessor._reverse_permute_weights.
    """
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def _convert_tokenizer(reader: GGUFReader, gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json via transformers' GGUF converter (only here: never on the warm path)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = hf_tok.backend_tokenizer
    backend.save(str(out_dir / "tokenizer.json"))
    config: dict[str, Any] = {}
    for key, meta_key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = _field(reader, f"tokenizer.ggml.{meta_key}")
        if token_id is not None:
            config[key] = backend.id_to_token(int(token_id))
    config["chat_template"] = _field(reader, "tokenizer.chat_template")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

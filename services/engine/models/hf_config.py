"""Translation between HF config.json dicts and ModelArchConfig (both directions).

Handles the spellings that vary across checkpoints and transformers versions: head_dim absent or
null (→ hidden / heads), RoPE in `rope_theta` + `rope_scaling` (transformers 4) or in
`rope_parameters` (transformers 5), `type` vs `rope_type`, eos as an int or a list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from baton.services.engine.models.base import ModelArchConfig, RopeScaling

# HF model_type → (our family, HF architecture class name).
_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
_ARCH_TO_FAMILY = {arch: family for family, arch in _FAMILIES.values()}


def _family(cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in _FAMILIES:
        return _FAMILIES[model_type][0]
    for arch in cfg.get("architectures") or ():
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    raise NotImplementedError(
        f"unsupported model_type={model_type!r} architectures={cfg.get('architectures')!r}"
    )


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either the transformers-4 or the transformers-5 layout."""
    params: Mapping[str, Any] = cfg.get("rope_parameters") or {}
    legacy: Mapping[str, Any] = cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = legacy or params
    rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported")
    defaults = RopeScaling()
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(scaling.get("factor", defaults.factor)),
        low_freq_factor=float(scaling.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(scaling.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            scaling.get(
                "original_max_position_embeddings", defaults.original_max_position_embeddings
            )
        ),
    )


def arch_config_from_hf(cfg: Mapping[str, Any]) -> ModelArchConfig:
    """ModelArchConfig from a parsed HF config.json; NotImplementedError if unsupported."""
    family = _family(cfg)
    hidden = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("sliding-window attention is not supported")
    # Qwen2 always has q/k/v bias; for llama/qwen3 `attention_bias` would also put a bias on
    # o_proj, which this engine does not model.
    attention_bias = family == "qwen2"
    if family != "qwen2" and cfg.get("attention_bias"):
        raise NotImplementedError(f"{family} with attention_bias (o_proj bias) is not supported")
    if cfg.get("mlp_bias"):
        raise NotImplementedError("mlp_bias is not supported")
    theta, scaling = _rope(cfg)
    bos = cfg.get("bos_token_id")
    return ModelArchConfig(
        architecture=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=family == "qwen3",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
    )


def hf_config_from_arch(arch: ModelArchConfig) -> dict[str, Any]:
    """An HF config.json dict for `arch`, loadable by transformers and by arch_config_from_hf."""
    model_type = arch.architecture
    if model_type not in _FAMILIES:
        raise NotImplementedError(f"no HF config mapping for {model_type!r}")
    # Both layouts: transformers 5 reads rope_parameters, transformers 4 rope_theta + rope_scaling.
    rope_scaling: dict[str, Any] | None = None
    if arch.rope_scaling.rope_type != "default":
        s = arch.rope_scaling
        rope_scaling = {
            "rope_type": s.rope_type,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    rope_parameters = {
        "rope_type": "default",
        **(rope_scaling or {}),
        "rope_theta": arch.rope_theta,
    }
    eos_ids = list(arch.eos_token_ids)
    eos: int | list[int] | None = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    return {
        "architectures": [_FAMILIES[model_type][1]],
        "model_type": model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }

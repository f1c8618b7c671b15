"""The Llama family (Llama, SmolLM2, Qwen2, Qwen3) as one model over packed ragged batches.

Family differences are flags of ModelArchConfig read by one decoder layer, never subclasses:
  attention_bias  bias on the fused qkv projection (Qwen2)
  qk_norm         per-head RMSNorm on q and k before RoPE (Qwen3)
  rope_scaling    Llama-3.1 frequency scaling
  tie_word_embeddings  LM head shares the embedding table (SmolLM2, small Qwens)

Per layer the hot path is: norm → one qkv GEMM → RoPE on q and k together → paged attention →
o_proj → residual add + norm → one gate_up GEMM → SiLU·up → down; the residual add travels to
the next layer's norm, where CUDA fuses it (one Triton kernel). No per-token Python.

Decode on CUDA (<= 4 rows; FUSED_NORM_MAX_ROWS) has one norm kernel: o_proj and down add their
output into the residual stream as they store it and leave its per-tile sums of squares (the
embedding lookup leaves them too), and the next GEMM (gate_up, or the next layer's qkv)
RMS-normalises the residual as it loads it (triton_gemv.skinny_linear_add / NormedInput): 64
fewer launches per step for an 8B model, each a few microseconds of a ~6 ms step. Only the
final norm stays a kernel: folded into the LM head's 2000 programs it measured 0.02 ms slower
per step (docs/perf.md). The LM head writes fp32 logits itself (linear(out_dtype=)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from baton.kernels.cpu_linear import can_pack, pack_weight, packed_linear
from baton.services.engine.layers.attention import Attention, AttentionMetadata
from baton.services.engine.layers.linear import FUSED_NORM_MAX_ROWS, Embedding, Linear, linear
from baton.services.engine.layers.mlp import SwiGLUMLP
from baton.services.engine.layers.norm import RMSNorm, rms_norm
from baton.services.engine.layers.rotary import RopeStep, RotaryEmbedding
from baton.services.engine.models.base import CausalLM, ModelArchConfig

# HF checkpoint projection → (our fused module, shard index in it).
_FUSED_SHARDS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_UNFUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    """Self-attention block: fused qkv, optional q/k head norm, RoPE, paged attention, o_proj."""

    def __init__(self, cfg: ModelArchConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = Linear(
            cfg.hidden_size,
            (q_size, kv_size, kv_size),
            bias=cfg.attention_bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = Linear(q_size, (cfg.hidden_size,), dtype=dtype, device=device)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.eps = cfg.rms_norm_eps
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
        self.fold_prologue = True
        """CUDA decode steps fold the prologue into the decode kernel where it can (tests and
        services/engine/bench/ablation.py turn it off to compare)."""

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeStep,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = self.attend(self.qkv_proj(x), rope, kv_cache, meta)
        projected: torch.Tensor = self.o_proj(out)
        return projected

    def attend(
        self, qkv: torch.Tensor, rope: RopeStep, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """[T, q + 2 kv] projections → attention output [T, heads * head_dim] (before o_proj)."""
        num_tokens = qkv.shape[0]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        v = qkv[:, k_end:]
        if qkv.is_cuda:
            # One Triton kernel on strided views of qkv: q/k head norms (Qwen3), RoPE in place,
            # and the K/V write into this layer's cache; no copies.
            q = qkv[:, :q_end].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_end:k_end].view(num_tokens, self.num_kv_heads, self.head_dim)
            norms = None
            if self.q_norm is not None and self.k_norm is not None:
                norms = (self.q_norm.weight, self.k_norm.weight, self.eps)
            if self.fold_prologue and self.attn.can_fold_prologue(meta):
                # A decode step: the decode kernel runs the prologue itself (one launch fewer).
                prologue = rope.decode_prologue(k, v.view_as(k), meta.slot_mapping, norms)
                folded: torch.Tensor = self.attn.forward_folded(q, kv_cache, meta, prologue)
                return folded
            q, k = rope.rotate_and_write_kv(
                q,
                k,
                v.view_as(k),
                kv_cache[0],
                kv_cache[1],
                meta.slot_mapping,
                norms,
                static_index=meta.static_inputs,
            )
            out: torch.Tensor = self.attn(q, k, v, kv_cache, meta, kv_written=True)
        else:
            q, k = self._qk_cpu(qkv, rope, num_tokens)
            out = self.attn(q, k, v, kv_cache, meta)
        return out

    def _qk_cpu(
        self, qkv: torch.Tensor, rope: RopeStep, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q and k heads side by side: [T, heads + kv_heads, D], so norm and RoPE run once for both.
        qk = qkv[:, : self.q_size + self.kv_size].view(
            num_tokens, self.num_heads + self.num_kv_heads, self.head_dim
        )
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head weights, laid out to match qk's head axis (elementwise identical to HF's
            # separate q_norm / k_norm calls).
            weight = torch.cat(
                (
                    self.q_norm.weight.expand(self.num_heads, -1),
                    self.k_norm.weight.expand(self.num_kv_heads, -1),
                )
            )
            qk = rms_norm(qk, weight, self.eps)
        qk = rope.rotate_packed(qk)
        return qk[:, : self.num_heads].contiguous(), qk[:, self.num_heads :].contiguous()


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelArchConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.input_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device
        )
        self.self_attn = LlamaAttention(cfg, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device
        )
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeStep,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual stream before it): the add is fused into the next norm."""
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm.add_and_norm(hidden, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        out: torch.Tensor = self.mlp(x)
        return out, residual

    def forward_decode(
        self,
        residual: torch.Tensor,
        sumsq: torch.Tensor,
        rope: RopeStep,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """CUDA decode with the norms folded into the GEMMs: `residual` (the stream, summed) is
        updated in place; sumsq are its per-row partial sums of squares (from the previous
        layer's down projection, or the embedding lookup). Returns this layer's sumsq. The same
        math as forward, up to the variance's summation order."""
        from baton.kernels.triton_gemv import NormedInput, skinny_linear, skinny_linear_add

        attn, mlp = self.self_attn, self.mlp
        qkv_proj = attn.qkv_proj
        norm = NormedInput(self.input_layernorm.weight, sumsq, self.input_layernorm.eps)
        qkv = skinny_linear(residual, qkv_proj.weight, qkv_proj.bias, norm=norm)
        out = attn.attend(qkv, rope, kv_cache, meta)
        sumsq = skinny_linear_add(out, attn.o_proj.weight, residual, attn.o_proj.bias)
        post = self.post_attention_layernorm
        gate_up = skinny_linear(
            residual, mlp.gate_up_proj.weight, norm=NormedInput(post.weight, sumsq, post.eps)
        )
        return skinny_linear_add(gate_up, mlp.down_proj.weight, residual, act="silu_mul")


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelArchConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
            dtype=dtype,
            device=device,
        )


class LlamaForCausalLM(CausalLM):
    """CausalLM for llama / qwen2 / qwen3 checkpoints; parameters are created uninitialised."""

    def __init__(
        self,
        config: ModelArchConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, device=device)
        self._packed_head: torch.Tensor | None = None
        self.fuse_decode_norms = True
        """CUDA decode batches take forward_decode's path (tests turn it off to compare)."""
        self._decode_fusable: bool | None = None
        self.lm_head: Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, (config.vocab_size,), dtype=dtype, device=device
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        model = self.model
        rope = model.rotary.step(positions)
        if self._fused_decode(input_ids):
            # The embedding lookup leaves its rows' sums of squares, so the first layer's qkv
            # normalises its input too; only the final norm runs as a kernel.
            from baton.kernels.triton_ops import embedding_sumsq

            hidden, sumsq = embedding_sumsq(input_ids, model.embed_tokens.weight)
            for i, decoder in enumerate(self._layers()):
                sumsq = decoder.forward_decode(hidden, sumsq, rope, kv_cache[i], meta)
            normed: torch.Tensor = model.norm(hidden)
            return normed
        hidden = model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(model.layers):
            hidden, residual = layer(hidden, residual, rope, kv_cache[i], meta)
        if residual is None:  # no layers
            out: torch.Tensor = model.norm(hidden)
            return out
        out, _ = model.norm.add_and_norm(hidden, residual)
        return out

    def _fused_decode(self, input_ids: torch.Tensor) -> bool:
        """Whether this forward takes the decode path with norms folded into the GEMMs: CUDA,
        1..FUSED_NORM_MAX_ROWS rows, and every projection's shapes taken by the skinny GEMM
        (checked once)."""
        rows = input_ids.shape[0]
        if not (input_ids.is_cuda and self.fuse_decode_norms and 1 <= rows <= FUSED_NORM_MAX_ROWS):
            return False
        if self._decode_fusable is None:
            from baton.kernels.triton_gemv import supports

            layers = self._layers()
            if not layers or len(layers) != len(self.model.layers):
                self._decode_fusable = False
                return False
            attn, mlp = layers[0].self_attn, layers[0].mlp
            plain = (attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight)
            down = mlp.down_proj.weight
            self._decode_fusable = all(
                supports(w.new_empty(rows, w.shape[1]), w) for w in plain
            ) and supports(down.new_empty(rows, 2 * down.shape[1]), down, act="silu_mul")
        return self._decode_fusable

    def _head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight

    def _layers(self) -> list[LlamaDecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, LlamaDecoderLayer)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the model dtype, then upcast: what HF does, so bf16 logits match too.
        if self.lm_head is not None and self.lm_head.packed is not None:
            logits: torch.Tensor = self.lm_head(hidden)
            return logits.float()
        if self._packed_head is not None:
            vocab = self.model.embed_tokens.weight.shape[0]
            return packed_linear(hidden, self._packed_head, None, vocab).float()
        return linear(hidden, self._head_weight(), out_dtype=torch.float32)

    def pack_for_cpu(self) -> None:
        """Pack every projection (and the tied head, as its own copy) for oneDNN."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu()
        table = self.model.embed_tokens.weight
        if self.lm_head is None and can_pack(table):
            self._packed_head = pack_weight(table.data)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into (fused) parameters; raise on unknown, missing or misshapen."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding table is the head
            module_name, _, param_name = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            if proj in _FUSED_SHARDS:
                fused, shard = _FUSED_SHARDS[proj]
                target = self.get_submodule(f"{parent}.{fused}")
                assert isinstance(target, Linear), name
                target.load_shard(param_name, shard, tensor)
            else:
                if name not in params:
                    raise KeyError(f"unexpected checkpoint tensor {name!r}")
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: expected {tuple(param.shape)}, got {tensor.shape}")
                param.copy_(tensor)
            loaded.add(name)
        missing = sorted(self._checkpoint_names() - loaded)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _checkpoint_names(self) -> set[str]:
        """The HF names a complete checkpoint provides (fused parameters expanded)."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            module_name, _, param_name = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            prefix = f"{parent}." if parent else ""
            for part in _UNFUSED.get(leaf, (leaf,)):
                names.add(f"{prefix}{part}.{param_name}")
        return names

"""Models and loaders against transformers, the end-to-end oracle.

- SmolLM2 (GGUF, through our cache) vs transformers loading the same GGUF: prefill over a paged
  cache whose blocks are shuffled, then decode steps against HF's own KV cache.
- Tiny random Qwen2 (qkv bias), Qwen3 (q/k norm, tied) and Llama (llama3 RoPE scaling) saved as
  HF folders: ragged batches mixing prefill, a chunked prefill and decode vs HF full forwards.
- GGUF cache: a warm load is fast and gives identical weights; tokenizer and chat template
  match transformers.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from baton.services.engine.layers.attention import AttentionMetadata
from baton.services.engine.loader import LoadedModel, default_gguf_path, load_model
from baton.services.engine.models.base import CausalLM, ModelArchConfig, RopeScaling
from baton.services.engine.models.hf_config import arch_config_from_hf, hf_config_from_arch
from baton.services.engine.models.registry import get_model_class

BLOCK_SIZE = 16


class PagedRunner:
    """Drives a CausalLM over a packed ragged batch with a paged KV cache, like the engine does.

    Every sequence owns max_blocks blocks drawn from a shuffled pool, so logical neighbours are
    never physical neighbours; spare blocks are left unused to catch out-of-table writes.
    """

    def __init__(self, model: CausalLM, num_seqs: int, max_len: int, seed: int = 0) -> None:
        arch = model.config
        self.model = model
        max_blocks = -(-max_len // BLOCK_SIZE)
        num_blocks = num_seqs * max_blocks + 3
        gen = torch.Generator().manual_seed(seed)
        pool = torch.randperm(num_blocks, generator=gen)
        self.block_tables = pool[: num_seqs * max_blocks].view(num_seqs, max_blocks).clone()
        self.kv_cache = torch.zeros(
            arch.num_layers, 2, num_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim
        )
        self.seq_lens = [0] * num_seqs

    @torch.no_grad()
    def step(self, new_tokens: list[list[int]]) -> list[torch.Tensor]:
        """Feed each sequence its new tokens (possibly none) → per-sequence logits [n_new, V]."""
        ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        for s, tokens in enumerate(new_tokens):
            ids += tokens
            positions += range(self.seq_lens[s], self.seq_lens[s] + len(tokens))
            self.seq_lens[s] += len(tokens)
            query_start_loc.append(len(ids))
        pos = torch.tensor(positions, dtype=torch.int64)
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(new_tokens)), torch.tensor([len(t) for t in new_tokens])
        )
        slots = self.block_tables[seq_of_token, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.block_tables,
            seq_lens=list(self.seq_lens),
            query_start_loc=query_start_loc,
            block_size=BLOCK_SIZE,
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.int64), pos, self.kv_cache, meta)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return [logits[query_start_loc[s] : query_start_loc[s + 1]] for s in range(len(new_tokens))]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Close relative to the logit scale, and the same argmax wherever the top-2 gap is real."""
    tol = rel * max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 4 * tol
    assert torch.equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])


# --------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_gguf_path()


SAMPLED = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.29.mlp.gate_up_proj.weight",
    "model.norm.weight",
)


@pytest.fixture(scope="module")
def smol_loads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Cold (converting) then warm (cached) load of "smollm2" in a fresh cache dir.

    The cold model is dropped before the warm load (a few tensors kept for comparison), as a
    later process would start without it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATON_CACHE_DIR", str(tmp_path_factory.mktemp("baton_cache")))
        t0 = time.perf_counter()
        cold = load_model("smollm2")
        cold_s = time.perf_counter() - t0
        cold_arch = cold.arch
        cold_tensors = {name: cold.model.get_parameter(name).clone() for name in SAMPLED}
        del cold
        gc.collect()
        t1 = time.perf_counter()
        warm = load_model("smollm2")
        warm_s = time.perf_counter() - t1
        yield {
            "cold_arch": cold_arch,
            "cold_tensors": cold_tensors,
            "warm": warm,
            "cold_s": cold_s,
            "warm_s": warm_s,
        }


@pytest.fixture(scope="module")
def smol(smol_loads: dict[str, Any]) -> LoadedModel:
    loaded: LoadedModel = smol_loads["warm"]
    return loaded


@pytest.fixture(scope="module")
def hf_smol(request: pytest.FixtureRequest, gguf_path: Path) -> Any:
    """transformers on the same GGUF; reuses conftest's session-wide copy when one exists."""
    try:
        return request.getfixturevalue("hf_smollm2")
    except pytest.FixtureLookupError:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()


@pytest.fixture(scope="module")
def hf_smol_tokenizer(gguf_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


CONVERSATION = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
    {"role": "assistant", "content": "Paris."},
]


@pytest.mark.slow
def test_smollm2_prefill_and_decode_match_hf(smol: LoadedModel, hf_smol: Any) -> None:
    assert smol.model_id == "SmolLM2-135M-Instruct"
    assert smol.arch.tie_word_embeddings and smol.arch.num_layers == 30
    tok = smol.tokenizer
    assert tok is not None
    prompt = tok.encode(tok.apply_chat_template(CONVERSATION[:1]))
    runner = PagedRunner(smol.model, num_seqs=1, max_len=len(prompt) + 8, seed=1)
    with torch.no_grad():
        out = hf_smol(torch.tensor([prompt]), use_cache=True)
    (ours,) = runner.step([prompt])
    assert_logits_close(ours, out.logits[0], rel=1e-3)
    past = out.past_key_values
    next_id = int(ours[-1].argmax())
    for _ in range(4):
        (ours,) = runner.step([[next_id]])
        with torch.no_grad():
            out = hf_smol(torch.tensor([[next_id]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        assert_logits_close(ours, out.logits[0], rel=1e-3)
        assert int(ours[-1].argmax()) == int(out.logits[0, -1].argmax())
        next_id = int(ours[-1].argmax())


@pytest.mark.slow
def test_gguf_cache_warm_load_is_fast_and_identical(smol_loads: dict[str, Any]) -> None:
    warm: LoadedModel = smol_loads["warm"]
    timings = {k: round(smol_loads[k], 2) for k in ("cold_s", "warm_s")}
    assert smol_loads["warm_s"] < 2.0, timings
    assert warm.arch == smol_loads["cold_arch"]
    for name, cold_tensor in smol_loads["cold_tensors"].items():
        assert torch.equal(warm.model.get_parameter(name), cold_tensor), name


@pytest.mark.slow
def test_gguf_weights_match_transformers_dequantization(smol: LoadedModel, hf_smol: Any) -> None:
    """Q/K un-permutation and fusion: our fused rows are exactly HF's q, k, v rows."""
    hf_layer = hf_smol.model.layers[3].self_attn
    qkv = smol.model.get_parameter("model.layers.3.self_attn.qkv_proj.weight")
    expected = torch.cat([hf_layer.q_proj.weight, hf_layer.k_proj.weight, hf_layer.v_proj.weight])
    assert torch.equal(qkv, expected)


@pytest.mark.slow
def test_tokenizer_and_chat_template_match_transformers(
    smol: LoadedModel, hf_smol_tokenizer: Any
) -> None:
    tok = smol.tokenizer
    assert tok is not None
    assert tok.eos_token_ids == (hf_smol_tokenizer.eos_token_id,)
    assert tok.bos_token_id == hf_smol_tokenizer.bos_token_id
    assert tok.vocab_size == len(hf_smol_tokenizer)
    for add_generation_prompt in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
        ref = hf_smol_tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == ref
    text = "Hello, world! Ünïcödé and   spaces\n<|im_start|>user"
    ids = tok.encode(text)
    assert ids == hf_smol_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_smol_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.id_to_token(ids[0]) == hf_smol_tokenizer.convert_ids_to_tokens(ids[0])


# --------------------------------------------------------------------------- tiny HF models

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}


def _tiny_hf_config(kind: str) -> Any:
    if kind == "qwen2":
        return transformers.Qwen2Config(**TINY, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return transformers.LlamaConfig(
        **TINY, rope_scaling=scaling, rope_theta=10000.0, tie_word_embeddings=False
    )


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama3_scaled"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random HF model (weights spread well beyond init scale, norms and biases non-trivial)
    saved as safetensors without a tokenizer, and the same folder loaded by us."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_tiny_hf_config(request.param))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    hf.eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, load_model(str(folder))


def test_tiny_models_ragged_batch_match_hf(tiny: Any) -> None:
    hf, loaded = tiny
    assert loaded.tokenizer is None
    arch = loaded.arch
    assert arch.attention_bias == (hf.config.model_type == "qwen2")
    assert arch.qk_norm == (hf.config.model_type == "qwen3")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 37, 20)]
    runner = PagedRunner(loaded.model, num_seqs=3, max_len=48, seed=2)
    seqs = [list(p) for p in prompts]  # every token fed so far, per sequence
    computed: list[list[torch.Tensor]] = [[], [], []]

    def feed(new: list[list[int]]) -> None:
        for s, logits in enumerate(runner.step(new)):
            computed[s].append(logits)

    def greedy(s: int) -> int:
        return int(torch.cat(computed[s])[-1].argmax())

    # Step 1: two full prefills and the first 11 tokens of sequence 2 (a chunked prefill).
    feed([prompts[0], prompts[1], prompts[2][:11]])
    # Step 2: a decode, an idle sequence, and the rest of the chunk (offset causal mask).
    seqs[0].append(greedy(0))
    feed([[seqs[0][-1]], [], prompts[2][11:]])
    # Steps 3-5: greedy decode of all three.
    for _ in range(3):
        for s in range(3):
            seqs[s].append(greedy(s))
        feed([[seq[-1]] for seq in seqs])

    for s in range(3):
        ours = torch.cat(computed[s])
        with torch.no_grad():
            ref = hf(torch.tensor([seqs[s]])).logits[0]
        # Greedy identical: every token we appended is HF's argmax at the previous position.
        assert ours.shape == ref.shape
        assert_logits_close(ours, ref)
        generated = seqs[s][len(prompts[s]) :]
        assert generated == ref[len(prompts[s]) - 1 : -1].argmax(-1).tolist()


def test_tiny_model_bf16_close_to_fp32(tiny: Any) -> None:
    _, loaded = tiny
    tokens = list(range(3, 15))
    (ref,) = PagedRunner(loaded.model, num_seqs=1, max_len=16).step([tokens])
    model_bf16 = get_model_class(loaded.arch.architecture)(loaded.arch, dtype=torch.bfloat16)
    model_bf16.load_weights(_hf_named_tensors(loaded.model))
    runner = PagedRunner(model_bf16, num_seqs=1, max_len=16)
    runner.kv_cache = runner.kv_cache.to(torch.bfloat16)
    (ours,) = runner.step([tokens])
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def _hf_named_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Split our fused parameters back into HF-named tensors (inverse of load_weights)."""
    arch = model.config
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    for name, param in model.named_parameters():
        if ".qkv_proj." in name:
            for part, chunk in zip(
                ("q_proj", "k_proj", "v_proj"), param.split([q, kv, kv]), strict=True
            ):
                yield name.replace("qkv_proj", part), chunk
        elif ".gate_up_proj." in name:
            for part, chunk in zip(("gate_proj", "up_proj"), param.chunk(2), strict=True):
                yield name.replace("gate_up_proj", part), chunk
        else:
            yield name, param


# --------------------------------------------------------------------------- configs, loaders


def test_arch_config_from_hf_variants() -> None:
    legacy = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "eos_token_id": [128001, 128008, 128009],
        "bos_token_id": 128000,
        "max_position_embeddings": 131072,
    }
    arch = arch_config_from_hf(legacy)
    assert arch.architecture == "llama" and arch.head_dim == 128
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert arch.eos_token_ids == (128001, 128008, 128009)
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **legacy["rope_scaling"]}
    v5["eos_token_id"] = 128009
    arch5 = arch_config_from_hf(v5)
    assert arch5.rope_scaling == arch.rope_scaling and arch5.rope_theta == 500000.0
    assert arch5.eos_token_ids == (128009,)
    # Round trip through the config we write into the GGUF cache.
    assert arch_config_from_hf(hf_config_from_arch(arch)) == arch
    qwen3 = arch_config_from_hf({**v5, "model_type": "qwen3", "head_dim": None})
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 128
    with pytest.raises(NotImplementedError):
        arch_config_from_hf({**v5, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_dummy_loader_is_seeded_and_runs(tmp_path: Path) -> None:
    config = hf_config_from_arch(
        ModelArchConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    a, b = load_model(f"dummy:{path}", seed=3), load_model(f"dummy:{path}", seed=3)
    c = load_model(f"dummy:{path}", seed=4)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])
    assert 0.01 < pa[name].std().item() < 0.03
    assert torch.equal(pa["model.norm.weight"], torch.ones(32))
    assert a.tokenizer is None and a.model_id == f"dummy-{tmp_path.name}"
    runner = PagedRunner(a.model, num_seqs=2, max_len=20)
    out = runner.step([[1, 2, 3], list(range(17))])
    assert out[0].shape == (3, 128) and torch.isfinite(out[1]).all()


def test_load_model_rejects_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_model(str(tmp_path / "nope"))

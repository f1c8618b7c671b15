"""Attention backends behind one contract: the registry's names and errors, the CPU default,
and the torch backend's plan + write + forward against kernels/attention_ref and a dense
float64 oracle on random ragged batches. (The Triton backend against this one, under the
interpreter: tests/kernels/test_triton_attention_backend.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from baton.kernels import attention_ref
from baton.services.engine.attention.base import (
    AttentionBackend,
    AttentionBackendUnavailable,
    AttentionSpec,
)
from baton.services.engine.attention.registry import (
    available_backends,
    backend_choices,
    backend_class,
    backend_names,
    create_backend,
    resolve_backend_name,
    supports_cuda_graphs,
)
from baton.services.engine.attention.torch_ref import TorchAttentionBackend
from baton.services.engine.config import EngineConfig
from baton.services.engine.layers.attention import Attention, AttentionMetadata
from baton.services.engine.models.base import ModelArchConfig
from baton.services.engine.models.llama import LlamaForCausalLM
from baton.services.engine.runner import ModelRunner

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 16, 4
SPEC = AttentionSpec(HEADS, KV_HEADS, DIM, torch.float32)
CPU = torch.device("cpu")
# (cached tokens, new tokens): prefill from scratch, decodes, chunked prefills over a cached
# prefix, a sequence with no new tokens this step, a decode at a block boundary.
MIXED = [(0, 7), (13, 1), (9, 6), (0, 1), (22, 1), (5, 0), (3, 9), (15, 1)]


@dataclass(frozen=True)
class Step:
    """One random step over a paged cache, with every token's K/V also kept dense."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]
    dense_k: list[torch.Tensor]
    """Per sequence: its whole context's K after this step, in position order."""
    dense_v: list[torch.Tensor]


def random_step(seqs: list[tuple[int, int]], seed: int = 0) -> Step:
    """Blocks from a shuffled pool (table padding names real blocks, so reading it would change
    the result), old context already in the cache, the new tokens' q/k/v packed."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-max(c + n, 1) // BLOCK) for c, n in seqs]
    num_blocks = sum(pages) + 3
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g)
    pool = torch.randperm(num_blocks, generator=g).tolist()
    width = max(pages) + 1
    tables, slots, seq_lens, qsl = [], [], [], [0]
    old: list[list[int]] = []
    for (cached, new), num_pages in zip(seqs, pages, strict=True):
        blocks, pool = pool[:num_pages], pool[num_pages:]
        tables.append(blocks + [pool[0]] * (width - num_pages))
        seq_slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached + new)]
        slots += seq_slots[cached:]
        old.append(seq_slots[:cached])
        seq_lens.append(cached + new)
        qsl.append(qsl[-1] + new)
    q = torch.randn(qsl[-1], HEADS, DIM, generator=g)
    k = torch.randn(qsl[-1], KV_HEADS, DIM, generator=g)
    v = torch.randn(qsl[-1], KV_HEADS, DIM, generator=g)
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, DIM), v_cache.view(-1, KV_HEADS, DIM)
    rows = [slice(qsl[s], qsl[s + 1]) for s in range(len(seqs))]
    return Step(
        q=q,
        k=k,
        v=v,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=torch.tensor(tables, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        seq_lens=seq_lens,
        query_start_loc=qsl,
        dense_k=[torch.cat([flat_k[o], k[r]]) for o, r in zip(old, rows, strict=True)],
        dense_v=[torch.cat([flat_v[o], v[r]]) for o, r in zip(old, rows, strict=True)],
    )


def dense_oracle(step: Step, scale: float) -> torch.Tensor:
    """Per sequence, softmax(q k^T) v in float64 over its whole context, causal with the new
    tokens last; grouped-query heads by repetition."""
    qsl = step.query_start_loc
    out = torch.zeros(step.q.shape, dtype=torch.float64)
    for s, seq_len in enumerate(step.seq_lens):
        q = step.q[qsl[s] : qsl[s + 1]].double()
        k = step.dense_k[s].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = step.dense_v[s].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        scores.masked_fill_(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
        out[qsl[s] : qsl[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def run_backend(backend: AttentionBackend, step: Step, scale: float) -> torch.Tensor:
    """plan + write_kv + forward on copies of the step's caches."""
    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    plan = backend.plan(step.block_tables, step.seq_lens, step.query_start_loc, BLOCK)
    backend.write_kv(step.k, step.v, k_cache, v_cache, step.slot_mapping)
    return backend.forward(step.q, k_cache, v_cache, plan, scale)


# ---- the registry


def test_registry_lists_the_three_backends_and_config_accepts_each() -> None:
    assert backend_names() == ("torch", "triton", "flashinfer")
    assert backend_choices() == ("auto", "torch", "triton", "flashinfer")
    for name in backend_choices():
        assert EngineConfig(attention_backend=name).attention_backend == name
    assert "torch" in available_backends("cpu")
    assert "flashinfer" not in available_backends("cpu")


def test_unknown_backend_errors_list_the_known_names() -> None:
    for call in (
        lambda: backend_class("flash"),
        lambda: create_backend("flash", SPEC, CPU),
        lambda: EngineConfig(attention_backend="flash"),
    ):
        with pytest.raises(ValueError, match="flash") as err:
            call()
        assert all(name in str(err.value) for name in backend_choices()), err.value


def test_flashinfer_on_cpu_is_a_clear_error() -> None:
    assert issubclass(AttentionBackendUnavailable, RuntimeError)  # what the runner raised before
    with pytest.raises(AttentionBackendUnavailable, match="'flashinfer' runs on cuda, not cpu"):
        create_backend("flashinfer", SPEC, CPU)
    arch = ModelArchConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=HEADS,
        num_kv_heads=KV_HEADS, head_dim=DIM,
    )  # fmt: skip
    model = LlamaForCausalLM(arch)
    with pytest.raises(AttentionBackendUnavailable, match="available on cpu: torch"):
        ModelRunner(model, 8, BLOCK, torch.float32, CPU, attention_backend="flashinfer")
    # The engine's default name, and "auto", run the reference on CPU (as they always have).
    for name in ("triton", "auto", "torch"):
        runner = ModelRunner(model, 8, BLOCK, torch.float32, CPU, attention_backend=name)
        assert isinstance(runner.attn_backend, TorchAttentionBackend)
        assert runner.graphs is None


def test_cpu_path_never_imports_triton() -> None:
    """Capabilities are read without importing kernels; a CPU engine's backend is the torch
    one, with Triton left unimported (its interpreter switch is read at import)."""
    code = textwrap.dedent(
        """
        import sys, torch
        from baton.services.engine.attention.base import AttentionSpec
        from baton.services.engine.attention.registry import backend_class, create_backend
        from baton.services.engine.config import EngineConfig

        spec = AttentionSpec(4, 2, 16, torch.float32)
        assert create_backend("triton", spec, torch.device("cpu")).name == "torch"
        assert backend_class("triton").supports_cuda_graphs
        assert EngineConfig(device="cuda").graph_max_batch == 64
        assert EngineConfig().graph_max_batch == 0
        assert "triton" not in sys.modules, "triton imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_capabilities_decide_cuda_graphs() -> None:
    assert supports_cuda_graphs("triton") and supports_cuda_graphs("auto")
    assert not supports_cuda_graphs("flashinfer") and not supports_cuda_graphs("torch")
    for name, graphs in (("triton", 8), ("auto", 8), ("flashinfer", 0), ("torch", 0)):
        config = EngineConfig(device="cuda", attention_backend=name, cuda_graph_max_batch=8)
        assert config.graph_max_batch == graphs, name
    folds = {name: backend_class(name).folds_prologue for name in backend_names()}
    assert folds == {"torch": False, "triton": True, "flashinfer": False}
    assert resolve_backend_name("auto", "cuda") == "triton"
    assert resolve_backend_name("auto", "cpu") == resolve_backend_name("triton", "cpu") == "torch"


# ---- the torch backend


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_backend_matches_attention_ref_and_a_dense_oracle(seed: int) -> None:
    step = random_step(MIXED, seed)
    scale = DIM**-0.5
    got = run_backend(create_backend("torch", SPEC, CPU), step, scale)

    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    attention_ref.write_kv_cache(step.k, step.v, k_cache, v_cache, step.slot_mapping)
    plan = attention_ref.plan_attention(
        step.block_tables, step.seq_lens, step.query_start_loc, BLOCK
    )
    want = attention_ref.paged_attention(step.q, k_cache, v_cache, plan, scale)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), dense_oracle(step, scale), atol=1e-5, rtol=1e-5)


def test_layer_attends_through_the_metadata_backend_planning_once_per_step() -> None:
    """Two layers share one plan; hand-built metadata (no backend) plans with the reference."""
    plans = []

    class Counting(TorchAttentionBackend):
        def plan(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            plans.append(super().plan(*args, **kwargs))
            return plans[-1]

    step = random_step(MIXED, seed=3)
    scale = DIM**-0.5
    layer = Attention(HEADS, KV_HEADS, DIM, scale)
    kv = torch.stack([step.k_cache, step.v_cache])
    want = dense_oracle(step, scale).flatten(1)
    for backend in (Counting(), TorchAttentionBackend(), None):
        meta = AttentionMetadata(
            slot_mapping=step.slot_mapping,
            block_tables=step.block_tables,
            seq_lens=step.seq_lens,
            query_start_loc=step.query_start_loc,
            block_size=BLOCK,
            **({} if backend is None else {"backend": backend}),
        )
        caches = [kv.clone(), kv.clone()]
        outs = [layer(step.q.flatten(1), step.k, step.v, c, meta) for c in caches]
        assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])
        torch.testing.assert_close(outs[0].double(), want, atol=1e-5, rtol=1e-5)
        assert not meta.static_inputs and not layer.can_fold_prologue(meta)
    assert len(plans) == 1
    # A plan the caller made is used as is.
    meta = AttentionMetadata(
        slot_mapping=step.slot_mapping,
        block_tables=step.block_tables,
        seq_lens=step.seq_lens,
        query_start_loc=step.query_start_loc,
        block_size=BLOCK,
        backend=Counting(),
        planned=plans[0],
    )
    assert meta.plan is plans[0] and len(plans) == 1

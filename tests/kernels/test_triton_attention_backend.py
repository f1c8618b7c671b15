"""The Triton attention backend (services/engine/attention/triton.py) against the torch one on
the same random steps: plan + write_kv + forward on a mixed batch, the CUDA-graph decode plan
over static buffers with a padding row, and when the folded prologue may run.

Runs on CUDA when there is a device; otherwise under Triton's CPU interpreter (conftest.py
sets TRITON_INTERPRET=1 before triton is imported), with small shapes.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.services.engine.attention.base import AttentionSpec  # noqa: E402
from baton.services.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from baton.services.engine.attention.triton import (  # noqa: E402
    FOLD_PROLOGUE_MAX_ROWS,
    TritonAttentionBackend,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 16
SPEC = AttentionSpec(HEADS, KV_HEADS, DIM, torch.float32)
# (cached tokens, new tokens): prefill from scratch, decodes, chunked prefills over a cached
# prefix (one longer than a 64-row prefill tile), a sequence with no new tokens this step.
MIXED = [(0, 9), (40, 1), (21, 70), (0, 1), (33, 1), (7, 0), (16, 5), (63, 1)]


def random_step(seqs: list[tuple[int, int]], seed: int) -> tuple[Any, ...]:
    """(q, k, v, k_cache, v_cache, block_tables, slot_mapping), seq_lens, query_start_loc:
    random old context in a cache of shuffled blocks whose table padding names real blocks."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-max(c + n, 1) // BLOCK) for c, n in seqs]
    num_blocks = sum(pages) + 2
    pool = torch.randperm(num_blocks, generator=g).tolist()
    width = max(pages) + 1
    tables, slots, seq_lens, qsl = [], [], [], [0]
    for (cached, new), num_pages in zip(seqs, pages, strict=True):
        blocks, pool = pool[:num_pages], pool[num_pages:]
        tables.append(blocks + [pool[0]] * (width - num_pages))
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
        seq_lens.append(cached + new)
        qsl.append(qsl[-1] + new)
    tensors = (
        torch.randn(qsl[-1], HEADS, DIM, generator=g),
        torch.randn(qsl[-1], KV_HEADS, DIM, generator=g),
        torch.randn(qsl[-1], KV_HEADS, DIM, generator=g),
        torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g),
        torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g),
        torch.tensor(tables, dtype=torch.int64),
        torch.tensor(slots, dtype=torch.int64),
    )
    return (*(t.to(DEVICE) for t in tensors), seq_lens, qsl)


@pytest.fixture(scope="module")
def triton_backend() -> TritonAttentionBackend:
    return TritonAttentionBackend(SPEC, DEVICE)


def test_write_and_forward_match_the_torch_backend(triton_backend: TritonAttentionBackend) -> None:
    q, k, v, k_cache, v_cache, tables, slots, seq_lens, qsl = random_step(MIXED, seed=0)
    scale = DIM**-0.5
    outs, caches = [], []
    for backend in (triton_backend, TorchAttentionBackend()):
        kc, vc = k_cache.clone(), v_cache.clone()
        plan = backend.plan(tables, seq_lens, qsl, BLOCK)
        backend.write_kv(k, v, kc, vc, slots)
        outs.append(backend.forward(q, kc, vc, plan, scale))
        caches.append((kc, vc))
        assert not backend.static_inputs(plan)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)


def test_static_decode_plan_reads_the_graph_buffers(triton_backend: TritonAttentionBackend) -> None:
    """A bucket of 4 over int32 table / int64 seq_len buffers (a CUDA graph's), 3 real rows and
    a padding row (seq_len 0: zeros), planned once and run after the buffers are refilled."""
    q, k, v, k_cache, v_cache, tables, slots, seq_lens, qsl = random_step(
        [(40, 1), (3, 1), (70, 1)], seed=1
    )
    bucket, max_len = 4, 128
    table_buf = torch.zeros(bucket, max_len // BLOCK, dtype=torch.int32, device=DEVICE)
    lens_buf = torch.zeros(bucket, dtype=torch.int64, device=DEVICE)
    plan = triton_backend.plan_static_decode(table_buf, lens_buf, BLOCK, max_len)
    assert triton_backend.static_inputs(plan)
    assert triton_backend.can_fold_prologue(plan)  # 4 rows, in order

    table_buf[:3, : tables.shape[1]] = tables.to(torch.int32)
    lens_buf[:3] = torch.tensor(seq_lens)
    padded_q = torch.cat([q, torch.randn(1, HEADS, DIM, device=DEVICE)])
    for c in (k_cache, v_cache):
        c.view(-1, KV_HEADS, DIM)[slots] = 0  # the new tokens' slots: filled by write_kv
    ref = TorchAttentionBackend()
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    ref.write_kv(k, v, want_kc, want_vc, slots)
    want = ref.forward(q, want_kc, want_vc, ref.plan(tables, seq_lens, qsl, BLOCK), DIM**-0.5)
    padded_slots = torch.cat([slots, torch.tensor([-1], device=DEVICE)])  # padding: no write
    padded_k = torch.cat([k, torch.randn(1, KV_HEADS, DIM, device=DEVICE)])
    padded_v = torch.cat([v, torch.randn(1, KV_HEADS, DIM, device=DEVICE)])
    triton_backend.write_kv(padded_k, padded_v, k_cache, v_cache, padded_slots)
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)
    got = triton_backend.forward(padded_q, k_cache, v_cache, plan, DIM**-0.5)
    torch.testing.assert_close(got[:3], want, atol=2e-5, rtol=2e-5)
    assert torch.equal(got[3], torch.zeros_like(got[3]))


def test_prologue_folds_only_for_small_in_order_decode_steps(
    triton_backend: TritonAttentionBackend,
) -> None:
    def foldable(backend: TritonAttentionBackend, seqs: list[tuple[int, int]]) -> bool:
        *_, tables, _, seq_lens, qsl = random_step(seqs, seed=2)
        return backend.can_fold_prologue(backend.plan(tables, seq_lens, qsl, BLOCK))

    decodes = [(5 + 9 * i, 1) for i in range(FOLD_PROLOGUE_MAX_ROWS + 1)]
    assert foldable(triton_backend, decodes[:1])
    assert foldable(triton_backend, decodes[:FOLD_PROLOGUE_MAX_ROWS])
    assert not foldable(triton_backend, decodes)  # too many rows
    assert not foldable(triton_backend, [(5, 1), (9, 3)])  # a prefill in the step
    assert not foldable(triton_backend, [(5, 1), (9, 0), (7, 1)])  # decodes out of row order
    odd_head_dim = TritonAttentionBackend(AttentionSpec(HEADS, KV_HEADS, 24, SPEC.dtype), DEVICE)
    assert not foldable(odd_head_dim, decodes[:1])

"""FlashInfer paged attention (decode, prefill over a cached prefix, mixed) vs attention_ref.

bf16 on CUDA, Llama-3-8B-like heads (32 query, 8 KV, head_dim 128, block 16). Skips without a
GPU or without flashinfer (the wheels in .whl/, `pip install --no-deps --target`). The first
plan JIT-compiles FlashInfer's kernels (nvcc and ninja needed), which can take minutes.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from baton.kernels import attention_ref
from baton.kernels.flashinfer_attention import flashinfer_paged_attention, plan_flashinfer


def _skip_reason() -> str | None:
    """Why this module cannot run here, with flashinfer's import error if that is the cause."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        importlib.import_module("flashinfer")
    except (ImportError, OSError) as e:
        return f"needs flashinfer: {e!r}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
]

HEADS, KV_HEADS, DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
WORKSPACE_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="module")
def workspace() -> torch.Tensor:
    """One float workspace for the module, zeroed (FlashInfer wants zeros on first use)."""
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")


def make_batch(
    seqs: list[tuple[int, int]],
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Random bf16 caches and queries on CUDA for sequences given as (cached, new) tokens.

    Blocks come from a shuffled pool (non-contiguous tables); table padding names random real
    blocks, so reading it would change the result. q is a slice of a wider packed qkv tensor
    (row stride != heads * head_dim). New tokens' K/V go in with attention_ref.write_kv_cache.
    """
    g = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in seqs]
    needed = [-(-max(t, 1) // BLOCK_SIZE) for t in totals]
    num_blocks = sum(needed) + 5
    shape = (num_blocks, BLOCK_SIZE, kv_heads, DIM)
    k_cache = torch.randn(shape, generator=g).to(DTYPE)
    v_cache = torch.randn(shape, generator=g).to(DTYPE)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 2
    tables, slots, qsl = [], [], [0]
    for (cached, new), nb in zip(seqs, needed, strict=True):
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + torch.randint(0, num_blocks, (width - nb,), generator=g).tolist())
        slots += [
            blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            for p in range(cached, cached + new)
        ]
        qsl.append(qsl[-1] + new)
    qkv = torch.randn(qsl[-1], heads + 2 * kv_heads, DIM, generator=g).to(DTYPE)
    attention_ref.write_kv_cache(
        qkv[:, heads : heads + kv_heads],
        qkv[:, heads + kv_heads :],
        k_cache,
        v_cache,
        torch.tensor(slots, dtype=torch.int64),
    )
    qkv, k_cache, v_cache = qkv.cuda(), k_cache.cuda(), v_cache.cuda()
    block_tables = torch.tensor(tables, dtype=torch.int64, device="cuda")
    return qkv[:, :heads], k_cache, v_cache, block_tables, totals, qsl


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    qsl: list[int],
    scale: float,
) -> torch.Tensor:
    """attention_ref in float64 on the CPU, on the same (already rounded) bf16 inputs."""
    plan = attention_ref.plan_attention(block_tables.cpu(), seq_lens, qsl, BLOCK_SIZE)
    return attention_ref.paged_attention(
        q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), plan, scale
    )


def run_flashinfer(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    qsl: list[int],
    scale: float,
    workspace: torch.Tensor,
) -> torch.Tensor:
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    plan = plan_flashinfer(
        block_tables, seq_lens, qsl, BLOCK_SIZE, heads, kv_heads, DIM, DTYPE, workspace
    )
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    got = flashinfer_paged_attention(q, k_cache, v_cache, plan, scale, out=out)
    assert got is out and got.dtype == q.dtype and got.shape == q.shape
    assert not got.isnan().any(), "some output elements were never written"
    return got


def assert_close_to(got: torch.Tensor, want: torch.Tensor) -> None:
    """The bf16 bound of tests/kernels/test_triton_attention.py: relative Frobenius error under
    1e-2, plus a per-element bound so no row can hide."""
    tol = 1e-2
    got64 = got.cpu().double()
    rel = float((got64 - want).norm() / want.norm())
    assert rel < tol, rel
    torch.testing.assert_close(got64, want, atol=30 * tol, rtol=30 * tol)


BATCHES = {
    # (cached, new) per sequence
    # contexts 1, 16, 17, 32, 101, 258, 1001, 4096: the minimum, block multiples and not
    "decode": [(0, 1), (15, 1), (16, 1), (31, 1), (100, 1), (257, 1), (1000, 1), (4095, 1)],
    "prefill": [(0, 37), (16, 16), (100, 50), (513, 7), (5, 2), (0, 129)],
    # decode and prefill rows interleaved (both gathered), a sequence with no new tokens
    "mixed": [(0, 23), (40, 1), (17, 9), (5, 1), (12, 0), (1, 1), (100, 35), (0, 1)],
    # decodes first, then prefills: both groups run on slices of q and out
    "mixed_in_order": [(30, 1), (7, 1), (300, 1), (0, 20), (64, 33), (9, 0)],
}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_reference(batch: str, workspace: torch.Tensor) -> None:
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(BATCHES[batch], seed=len(batch))
    scale = 1 / math.sqrt(DIM)
    got = run_flashinfer(q, k_cache, v_cache, tables, seq_lens, qsl, scale, workspace)
    assert_close_to(got, reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale))


def test_mha_mixed(workspace: torch.Tensor) -> None:
    """No GQA (8/8 heads): decodes go to FlashInfer's CUDA-core decode kernel; another scale."""
    seqs = [(50, 1), (0, 17), (200, 1), (33, 4)]
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(seqs, heads=8, kv_heads=8, seed=3)
    scale = 0.7 / math.sqrt(DIM)
    got = run_flashinfer(q, k_cache, v_cache, tables, seq_lens, qsl, scale, workspace)
    assert_close_to(got, reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale))


def test_one_plan_serves_every_layer(workspace: torch.Tensor) -> None:
    """One plan, two layers (two caches, same tables); a newer plan makes the old one stale."""
    seqs = BATCHES["mixed"]
    q, k0, v0, tables, seq_lens, qsl = make_batch(seqs, seed=10)
    _, k1, v1, _, _, _ = make_batch(seqs, seed=11)
    scale = 1 / math.sqrt(DIM)
    plan = plan_flashinfer(
        tables, seq_lens, qsl, BLOCK_SIZE, HEADS, KV_HEADS, DIM, DTYPE, workspace
    )
    for k_cache, v_cache in ((k0, v0), (k1, v1)):
        got = flashinfer_paged_attention(q, k_cache, v_cache, plan, scale)
        assert_close_to(got, reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale))
    plan_flashinfer(tables, seq_lens, qsl, BLOCK_SIZE, HEADS, KV_HEADS, DIM, DTYPE, workspace)
    with pytest.raises(AssertionError, match="stale plan"):
        flashinfer_paged_attention(q, k0, v0, plan, scale)


def test_wrapper_checks_inputs(workspace: torch.Tensor) -> None:
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch([(3, 1), (0, 5)])
    plan = plan_flashinfer(
        tables, seq_lens, qsl, BLOCK_SIZE, HEADS, KV_HEADS, DIM, DTYPE, workspace
    )
    with pytest.raises(AssertionError):  # cache dtype differs from the plan's
        flashinfer_paged_attention(q, k_cache.half(), v_cache.half(), plan, 1.0)
    with pytest.raises(AssertionError):  # wrong number of rows
        flashinfer_paged_attention(q[:-1], k_cache, v_cache, plan, 1.0)
    with pytest.raises(AssertionError):  # head_dim differs from the plan
        flashinfer_paged_attention(q[..., :64], k_cache, v_cache, plan, 1.0)

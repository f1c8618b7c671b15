"""Triton paged attention (decode split-KV, prefill/extend, mixed wrapper) vs attention_ref.

Runs on CUDA when there is a device; otherwise under Triton's CPU interpreter (TRITON_INTERPRET=1
must be set before triton is imported), with small shapes so the module stays fast. On a GPU that
supports it, the decode kernel also runs with programmatic dependent launch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.kernels import attention_ref, pdl  # noqa: E402
from baton.kernels.triton_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention,
    plan_attention,
    triton_paged_attention,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


HEADS, KV_HEADS, DIM = 4, 2, 32


def make_batch(
    seqs: list[tuple[int, int]],
    dtype: torch.dtype,
    block_size: int = 16,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    dim: int = DIM,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Random caches and queries for sequences given as (cached tokens, new tokens).

    Blocks are drawn from a shuffled pool (non-contiguous tables); table padding names random
    real blocks, so reading it would change the result. q is a slice of a wider packed qkv
    tensor (row stride != heads * dim). The new tokens' K/V are written with write_kv_cache.
    """
    g = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in seqs]
    needed = [-(-max(t, 1) // block_size) for t in totals]
    num_blocks = sum(needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 2
    tables, slots, qsl = [], [], [0]
    for (cached, new), nb in zip(seqs, needed, strict=True):
        blocks = [perm.pop() for _ in range(nb)]
        pad = torch.randint(0, num_blocks, (width - nb,), generator=g).tolist()
        tables.append(blocks + pad)
        slots += [
            blocks[p // block_size] * block_size + p % block_size
            for p in range(cached, cached + new)
        ]
        qsl.append(qsl[-1] + new)
    num_tokens = qsl[-1]
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    q = qkv[:, :heads]
    attention_ref.write_kv_cache(
        qkv[:, heads : heads + kv_heads],
        qkv[:, heads + kv_heads :],
        k_cache,
        v_cache,
        torch.tensor(slots, dtype=torch.int64),
    )
    block_tables = torch.tensor(tables, dtype=torch.int64)
    return (
        q.to(DEVICE),
        k_cache.to(DEVICE),
        v_cache.to(DEVICE),
        block_tables.to(DEVICE),
        totals,
        qsl,
    )


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    qsl: list[int],
    scale: float,
) -> torch.Tensor:
    """attention_ref in float64 on the CPU, on the same (already rounded) inputs."""
    plan = attention_ref.plan_attention(block_tables.cpu(), seq_lens, qsl, k_cache.shape[1])
    return attention_ref.paged_attention(
        q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), plan, scale
    )


def run_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    qsl: list[int],
    scale: float,
    **plan_kwargs: int,
) -> torch.Tensor:
    meta = plan_attention(
        block_tables, seq_lens, qsl, k_cache.shape[1], k_cache.shape[2], **plan_kwargs
    )
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    got = triton_paged_attention(q, k_cache, v_cache, meta, scale, out=out)
    assert got is out and got.dtype == q.dtype and got.shape == q.shape
    assert not got.isnan().any(), "some output elements were never written"
    return got


def assert_close_to(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative Frobenius error (METHOD.md) plus a per-element bound so no row can hide."""
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    got64 = got.cpu().double()
    rel = float((got64 - want).norm() / want.norm())
    assert rel < tol, rel
    torch.testing.assert_close(got64, want, atol=30 * tol, rtol=30 * tol)


BATCHES = {
    # (cached, new) per sequence
    "decode_short": [(4, 1), (16, 1), (40, 1), (0, 1)],
    "decode_long": [(700, 1), (333, 1), (1000, 1)],
    "prefill": [(0, 23), (0, 40), (0, 2)],
    "prefill_prefix": [(17, 9), (50, 70), (33, 2)],
    "mixed": [(0, 23), (40, 1), (17, 9), (5, 1), (12, 0), (1, 1), (100, 35)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_reference(batch: str, dtype: torch.dtype) -> None:
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(BATCHES[batch], dtype, seed=len(batch))
    scale = 1 / math.sqrt(DIM)
    got = run_triton(q, k_cache, v_cache, tables, seq_lens, qsl, scale, prefill_block_m=16)
    assert_close_to(got, reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale), dtype)


@pytest.mark.parametrize(
    ("block_size", "heads", "kv_heads", "dim", "block_m"),
    [(4, 4, 1, 64, 16), (32, 6, 2, 48, 64), (128, 2, 2, 16, 32), (16, 16, 1, 32, 16)],
)
def test_shapes_mixed(block_size: int, heads: int, kv_heads: int, dim: int, block_m: int) -> None:
    """Block sizes below and above the 64-token KV tile, MQA and a wide group (16 heads per KV
    head), MHA, and a head_dim that is not a power of two."""
    seqs = [(30, 1), (0, 19), (70, 1), (9, 40)]
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(
        seqs, torch.float32, block_size, heads, kv_heads, dim, seed=block_size
    )
    scale = 0.7 / math.sqrt(dim)
    got = run_triton(
        q, k_cache, v_cache, tables, seq_lens, qsl, scale, prefill_block_m=block_m, num_splits=3
    )
    assert_close_to(
        got, reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale), torch.float32
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_splits_agree(dtype: torch.dtype) -> None:
    """Splitting the context (some splits empty for the short sequence) changes only rounding."""
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch([(600, 1), (37, 1), (250, 1)], dtype)
    scale = 1 / math.sqrt(DIM)
    want = reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale)
    outs = [
        run_triton(q, k_cache, v_cache, tables, seq_lens, qsl, scale, num_splits=n)
        for n in (1, 4, 13)
    ]
    for got in outs:
        assert_close_to(got, want, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got in outs[1:]:
        torch.testing.assert_close(got.float(), outs[0].float(), atol=tol, rtol=tol)


def test_decode_padding_rows_give_zeros() -> None:
    """A CUDA-graph batch padded with seq_len = 0 rows: they write zeros, the others are exact."""
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(
        [(20, 1), (0, 1), (45, 1)], torch.float32
    )
    scale = 1 / math.sqrt(DIM)
    want = reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale)
    lens = torch.tensor([seq_lens[0], 0, seq_lens[2]], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 3):
        out = torch.full(q.shape, float("nan"), device=DEVICE)
        paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits, out=out)
        assert torch.equal(out[1].cpu(), torch.zeros(HEADS, DIM))
        assert_close_to(out[[0, 2]], want[[0, 2]], torch.float32)


@pytest.fixture(params=[False, True], ids=["plain_launch", "pdl_launch"])
def pdl_launch(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Runs a test with PDL launches off, then on (skipped where PDL is unsupported)."""
    on = bool(request.param)
    if on and not pdl.supported(DEVICE):
        pytest.skip("PDL needs a compiled (not interpreted) kernel on compute capability >= 9.0")
    saved = pdl._enabled  # the raw switch: enabled() also folds in the interpreter
    pdl.set_enabled(on)
    yield on
    pdl.set_enabled(saved)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads"),
    [(torch.float32, 4, 2), (torch.bfloat16, 8, 1)],  # GQA groups of 2 and of 8
)
def test_decode_splits_ragged_and_padding(
    num_splits: int, dtype: torch.dtype, heads: int, kv_heads: int, pdl_launch: bool
) -> None:
    """Split-KV plus merge over ragged contexts (some splits empty) and a padding row, with and
    without PDL launches: the reference's output, the same bits on every call, and with
    preload (the short-context path that reads K/V before the PDL wait) too."""
    seqs = [(300, 1), (9, 1), (0, 1), (130, 1), (63, 1)]  # row 2 becomes padding
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch(
        seqs, dtype, heads=heads, kv_heads=kv_heads, seed=num_splits
    )
    scale = 1 / math.sqrt(DIM)
    want = reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    lens[2] = 0
    outs = []
    for preload in (False, False, True):
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
        paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, num_splits, out=out, preload=preload
        )
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "deterministic"
    assert torch.equal(outs[0], outs[2]), "preload (graph buffers) changes no bit"
    assert torch.equal(outs[0][2].cpu(), torch.zeros(heads, DIM, dtype=dtype))
    live = [0, 1, 3, 4]
    assert_close_to(outs[0][live], want[live], dtype)


def test_choose_num_splits() -> None:
    # batch 8 x 8 KV heads = 64 programs on 132 SMs: split a 32k context to fill the chip
    assert 4 <= choose_num_splits(8, 8, 32768, 132) <= 64
    assert choose_num_splits(256, 8, 32768, 132) == 1  # already thousands of programs
    assert choose_num_splits(1, 8, 100, 132) == 1  # too short to be worth a merge
    assert choose_num_splits(0, 8, 0, 132) == 1


def test_wrapper_checks_inputs() -> None:
    q, k_cache, v_cache, tables, seq_lens, qsl = make_batch([(3, 1), (0, 5)], torch.float32)
    meta = plan_attention(tables, seq_lens, qsl, k_cache.shape[1], k_cache.shape[2])
    with pytest.raises(AssertionError):  # cache dtype differs from q
        triton_paged_attention(q, k_cache.to(torch.bfloat16), v_cache, meta, 1.0)
    with pytest.raises(AssertionError):  # wrong number of rows
        triton_paged_attention(q[:-1], k_cache, v_cache, meta, 1.0)
    with pytest.raises(AssertionError):  # head_dim differs from the cache
        triton_paged_attention(q[..., :16], k_cache, v_cache, meta, 1.0)

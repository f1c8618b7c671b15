"""Paged attention (the reference every GPU kernel is tested against) vs naive dense attention."""

from __future__ import annotations

import math

import pytest
import torch

from baton.kernels.attention_ref import paged_attention, plan_attention, write_kv_cache


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, H, D] at the last q_len positions of k, v: [L, Hkv, D]. Loops, no tricks."""
    q_len, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = heads // kv_heads
    out = torch.empty_like(q, dtype=torch.float64)
    for i in range(q_len):
        pos = ctx - q_len + i
        for h in range(heads):
            kh, vh = k[: pos + 1, h // group].double(), v[: pos + 1, h // group].double()
            w = torch.softmax((kh @ q[i, h].double()) * scale, dim=0)
            out[i, h] = w @ vh
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_matches_dense(dtype: torch.dtype, block_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 6, 2, 32
    scale = 1 / math.sqrt(dim)
    # (cached tokens, new tokens): full prefill, chunk after a prefix, decodes, an idle sequence
    seqs = [(0, 23), (17, 9), (40, 1), (5, 1), (1, 1), (12, 0)]
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous, shuffled blocks
    tables, histories, q_parts, new_k, new_v, slots = [], [], [], [], [], []
    seq_lens, qsl = [], [0]
    for cached, new in seqs:
        total = cached + new
        nb = -(-max(total, 1) // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        k_all = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
        v_all = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
        for p in range(cached):  # the prefix is already in the cache
            k_cache[blocks[p // block_size], p % block_size] = k_all[p]
            v_cache[blocks[p // block_size], p % block_size] = v_all[p]
        histories.append((k_all, v_all))
        q_parts.append(torch.randn(new, heads, dim, generator=g).to(dtype))
        new_k.append(k_all[cached:])
        new_v.append(v_all[cached:])
        slots += [
            blocks[p // block_size] * block_size + p % block_size for p in range(cached, total)
        ]
        seq_lens.append(total)
        qsl.append(qsl[-1] + new)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.cat(q_parts)
    write_kv_cache(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, torch.tensor(slots))
    plan = plan_attention(block_tables, seq_lens, qsl, block_size)
    out = paged_attention(q, k_cache, v_cache, plan, scale)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for s, (k_all, v_all) in enumerate(histories):
        if qsl[s + 1] == qsl[s]:
            continue
        want = dense_causal(q_parts[s], k_all, v_all, scale)
        got = out[qsl[s] : qsl[s + 1]].double()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_write_kv_cache_checks_shapes() -> None:
    cache = torch.zeros(4, 4, 2, 8)
    with pytest.raises(AssertionError):
        write_kv_cache(torch.ones(3, 2, 8), torch.ones(3, 2, 8), cache, cache, torch.tensor([0, 1]))

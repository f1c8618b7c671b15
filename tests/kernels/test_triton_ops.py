"""Triton element-wise/row-wise kernels vs their plain-torch references, and the references vs the
engine's layers.

On CUDA the kernels are compiled and run on the GPU; without CUDA they run under Triton's CPU
interpreter (sizes kept small: it runs every program in Python), and a subprocess compiles them
for sm_90 to catch what the interpreter accepts but the compiler rejects. Kernels are checked
against a float64 run of the reference (‖out − ref‖ / ‖ref‖, METHOD.md tolerances) and element
by element against the reference in the model dtype. Outputs are poisoned with NaN first, so an
element the kernel skipped fails the check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton`: triton.jit reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from baton.kernels import ops_ref, triton_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative L2 error vs the float64 oracle: float32 lands far under 1e-3; a few half-precision
# roundings (the kernels round where the engine does) stay well under 1e-2.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# Element-wise vs the reference in the model dtype: a couple of ulps (the interpreter truncates
# float32 -> bfloat16 where the GPU rounds to nearest, adding up to one ulp).
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EPS = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, dtype: torch.dtype, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _poison(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _check(out: torch.Tensor, oracle: torch.Tensor, ref: torch.Tensor) -> None:
    """out vs a float64 oracle (relative L2) and vs the dtype reference (element-wise)."""
    assert out.shape == oracle.shape == ref.shape, (out.shape, oracle.shape, ref.shape)
    assert not out.isnan().any(), "NaN in output: an element was not written"
    diff = (out.double() - oracle.double()).norm() / oracle.double().norm()
    assert diff < REL_TOL[out.dtype], (float(diff), out.dtype)
    tol = ELEM_TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# --- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (3, 4096), (2, 5, 128)])
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = _gen(shape[0] * shape[-1])
    x = _rand(*shape, dtype=dtype, g=g, scale=2.0)
    w = (1.0 + _rand(shape[-1], dtype=torch.float32, g=g, scale=0.2)).to(dtype)
    out = triton_ops.rms_norm(x, w, EPS, out=_poison(*shape, dtype=dtype))
    oracle = ops_ref.rms_norm_ref(x.double(), w.double(), EPS)
    _check(out, oracle, ops_ref.rms_norm_ref(x, w, EPS))


def test_rms_norm_strided_rows() -> None:
    """A row-strided view (every other row of a bigger buffer) is read in place, not copied."""
    g = _gen(1)
    base = _rand(10, 576, dtype=torch.bfloat16, g=g)
    x = base[::2]
    w = _rand(576, dtype=torch.bfloat16, g=g)
    out = triton_ops.rms_norm(x, w, EPS, out=_poison(5, 576, dtype=torch.bfloat16))
    _check(out, ops_ref.rms_norm_ref(x.double(), w.double(), EPS), ops_ref.rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 576), (3, 2048)])
@pytest.mark.parametrize("alias_out", [False, True])
def test_fused_add_rms_norm(dtype: torch.dtype, shape: tuple[int, int], alias_out: bool) -> None:
    g = _gen(shape[0] + shape[1])
    x = _rand(*shape, dtype=dtype, g=g)
    residual = _rand(*shape, dtype=dtype, g=g, scale=3.0)
    w = _rand(shape[1], dtype=dtype, g=g)
    want_out, want_res = ops_ref.fused_add_rms_norm_ref(x, residual, w, EPS)
    oracle_out, oracle_res = ops_ref.fused_add_rms_norm_ref(
        x.double(), residual.double(), w.double(), EPS
    )
    res = residual.clone()
    xin = x.clone()
    out_buf = xin if alias_out else _poison(*shape, dtype=dtype)
    out, new_res = triton_ops.fused_add_rms_norm(xin, res, w, EPS, out=out_buf)
    assert new_res.data_ptr() == res.data_ptr() and out.data_ptr() == out_buf.data_ptr()
    _check(new_res, oracle_res, want_res)
    _check(out, oracle_out, want_out)
    if DEVICE == "cuda":
        # Same single rounding of the same float32 sum: bit-exact with the engine's add.
        assert torch.equal(new_res, want_res)


# --- Rotary embedding -------------------------------------------------------------------------


def _qkv_views(
    num_tokens: int, hq: int, hk: int, head_dim: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv and its q, k strided views, as the engine's fused QKV projection produces them."""
    qkv = _rand(num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype, g=g)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(num_tokens, hk, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_embedding(
    dtype: torch.dtype, head_dim: int, heads: tuple[int, int], inplace: bool
) -> None:
    hq, hk = heads
    num_tokens, max_positions = 5, 40
    g = _gen(head_dim * hq + hk)
    qkv, q, k = _qkv_views(num_tokens, hq, hk, head_dim, dtype, g)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=g).to(DEVICE)
    angles = torch.rand(max_positions, head_dim // 2, generator=g, dtype=torch.float64) * 6.3
    cos_half, sin_half = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    cos_m, sin_m = cos_half.to(dtype), sin_half.to(dtype)  # the engine keeps model-dtype tables
    want_q, want_k = (ops_ref.rope_ref(t, positions, cos_m, sin_m) for t in (q, k))
    oracle_q, oracle_k = (
        ops_ref.rope_ref(t.double(), positions, cos_m.double(), sin_m.double()) for t in (q, k)
    )
    qkv_in = qkv.clone()
    # Freed NaN blocks are what CUDA's caching allocator hands back for the fresh outputs, so an
    # element the kernel skips stays NaN there (on the CPU this is best effort).
    del_q, del_k = _poison(*q.shape, dtype=dtype), _poison(*k.shape, dtype=dtype)
    del del_q, del_k
    got_q, got_k = triton_ops.rotary_embedding(positions, q, k, cos_m, sin_m, inplace=inplace)
    v_cols = slice((hq + hk) * head_dim, None)
    assert torch.equal(qkv[:, v_cols], qkv_in[:, v_cols]), "v must be untouched"
    if inplace:
        assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    else:
        assert torch.equal(qkv, qkv_in), "out of place must not touch q, k"
    _check(got_q, oracle_q, want_q)
    _check(got_k, oracle_k, want_k)


# --- SiLU and multiply ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (6, 576), (3, 3000), (2, 3, 200)])
def test_silu_and_mul(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = _gen(shape[0] * shape[-1])
    x = _rand(*shape[:-1], 2 * shape[-1], dtype=dtype, g=g, scale=2.0)
    out = triton_ops.silu_and_mul(x, out=_poison(*shape, dtype=dtype))
    _check(out, ops_ref.silu_and_mul_ref(x.double()), ops_ref.silu_and_mul_ref(x))


# --- KV-cache write ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_kv_cache(dtype: torch.dtype, head_dim: int, slot_dtype: torch.dtype) -> None:
    num_blocks, block_size, hk = 6, 4, 2
    g = _gen(head_dim + num_blocks)
    num_tokens = 7
    # k, v as views of a fused QKV output (token stride > heads * head_dim).
    qkv = _rand(num_tokens, (3 + 2 * hk) * head_dim, dtype=dtype, g=g)
    key = qkv[:, 3 * head_dim : (3 + hk) * head_dim].view(num_tokens, hk, head_dim)
    value = qkv[:, (3 + hk) * head_dim :].view(num_tokens, hk, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[1, 4]] = -1  # CUDA-graph padding rows
    slots = slots.to(device=DEVICE, dtype=slot_dtype)
    shape = (num_blocks, block_size, hk, head_dim)
    k_cache, v_cache = _poison(*shape, dtype=dtype), _poison(*shape, dtype=dtype)
    triton_ops.write_kv_cache(key, value, k_cache, v_cache, slots)

    want_k, want_v = _poison(*shape, dtype=dtype), _poison(*shape, dtype=dtype)
    live = slots >= 0
    ops_ref.write_kv_cache(key[live], value[live], want_k, want_v, slots[live].long())
    # A copy is exact; equal_nan also checks that every slot not written (padding) kept its NaN.
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0, equal_nan=True)
    assert int((~k_cache.isnan()).sum()) == int(live.sum()) * hk * head_dim


def test_empty_batches_are_no_ops() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert triton_ops.rms_norm(x, w, EPS).shape == (0, 64)
    assert triton_ops.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


def test_wrapper_rejects_bad_layouts() -> None:
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(AssertionError):
        triton_ops.rms_norm(x.t().contiguous().t(), torch.ones(64, device=DEVICE), EPS)
    with pytest.raises(AssertionError):
        triton_ops.rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.bfloat16), EPS)
    with pytest.raises(AssertionError):
        triton_ops.silu_and_mul(torch.randn(4, 63, device=DEVICE))


# --- The references are the engine's layers, op for op ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refs_match_engine_norm(dtype: torch.dtype) -> None:
    from baton.services.engine.layers.norm import rms_norm

    g = _gen(7)
    x, residual = (torch.randn(5, 576, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(576, generator=g).to(dtype)
    assert torch.equal(ops_ref.rms_norm_ref(x, w, EPS), rms_norm(x, w, EPS))
    normed, new_residual = ops_ref.fused_add_rms_norm_ref(x, residual, w, EPS)
    hidden = residual + x  # LlamaDecoderLayer: hidden = hidden + sublayer(...)
    assert torch.equal(new_residual, hidden)
    assert torch.equal(normed, rms_norm(hidden, w, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refs_match_engine_rotary(dtype: torch.dtype) -> None:
    from baton.services.engine.layers.rotary import RotaryEmbedding, apply_rotary
    from baton.services.engine.models.base import RopeScaling

    rope = RotaryEmbedding(64, 100, 10000.0, RopeScaling(), dtype=dtype)
    g = _gen(8)
    x = torch.randn(6, 3, 64, generator=g).to(dtype)
    positions = torch.randint(0, 100, (6,), generator=g)
    cos, sin = rope.cos_sin(positions)
    want = apply_rotary(x, cos, sin)
    assert torch.equal(ops_ref.rope_ref(x, positions, rope.cos_half, rope.sin_half), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refs_match_engine_mlp(dtype: torch.dtype) -> None:
    from baton.services.engine.layers.mlp import SwiGLUMLP

    mlp = SwiGLUMLP(64, 96, dtype=dtype)
    g = _gen(9)
    for p in mlp.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(4, 64, generator=g).to(dtype)
    want = mlp(x)
    got = mlp.down_proj(ops_ref.silu_and_mul_ref(mlp.gate_up_proj(x)))
    assert torch.equal(got, want)


# --- The GPU compiler accepts what the interpreter ran ----------------------------------------


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the tests above compile every kernel")
def test_kernels_compile_for_sm90() -> None:
    """Compile each kernel for sm_90 on this CPU-only machine (Triton ships ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "baton.kernels.bench_ops", "--ptx-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

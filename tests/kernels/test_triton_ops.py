"""Triton element-wise/row-wise kernels vs their plain-torch references, and the references vs the
engine's layers.

On CUDA the kernels are compiled and run on the GPU; without CUDA they run under Triton's CPU
interpreter (sizes kept small: it runs every program in Python), and a subprocess compiles them
for sm_90 to catch what the interpreter accepts but the compiler rejects. Kernels are checked
against a float64 run of the reference (‖out − ref‖ / ‖ref‖, METHOD.md tolerances) and element
by element against the reference in the model dtype. Outputs are poisoned with NaN first, so an
element the kernel skipped fails the check. The fused attention prologue is also held to the
unfused kernel sequence it replaces, bit for bit. On a GPU that supports it, the kernels run once
more with programmatic dependent launch (pdl.set_enabled(True)) and must give the same bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton`: triton.jit reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from baton.kernels import ops_ref, pdl, triton_ops, triton_prologue

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


def _check(out: torch.Tensor, oracle: torch.Tensor, ref: torch.Tensor, roundings: int = 1) -> None:
    """out vs a float64 oracle (relative L2) and vs the dtype reference (element-wise), the
    element tolerance scaled by the number of roundings to the model dtype the op chains."""
    assert out.shape == oracle.shape == ref.shape, (out.shape, oracle.shape, ref.shape)
    assert not out.isnan().any(), "NaN in output: an element was not written"
    diff = (out.double() - oracle.double()).norm() / oracle.double().norm()
    assert diff < REL_TOL[out.dtype], (float(diff), out.dtype)
    tol = ELEM_TOL[out.dtype] * roundings
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.fixture(params=[False, True], ids=["plain_launch", "pdl_launch"])
def pdl_launch(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Runs a test with PDL launches off, then on (skipped where PDL is unsupported)."""
    on = bool(request.param)
    if on and not pdl.supported(torch.device(DEVICE)):
        pytest.skip("PDL needs a compiled (not interpreted) kernel on compute capability >= 9.0")
    saved = pdl._enabled  # the raw switch: enabled() also folds in the interpreter
    pdl.set_enabled(on)
    yield on
    pdl.set_enabled(saved)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 576), (2, 4096)])
def test_embedding_sumsq(dtype: torch.dtype, shape: tuple[int, int], pdl_launch: bool) -> None:
    """The rows of the table, exactly, and each row's sum of squares in fp32 (repeated ids)."""
    rows, dim = shape
    g = _gen(rows * dim)
    table = _rand(50, dim, dtype=dtype, g=g)
    ids = torch.randint(0, 50, (rows,), generator=g).to(DEVICE)
    ids[0] = 49
    if rows > 1:
        ids[-1] = ids[0]
    out, sumsq = triton_ops.embedding_sumsq(ids, table)
    assert torch.equal(out, table[ids])
    assert sumsq.shape == (rows, 1) and sumsq.dtype == torch.float32
    want = table[ids].double().pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(sumsq.double(), want, rtol=1e-5, atol=0)
    empty, empty_sq = triton_ops.embedding_sumsq(ids[:0], table)
    assert empty.shape == (0, dim) and empty_sq.shape == (0, 1)


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


# --- The fused attention prologue: [q/k head norm] -> RoPE -> KV write -------------------------

PROLOGUE_CASES = {
    # name: (q heads, kv heads, head_dim, per-head q/k RMSNorm, index dtype)
    "llama_d128": (32, 8, 128, False, torch.int64),
    "llama_d64": (32, 8, 64, False, torch.int64),
    "qwen3_d128": (32, 8, 128, True, torch.int64),
    # MQA: three of the four rows of the k head group are masked; head_dim not a power of two
    "mqa_d96_norm": (6, 1, 96, True, torch.int32),
}


def _prologue_inputs(
    case: str, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], tuple[int, ...]]:
    """A fused qkv [T, (Hq + 2 Hk) D] and everything else the prologue takes, engine-style."""
    hq, hk, head_dim, qk_norm, index_dtype = PROLOGUE_CASES[case]
    num_tokens, block_size, num_blocks, max_positions = 4, 16, 3, 80
    g = _gen(hq * head_dim + hk)
    qkv = _rand(num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype, g=g)
    angles = torch.rand(max_positions, head_dim // 2, generator=g, dtype=torch.float64) * 6.3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[1, 3]] = -1  # CUDA-graph padding rows
    weights = [(1.0 + _rand(head_dim, dtype=torch.float32, g=g, scale=0.3)).to(dtype) for _ in "qk"]
    args: dict[str, torch.Tensor | None] = {
        "positions": torch.randint(0, max_positions, (num_tokens,), generator=g).to(
            device=DEVICE, dtype=index_dtype
        ),
        # The engine keeps the tables in the model dtype.
        "cos_half": angles.cos().to(device=DEVICE, dtype=dtype),
        "sin_half": angles.sin().to(device=DEVICE, dtype=dtype),
        "slot_mapping": slots.to(device=DEVICE, dtype=index_dtype),
        "q_norm_weight": weights[0] if qk_norm else None,
        "k_norm_weight": weights[1] if qk_norm else None,
    }
    return qkv, args, (num_blocks, block_size, hk, head_dim)


def _split_qkv(
    qkv: torch.Tensor, hq: int, hk: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(t, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim :].view(t, hk, head_dim)
    return q, k, v


@pytest.mark.parametrize("static_index", [False, True], ids=["index", "static_index"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(PROLOGUE_CASES))
def test_qk_norm_rope_write_kv(
    case: str, dtype: torch.dtype, static_index: bool, pdl_launch: bool
) -> None:
    """Bit for bit the engine's unfused sequence; close to the float64 plain-torch oracle.
    static_index (graph buffers: positions and slots read before the PDL wait) changes no
    bit."""
    hq, hk, head_dim = PROLOGUE_CASES[case][:3]
    qkv, a, cache_shape = _prologue_inputs(case, dtype)
    positions, cos_h, sin_h, slots = a["positions"], a["cos_half"], a["sin_half"], a["slot_mapping"]
    wq, wk = a["q_norm_weight"], a["k_norm_weight"]
    assert positions is not None and cos_h is not None and sin_h is not None and slots is not None

    # What the engine runs today: rms_norm per head (Qwen3) -> RoPE in place -> KV write.
    ref_qkv = qkv.clone()
    q0, k0, v0 = _split_qkv(ref_qkv, hq, hk, head_dim)
    k_cache0, v_cache0 = _poison(*cache_shape, dtype=dtype), _poison(*cache_shape, dtype=dtype)
    if wq is not None and wk is not None:
        q0, k0 = triton_ops.rms_norm(q0, wq, EPS), triton_ops.rms_norm(k0, wk, EPS)
    q0, k0 = triton_ops.rotary_embedding(positions, q0, k0, cos_h, sin_h, inplace=True)
    triton_ops.write_kv_cache(k0, v0, k_cache0, v_cache0, slots)

    got_qkv = qkv.clone()
    q, k, v = _split_qkv(got_qkv, hq, hk, head_dim)
    k_cache, v_cache = _poison(*cache_shape, dtype=dtype), _poison(*cache_shape, dtype=dtype)
    got_q, got_k = triton_prologue.qk_norm_rope_write_kv(
        positions, q, k, v, cos_h, sin_h, k_cache, v_cache, slots, wq, wk, EPS, static_index
    )
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr(), "in place"
    # Bitwise where the engine runs (half precision, and fp32 under the interpreter). On a GPU
    # in fp32 the compiler contracts multiply-adds differently in the fused kernel (seen on an
    # H200): equal to the last ulp or two, not bitwise.
    tol = 1e-6 if dtype == torch.float32 and q.is_cuda else 0.0
    torch.testing.assert_close(got_q, q0, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, k0, atol=tol, rtol=tol)
    assert torch.equal(v, _split_qkv(qkv, hq, hk, head_dim)[2]), "v must be untouched"
    # equal_nan: padding slots and slots of no token keep their NaN poison in both.
    torch.testing.assert_close(k_cache, k_cache0, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(v_cache, v_cache0, atol=0, rtol=0, equal_nan=True)
    live = int((slots >= 0).sum())
    assert int((~k_cache.isnan()).sum()) == int((~v_cache.isnan()).sum()) == live * hk * head_dim

    # The plain-torch reference, in the model dtype and as a float64 oracle.
    q_in, k_in, v_in = _split_qkv(qkv, hq, hk, head_dim)
    ref_cache = _poison(*cache_shape, dtype=dtype)
    want_q, want_k = ops_ref.qk_norm_rope_write_kv_ref(
        positions, q_in, k_in, v_in, cos_h, sin_h, ref_cache, ref_cache.clone(), slots, wq, wk, EPS
    )
    oracle_cache = ref_cache.double()
    oracle_q, oracle_k = ops_ref.qk_norm_rope_write_kv_ref(
        positions,
        *(t.double() for t in (q_in, k_in, v_in, cos_h, sin_h)),
        oracle_cache,
        oracle_cache.clone(),
        slots,
        None if wq is None else wq.double(),
        None if wk is None else wk.double(),
        EPS,
    )
    # With the norm: rounded after the norm, after the weight and after RoPE (one ulp each at
    # most, though under the interpreter each rounding truncates).
    roundings = 1 if wq is None else 3
    _check(got_q, oracle_q, want_q, roundings)
    _check(got_k, oracle_k, want_k, roundings)


def test_qk_norm_rope_write_kv_checks_inputs() -> None:
    qkv, a, cache_shape = _prologue_inputs("qwen3_d128", torch.float32)
    q, k, v = _split_qkv(qkv, 32, 8, 128)
    caches = (
        _poison(*cache_shape, dtype=torch.float32),
        _poison(*cache_shape, dtype=torch.float32),
    )
    pos, cos_h, sin_h, slots = a["positions"], a["cos_half"], a["sin_half"], a["slot_mapping"]
    assert pos is not None and cos_h is not None and sin_h is not None and slots is not None
    with pytest.raises(AssertionError):  # one norm weight without the other
        triton_prologue.qk_norm_rope_write_kv(
            pos, q, k, v, cos_h, sin_h, *caches, slots, a["q_norm_weight"]
        )
    with pytest.raises(AssertionError):  # the cache's head count differs from k's
        triton_prologue.qk_norm_rope_write_kv(
            pos, q, k[:, :4], v[:, :4], cos_h, sin_h, *caches, slots
        )
    empty = qkv[:0]
    q0, k0, v0 = _split_qkv(empty, 32, 8, 128)
    got = triton_prologue.qk_norm_rope_write_kv(
        pos[:0], q0, k0, v0, cos_h, sin_h, *caches, slots[:0]
    )
    assert got[0].shape == (0, 32, 128) and caches[0].isnan().all(), "no tokens: a no-op"


@pytest.mark.skipif(not pdl.supported(torch.device(DEVICE)), reason="PDL needs sm_90+ (no interp)")
def test_ops_identical_under_pdl() -> None:
    """Launching with PDL changes when programs start, never what they compute."""
    g = _gen(11)
    x, res = _rand(9, 4096, dtype=torch.bfloat16, g=g), _rand(9, 4096, dtype=torch.bfloat16, g=g)
    w = _rand(4096, dtype=torch.bfloat16, g=g)
    gate_up = _rand(9, 2 * 1024, dtype=torch.bfloat16, g=g)
    qkv, a, cache_shape = _prologue_inputs("qwen3_d128", torch.bfloat16)
    saved = pdl._enabled
    outs = []
    try:
        for on in (False, True):
            pdl.set_enabled(on)
            q, k, v = _split_qkv(qkv.clone(), 32, 8, 128)
            caches = [torch.zeros(cache_shape, dtype=torch.bfloat16, device=DEVICE) for _ in "kv"]
            pos, cos_h, sin_h, slots = (
                a["positions"],
                a["cos_half"],
                a["sin_half"],
                a["slot_mapping"],
            )
            assert pos is not None and cos_h is not None and sin_h is not None
            assert slots is not None
            rq, rk = triton_ops.rotary_embedding(pos, q, k, cos_h, sin_h)
            triton_ops.write_kv_cache(k, v, caches[0], caches[1], slots)
            fq, fk = triton_prologue.qk_norm_rope_write_kv(
                pos, q, k, v, cos_h, sin_h, *caches, slots, a["q_norm_weight"], a["k_norm_weight"]
            )
            outs.append(
                [
                    triton_ops.rms_norm(x, w, EPS),
                    *triton_ops.fused_add_rms_norm(x, res.clone(), w, EPS),
                    triton_ops.silu_and_mul(gate_up),
                    rq,
                    rk,
                    fq,
                    fk,
                    *caches,
                ]
            )
    finally:
        pdl.set_enabled(saved)
    for plain, with_pdl in zip(*outs, strict=True):
        assert torch.equal(plain, with_pdl)


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
        [sys.executable, "-m", "baton.kernels.bench.ops", "--ptx-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

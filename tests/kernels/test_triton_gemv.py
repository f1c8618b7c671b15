"""skinny_linear (Triton skinny GEMM for decode) vs torch.nn.functional.linear.

On CUDA the kernels are compiled and run on the GPU (plus CUDA-graph capture and PDL tests);
without CUDA they run under Triton's CPU interpreter with small shapes (test_triton_gemv_ptx.py
compiles them for sm_90 either way). Outputs are checked against a float64 F.linear (relative
L2) and element by element against F.linear in the model dtype; they are poisoned with NaN
first, so an element the kernel skipped fails the check. The fused split-K reduction is also
checked bit for bit against per-slice partials summed in slice order (what the former separate
reduce kernel computed), and act="silu_mul" bit for bit against silu_and_mul followed by the
plain call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must precede the first `import triton`: triton.jit reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.kernels import pdl  # noqa: E402
from baton.kernels import triton_gemv as gemv  # noqa: E402
from baton.kernels.triton_gemv import (  # noqa: E402
    GemvConfig,
    NormedInput,
    choose_split_k,
    default_config,
    skinny_linear,
    skinny_linear_add,
    supports,
)
from baton.kernels.triton_ops import fused_add_rms_norm, silu_and_mul  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
PDL_OK = ON_GPU and pdl.supported(DEVICE)
# Relative L2 error vs the float64 oracle: fp32 sums in another order land far under 1e-5; the
# half-precision output rounding alone is ~3e-3 (bf16) / ~4e-4 (fp16).
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# Element-wise vs F.linear in the model dtype: a couple of ulps at |y| ~ 3 (the interpreter
# truncates float32 -> bfloat16 where the GPU rounds to nearest, adding up to one ulp).
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _operands(
    M: int, N: int, K: int, dtype: torch.dtype, *, bias: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random x [M, K], weight [N, K] scaled so that y ~ N(0, 1), bias [N] (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype=dtype, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE) if bias else None
    return x, w, b


def _poison(M: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out vs F.linear in float64 (relative L2) and in the model dtype (element-wise)."""
    oracle = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == oracle.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    assert not out.isnan().any(), "NaN in output: an element was not written"
    diff = (out.double() - oracle).norm() / oracle.norm()
    assert diff < REL_TOL[out.dtype], (float(diff), out.dtype)
    ref = F.linear(x, w, b)
    tol = ELEM_TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _assert_counters_zero() -> None:
    """The split-K invariant: every arrival counter is back to 0 once a call has completed."""
    if ON_GPU:
        torch.cuda.synchronize()
    for buf in [*gemv._counters.values(), *gemv._retired_counters]:
        assert buf.dtype == torch.int32 and not buf.any(), buf.nonzero().flatten()[:8]


@pytest.fixture(
    params=[
        False,
        pytest.param(True, marks=pytest.mark.skipif(not PDL_OK, reason="PDL needs sm_90+")),
    ],
    ids=["serial", "pdl"],
)
def use_pdl(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Runs the test with PDL launches off, and on a GPU that has them, on (then off again)."""
    pdl.set_enabled(request.param)
    try:
        yield request.param
    finally:
        pdl.set_enabled(False)


# --- Default config against F.linear ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("NK", [(100, 72), (192, 256), (40, 520)])
@pytest.mark.parametrize("bias", [False, True])
def test_default_config(dtype: torch.dtype, M: int, NK: tuple[int, int], bias: bool) -> None:
    N, K = NK
    x, w, b = _operands(M, N, K, dtype, bias=bias, seed=M * 1000 + N + K)
    out = skinny_linear(x, w, b, out=_poison(M, N, dtype))
    _check(out, x, w, b)
    _check(skinny_linear(x, w, b), x, w, b)  # and with a fresh output


# --- Explicit configs: split-K, CUDA-core path, tails -----------------------------------------

CONFIGS = {
    # 9 K tiles in 3 slices of 3; N = 100 leaves a partial column block.
    "split3": GemvConfig(block_n=32, block_k=32, split_k=3),
    # split 4 over 9 tiles is re-cut to 3 slices of 3 (no empty slice), K tail masked.
    "split4_uneven": GemvConfig(block_n=64, block_k=64, split_k=4),
    "split16_over_few_tiles": GemvConfig(block_n=16, block_k=128, split_k=16, num_stages=2),
    "small_tiles": GemvConfig(block_n=16, block_k=16, num_stages=3),
    "fma": GemvConfig(block_n=16, block_k=64, num_stages=1, use_dot=False),
    "fma_split2": GemvConfig(block_n=8, block_k=128, split_k=2, use_dot=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_configs(name: str, dtype: torch.dtype, M: int) -> None:
    N, K = 100, 264 if name != "split4_uneven" else 520
    x, w, b = _operands(M, N, K, dtype, bias=M != 3, seed=len(name) + M)
    out = skinny_linear(x, w, b, out=_poison(M, N, dtype), config=CONFIGS[name])
    _check(out, x, w, b)


def test_float16_split_k() -> None:
    x, w, b = _operands(5, 96, 512, torch.float16, bias=True, seed=3)
    cfg = GemvConfig(block_n=32, block_k=64, split_k=2)
    _check(skinny_linear(x, w, b, out=_poison(5, 96, torch.float16), config=cfg), x, w, b)


def test_split_k_is_deterministic() -> None:
    """The partials are summed in slice order: two runs agree bit for bit."""
    x, w, b = _operands(4, 128, 512, torch.bfloat16, bias=True, seed=11)
    cfg = GemvConfig(block_n=32, block_k=64, split_k=4)
    first = skinny_linear(x, w, b, config=cfg)
    assert torch.equal(first, skinny_linear(x, w, b, config=cfg))


def test_strided_views() -> None:
    """x a row-strided view, out a column slice of a wider buffer: written in place, the
    columns around it untouched."""
    M, N, K = 3, 80, 136
    x_base, w, b = _operands(M, N, K + 24, torch.bfloat16, bias=True, seed=5)
    x, w = x_base[:, :K], w[:, :K].contiguous()
    buf = torch.full((M, N + 16), 7.0, dtype=torch.bfloat16, device=DEVICE)
    out = buf[:, 8 : 8 + N]
    out.fill_(float("nan"))
    got = skinny_linear(x, w, b, out=out, config=GemvConfig(block_n=32, block_k=32, split_k=2))
    assert got.data_ptr() == out.data_ptr()
    _check(out, x, w, b)
    assert (buf[:, :8] == 7).all() and (buf[:, 8 + N :] == 7).all()


def test_zero_rows() -> None:
    x, w, _ = _operands(1, 32, 64, torch.float32, bias=False, seed=0)
    assert skinny_linear(x[:0], w).shape == (0, 32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


# --- Split-K: the in-kernel, last-arrival reduction ---------------------------------------------


def _slice_sum_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg: GemvConfig
) -> torch.Tensor:
    """What the former two-kernel split-K computed, bit for bit (fp32 operands): each K slice's
    fp32 partial (the kernel on that slice alone, the same tiles in the same order), summed in
    slice order 0..S-1 starting from 0, the bias added in fp32, one cast."""
    assert x.dtype == torch.float32, "the plain call's output is the partial only in fp32"
    K = x.shape[1]
    k_tiles = -(-K // cfg.block_k)
    k_per_split = -(-k_tiles // min(cfg.split_k, k_tiles)) * cfg.block_k
    total = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=DEVICE)
    one = replace(cfg, split_k=1)
    for k0 in range(0, K, k_per_split):
        total += skinny_linear(x[:, k0 : k0 + k_per_split], w[:, k0 : k0 + k_per_split], config=one)
    if b is not None:
        total += b.float()
    return total.to(x.dtype)


# M -> (N, K): N not a multiple of BLOCK_N = 32 (100, 130) or one; K = 16 tiles of 32, with a
# masked tail (488) or without (512), so split 2, 4 and 8 are taken as asked.
SPLIT_SHAPES = {1: (100, 488), 3: (96, 512), 8: (130, 488), 16: (64, 512)}


@pytest.mark.parametrize(
    ("dtype", "split_k"),
    [(torch.float32, 2), (torch.float32, 4), (torch.float32, 8), (torch.bfloat16, 4)],
)
@pytest.mark.parametrize("M", list(SPLIT_SHAPES))
def test_fused_split_k(dtype: torch.dtype, M: int, split_k: int, use_pdl: bool) -> None:
    """Correct, bitwise repeatable, (fp32) bitwise the slice-ordered sum; counters zero after."""
    N, K = SPLIT_SHAPES[M]
    bias = (M % 2 == 1) != (split_k == 4)  # each M (fp32) with and without
    x, w, b = _operands(M, N, K, dtype, bias=bias, seed=100 * M + split_k)
    cfg = GemvConfig(block_n=32, block_k=32, split_k=split_k)
    first = skinny_linear(x, w, b, out=_poison(M, N, dtype), config=cfg)
    _assert_counters_zero()
    _check(first, x, w, b)
    second = skinny_linear(x, w, b, out=_poison(M, N, dtype), config=cfg)
    _assert_counters_zero()
    assert _same_bits(first, second), "split-K is not deterministic"
    if dtype == torch.float32:
        assert _same_bits(first, _slice_sum_reference(x, w, b, cfg)), "summation order changed"


def test_fused_split_k_cuda_cores() -> None:
    """The CUDA-core path's tiles (one per row of x and column block) reduce the same way."""
    M, N, K = 3, 40, 488
    x, w, b = _operands(M, N, K, torch.float32, bias=True, seed=21)
    cfg = GemvConfig(block_n=16, block_k=64, split_k=4, num_stages=1, use_dot=False)
    out = skinny_linear(x, w, b, out=_poison(M, N, torch.float32), config=cfg)
    _assert_counters_zero()
    _check(out, x, w, b)
    assert _same_bits(out, _slice_sum_reference(x, w, b, cfg))


def test_counter_buffer_grows_outside_capture_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few counters: grown when eager (the old buffer kept for graphs that use it), a clear
    error during graph capture (simulated here), which must not allocate."""
    monkeypatch.setattr(gemv, "_MIN_COUNTERS", 4)
    monkeypatch.setattr(gemv, "_counters", {})
    monkeypatch.setattr(gemv, "_retired_counters", [])
    x, w, b = _operands(3, 96, 128, torch.float32, bias=True, seed=2)
    small = GemvConfig(block_n=32, block_k=32, split_k=2)  # 3 tiles
    big = GemvConfig(block_n=16, block_k=32, split_k=2)  # 6 tiles
    _check(skinny_linear(x, w, b, config=small), x, w, b)
    first = gemv._counters[x.device]
    assert first.numel() == 4
    monkeypatch.setattr(gemv, "_capturing", lambda device: True)
    _check(skinny_linear(x, w, b, config=small), x, w, b)  # fits: nothing to allocate
    with pytest.raises(RuntimeError, match="warm-up"):
        skinny_linear(x, w, b, config=big)
    monkeypatch.setattr(gemv, "_capturing", lambda device: False)
    _check(skinny_linear(x, w, b, config=big), x, w, b)
    assert gemv._counters[x.device].numel() == 8
    assert len(gemv._retired_counters) == 1 and gemv._retired_counters[0] is first
    _assert_counters_zero()


# --- act="silu_mul": silu(gate) * up fused into the x loads ------------------------------------

SILU_CONFIGS = {
    "default": None,  # one K slice at this shape
    "split4": GemvConfig(block_n=32, block_k=64, split_k=4),
    "fma_split2": GemvConfig(block_n=32, block_k=64, split_k=2, num_stages=1, use_dot=False),
}


@pytest.mark.parametrize("name", list(SILU_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_fused(name: str, dtype: torch.dtype, use_pdl: bool) -> None:
    """Bit for bit silu_and_mul(x) then the plain call, with x [M, 2K] a row-strided slice of a
    wider buffer (K = 264: a masked K tail)."""
    M, N, K = 3, 100, 264
    g = torch.Generator().manual_seed(len(name))
    wide = (torch.randn(M, 2 * K + 24, generator=g) * 2).to(dtype=dtype, device=DEVICE)
    x = wide[:, 8 : 8 + 2 * K]
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype=dtype, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE)
    cfg = SILU_CONFIGS[name]
    assert supports(x, w, act="silu_mul")
    fused = skinny_linear(x, w, b, act="silu_mul", out=_poison(M, N, dtype), config=cfg)
    _assert_counters_zero()
    h = silu_and_mul(x)
    assert _same_bits(fused, skinny_linear(h, w, b, config=cfg))
    _check(fused, h, w, b)
    no_bias = skinny_linear(x, w, act="silu_mul", config=cfg)
    assert _same_bits(no_bias, skinny_linear(h, w, config=cfg))


# --- Residual add (producer) and RMSNorm (consumer) fused into the GEMM -------------------------

FUSE_CONFIGS = {
    "default": None,
    "split4": GemvConfig(block_n=32, block_k=64, split_k=4),
    "fma_split2": GemvConfig(block_n=32, block_k=64, split_k=2, num_stages=1, use_dot=False),
}


@pytest.mark.parametrize("name", list(FUSE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "silu_mul"])
def test_add_residual(name: str, dtype: torch.dtype, act: str, use_pdl: bool) -> None:
    """residual += the product, bit for bit skinny_linear then fused_add_rms_norm's update; the
    returned partial sums of squares add up to the new residual rows' sum of squares. N = 100
    leaves a partial column block (its padded columns must add nothing)."""
    M, N, K = 3, 100, 256
    cfg = FUSE_CONFIGS[name]
    g = torch.Generator().manual_seed(len(name) + len(act))
    x_cols = 2 * K if act == "silu_mul" else K
    x = torch.randn(M, x_cols, generator=g).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype=dtype, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE)
    residual = (torch.randn(M, N, generator=g) * 3).to(dtype=dtype, device=DEVICE)
    y = skinny_linear(x, w, b, act=act, config=cfg)  # type: ignore[arg-type]
    want = residual.clone()  # the norm kernel's in-place residual update, same roundings
    fused_add_rms_norm(y, want, torch.ones(N, dtype=dtype, device=DEVICE), 1e-6)
    sumsq = skinny_linear_add(x, w, residual, b, act=act, config=cfg)  # type: ignore[arg-type]
    _assert_counters_zero()
    assert _same_bits(residual, want)
    block_n = (cfg or default_config(M, N, K)).block_n
    assert sumsq.shape == (M, -(-N // block_n)) and sumsq.dtype == torch.float32
    torch.testing.assert_close(
        sumsq.sum(1).double(), residual.double().pow(2).sum(1), rtol=1e-5, atol=0
    )


def _rms_norm_from_sumsq(
    x: torch.Tensor, weight: torch.Tensor, sumsq: torch.Tensor, eps: float
) -> torch.Tensor:
    """HF's RMSNorm roundings with the variance taken from sumsq (float64 sum, then fp32)."""
    variance = (sumsq.double().sum(1, keepdim=True) / x.shape[1]).float()
    normed = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


@pytest.mark.parametrize("name", list(FUSE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5])
def test_normed_input(name: str, dtype: torch.dtype, M: int, use_pdl: bool) -> None:
    """The GEMM of the RMS-normalised x equals the GEMM of the normalised x: exactly where the
    normalisation is exact to the bit, and to a bf16 ulp of rsqrt otherwise. K = 264: a
    masked K tail, and the norm weight's tail masked with it."""
    N, K, eps = 96, 264, 1e-5
    cfg = FUSE_CONFIGS[name]
    g = torch.Generator().manual_seed(M + len(name))
    x = (torch.randn(M, K, generator=g) * 4).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype=dtype, device=DEVICE)
    norm_w = (1 + torch.rand(K, generator=g)).to(dtype=dtype, device=DEVICE)
    sq_rows = x.float().pow(2)
    sumsq = torch.stack([sq_rows[:, :100].sum(1), sq_rows[:, 100:].sum(1)], 1).contiguous()
    norm = NormedInput(norm_w, sumsq, eps)
    fused = skinny_linear(x, w, norm=norm, out=_poison(M, N, dtype), config=cfg)
    ref_in = _rms_norm_from_sumsq(x, norm_w, sumsq, eps)
    _check(fused, ref_in, w, None)
    plain = skinny_linear(ref_in, w, config=cfg)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(FUSE_CONFIGS))
def test_fp32_out_is_the_rounded_product(name: str, use_pdl: bool) -> None:
    """An fp32 `out` (the LM head's logits) holds the bf16 result widened, bit for bit
    skinny_linear(...).float(), plain and with a normalised input; fp32 does not combine with
    the residual add."""
    M, N, K = 2, 100, 256
    cfg = FUSE_CONFIGS[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(M, K, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    wide = skinny_linear(x, w, b, out=_poison(M, N, torch.float32), config=cfg)
    assert wide.dtype == torch.float32
    assert _same_bits(wide, skinny_linear(x, w, b, config=cfg).float())
    sumsq = x.float().pow(2).sum(1, keepdim=True).contiguous()
    norm = NormedInput((1 + torch.rand(K, generator=g)).to(torch.bfloat16).to(DEVICE), sumsq, 1e-6)
    wide = skinny_linear(x, w, norm=norm, out=_poison(M, N, torch.float32), config=cfg)
    assert _same_bits(wide, skinny_linear(x, w, norm=norm, config=cfg).float())
    with pytest.raises(AssertionError, match="dtype"):
        skinny_linear(x, w, out=_poison(M, N, torch.float16))


def test_add_then_normed_input_matches_norm_kernel() -> None:
    """The decode layer's chain, o_proj adding into the residual and gate_up normalising it,
    against the kernels it replaces (skinny_linear, fused_add_rms_norm, skinny_linear)."""
    M, H, inter, eps = 2, 128, 192, 1e-6
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(5)
    attn = torch.randn(M, H, generator=g).to(dtype=dtype, device=DEVICE)
    w_o = (torch.randn(H, H, generator=g) * H**-0.5).to(dtype=dtype, device=DEVICE)
    w_gu = (torch.randn(inter, H, generator=g) * H**-0.5).to(dtype=dtype, device=DEVICE)
    norm_w = (1 + torch.rand(H, generator=g)).to(dtype=dtype, device=DEVICE)
    residual = torch.randn(M, H, generator=g).to(dtype=dtype, device=DEVICE)

    res_ref = residual.clone()
    normed, _ = fused_add_rms_norm(skinny_linear(attn, w_o), res_ref, norm_w, eps)
    want = skinny_linear(normed, w_gu)

    sumsq = skinny_linear_add(attn, w_o, residual)
    got = skinny_linear(residual, w_gu, norm=NormedInput(norm_w, sumsq, eps))
    assert _same_bits(residual, res_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# --- supports() and the heuristic -------------------------------------------------------------


def test_supports() -> None:
    x, w, _ = _operands(4, 64, 128, torch.bfloat16, bias=False, seed=1)
    assert supports(x, w)
    assert supports(x[:1], w)
    assert not supports(torch.cat([x] * 5), w), "M > 16"
    assert not supports(x, w.t().contiguous().t()), "weight rows not contiguous"
    assert not supports(x.float(), w), "dtype mismatch"
    w_wide = torch.zeros(64, 132, dtype=torch.bfloat16, device=DEVICE)
    assert not supports(x, w_wide[:, :128]), "weight row starts not 16-byte aligned"
    assert not supports(x[:, :36], w[:, :36].contiguous()), "K * 2 bytes % 16 != 0"
    assert not supports(x[0], w), "x must be 2-D"
    gate_up = torch.cat([x, x], dim=1)
    assert supports(gate_up, w, act="silu_mul")
    assert not supports(gate_up, w), "2K columns without the activation"
    assert not supports(x, w, act="silu_mul"), "silu_mul takes [gate | up], 2K columns"


TARGETS = {  # (K, N) of Llama-3.1-8B and Qwen3-8B projections
    "qkv": (4096, 6144),
    "o_proj": (4096, 4096),
    "llama_gate_up": (4096, 28672),
    "llama_down": (14336, 4096),
    "llama_lm_head": (4096, 128256),
    "qwen_gate_up": (4096, 24576),
    "qwen_down": (12288, 4096),
    "qwen_lm_head": (4096, 151936),
}


def test_default_config_heuristic() -> None:
    """Valid launch shapes for every M; split-K exactly where the columns alone leave SMs idle,
    and never past one wave of resident programs."""
    for M in range(1, 17):
        for name, (K, N) in TARGETS.items():
            cfg = default_config(M, N, K, num_sms=132)
            assert cfg.use_dot and cfg.block_n >= 16 and cfg.block_k >= 16, (name, cfg)
            assert K // cfg.block_k >= 4 * cfg.split_k, ("slices keep >= 4 tiles", name, cfg)
            split = cfg.split_k > 1
            assert split == (N <= 6144), (name, cfg)
            programs = -(-N // cfg.block_n) * cfg.split_k
            assert not split or programs <= 132 * gemv.ctas_per_sm(cfg), ("one wave", name, cfg)
    assert default_config(1, 100, 72).block_k == 128, "one masked tile"
    assert default_config(1, 1, 8).block_k == 16, "tl.dot's minimum"
    assert choose_split_k(2000, 32, 264) == 1
    assert choose_split_k(64, 32, 264) == 4
    assert choose_split_k(96, 32, 264) == 2, "4 would need a second wave"
    assert choose_split_k(64, 4, 264) == 1, "too few tiles to split"


# --- CUDA only: graph capture and PDL chains (the sm_90 compile: test_triton_gemv_ptx.py) ------


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_graph_capture(use_pdl: bool) -> None:
    """Captured once (split-K and not, fused SiLU), replayed on new inputs: the results follow
    the inputs, equal the eager calls' bit for bit, and the counters are zero after each replay."""
    M, N, K = 2, 4096, 4096
    x, w, b = _operands(M, N, K, torch.bfloat16, bias=True, seed=9)
    gate_up = torch.randn(M, 2 * K, device=DEVICE).to(torch.bfloat16)
    configs = [None, GemvConfig(split_k=1), GemvConfig(split_k=4)]

    def step() -> list[torch.Tensor]:
        outs = [skinny_linear(x, w, b, config=cfg) for cfg in configs]
        return outs + [skinny_linear(gate_up, w, b, act="silu_mul", config=c) for c in configs]

    step()  # compile, and allocate the split-K counters, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(M, K, generator=g).to(torch.bfloat16))
        gate_up.copy_(torch.randn(M, 2 * K, generator=g).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        _assert_counters_zero()
        for got, want in zip(outs, step(), strict=True):
            assert _same_bits(got, want)
        h = silu_and_mul(gate_up)
        for i, out in enumerate(outs):
            _check(out, x if i < len(configs) else h, w, b)


@pytest.mark.skipif(not PDL_OK, reason="PDL needs a CUDA device of compute capability >= 9.0")
def test_pdl_chain_matches_serial() -> None:
    """Dependent calls launched back to back with PDL, each reading the one before's output
    (an MLP: gate_up, then down with the fused SiLU; both split-K, so consecutive calls share the
    counters): bit for bit the serial result, eager and replayed from a CUDA graph."""
    M, H, inter = 4, 2048, 1024
    g = torch.Generator().manual_seed(7)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(DEVICE)

    x = rand(M, H)
    layers = [
        (rand(2 * inter, H, scale=H**-0.5), rand(H, inter, scale=inter**-0.5)) for _ in range(4)
    ]
    down_cfg = GemvConfig(split_k=4)
    assert default_config(M, 2 * inter, H).split_k > 1

    def forward() -> torch.Tensor:
        h = x
        for w_gate_up, w_down in layers:
            h = skinny_linear(skinny_linear(h, w_gate_up), w_down, act="silu_mul", config=down_cfg)
        return h

    serial = forward()
    pdl.set_enabled(True)
    try:
        for _ in range(3):
            assert _same_bits(forward(), serial)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = forward()
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert _same_bits(replayed, serial)
    finally:
        pdl.set_enabled(False)
    _assert_counters_zero()

"""skinny_linear (Triton skinny GEMM for decode) vs torch.nn.functional.linear.

On CUDA the kernels are compiled and run on the GPU (plus a CUDA-graph capture test); without
CUDA they run under Triton's CPU interpreter with small shapes, and a subprocess compiles them
for sm_90 to catch what the interpreter accepts but the compiler rejects. Outputs are checked
against a float64 F.linear (relative L2) and element by element against F.linear in the model
dtype; they are poisoned with NaN first, so an element the kernel skipped fails the check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must precede the first `import triton`: triton.jit reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.kernels.triton_gemv import (  # noqa: E402
    GemvConfig,
    choose_split_k,
    default_config,
    skinny_linear,
    supports,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
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
    """Valid launch shapes for every M; split-K exactly where the columns alone leave SMs idle."""
    for M in range(1, 17):
        for name, (K, N) in TARGETS.items():
            cfg = default_config(M, N, K, num_sms=132)
            assert cfg.use_dot and cfg.block_n >= 16 and cfg.block_k >= 16, (name, cfg)
            assert K // cfg.block_k >= 4 * cfg.split_k, ("slices keep >= 4 tiles", name, cfg)
            split = cfg.split_k > 1
            assert split == (N <= 6144), (name, cfg)
    assert default_config(1, 100, 72).block_k == 128, "one masked tile"
    assert default_config(1, 1, 8).block_k == 16, "tl.dot's minimum"
    assert choose_split_k(2000, 32, 264) == 1
    assert choose_split_k(64, 32, 264) == 4
    assert choose_split_k(64, 4, 264) == 1, "too few tiles to split"


# --- CUDA only: graph capture; CPU only: the sm_90 compile ------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_graph_capture() -> None:
    """Captured once (split-K and not), replayed on new inputs: the results follow the inputs."""
    M, N, K = 2, 4096, 4096
    x, w, b = _operands(M, N, K, torch.bfloat16, bias=True, seed=9)
    outs: list[torch.Tensor] = []
    configs = [None, GemvConfig(split_k=1), GemvConfig(split_k=4)]
    for cfg in configs:  # compile outside the capture
        skinny_linear(x, w, b, config=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny_linear(x, w, b, config=cfg) for cfg in configs]
    x.copy_(torch.randn(M, K, device=DEVICE).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        _check(out, x, w, b)


@pytest.mark.skipif(ON_GPU, reason="on CUDA the tests above compile every kernel")
def test_kernels_compile_for_sm90() -> None:
    """Compile the kernel for sm_90 on this CPU-only machine (Triton ships ptxas): 16-byte
    loads of W, wgmma on the default tile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "baton.kernels.bench_gemv", "--ptx-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wgmma" in proc.stdout.splitlines()[0], proc.stdout[-3000:]

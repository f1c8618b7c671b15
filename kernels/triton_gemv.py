"""Skinny GEMM for decode: y = x @ W^T (+ bias) for a few rows of x, written to stream W at HBM
bandwidth. F.linear (cuBLAS) is the reference.

    skinny_linear(x [M, K], weight [N, K], bias [N] | None, out=..., config=...) -> y [M, N]
    supports(x, weight)                  -> whether skinny_linear takes these operands
    default_config(M, N, K, num_sms)     -> GemvConfig, the explicit heuristic (no autotune)

At M <= 16 the product is pure weight streaming: every element of W is read once and used M
times. Each program owns BLOCK_N rows of W (output columns) and one K slice, and walks it in
[BLOCK_N, BLOCK_K] tiles, K innermost so each thread's loads are 16 bytes wide. Two ways to do
the arithmetic, picked by GemvConfig.use_dot:

- tensor cores, "swap AB": acc[BLOCK_N, 16] += W_tile @ x_tile^T. The weight tile is the MMA's
  M side (64 rows per warpgroup on Hopper) and the x rows, padded to 16, its N side, so one
  program serves all M <= 16 rows and W is read once. The loads feed a dot, so Triton's
  pipeliner keeps num_stages - 1 tiles in flight per program (cp.async into shared memory);
- CUDA cores: acc[BLOCK_N, BLOCK_K] += W_tile * x_row, reduced once after the loop. One program
  per (row of x, column block); programs for the same block are adjacent in the grid, so for
  M > 1 the repeats of a W tile are served by L2.

Split-K (GemvConfig.split_k > 1) is for shapes whose N gives too few column blocks to cover the
SMs (o_proj and down at N = 4096): each K slice writes an fp32 partial to a [S, M, N] workspace
and a second kernel sums the S partials in a fixed order, adds the bias and casts. The result is
deterministic (no atomics) and costs one extra small launch.

Rounding follows F.linear's: products and sums in fp32, bias added in fp32, one cast to x's dtype.
Nothing here syncs the host or allocates outside torch.empty, so the wrapper can be captured in
a CUDA graph (the config heuristic reads only shapes and the cached SM count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton
import triton.language as tl

# Triton ships no type information: each @triton.jit kernel carries two narrow ignores rather
# than annotations on its arguments (Triton reads those annotations and would specialise on them).

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 16
"""Most rows of x one call takes: the padded MMA side of the tensor-core path."""
_DOT_BLOCK_M = 16  # tl.dot needs every dim >= 16; rows past M are clamped copies, never stored
_SMEM_PER_SM = 227 * 1024  # H100/H200 shared memory a block may use; sets CTAs per SM
_DEFAULT_NUM_SMS = 132  # H100 SXM; the interpreter (CPU) has no device to ask
_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of skinny_linear; default_config picks one from (M, N, K)."""

    block_n: int = 64
    """Rows of W (output columns) per program; >= 16 on the tensor-core path."""
    block_k: int = 128
    """K elements per tile: a power of two >= 16."""
    split_k: int = 1
    """K slices (programs along grid axis 1); > 1 adds the fp32 workspace and reduce kernel."""
    num_warps: int = 4
    """Warps per program (4 = one Hopper warpgroup)."""
    num_stages: int = 4
    """Software-pipeline depth of the K loop: tiles in flight per program is num_stages - 1."""
    use_dot: bool = True
    """Tensor cores (swap-AB tl.dot) when True; CUDA-core FMAs, one program per row, when False."""


# --- Heuristic --------------------------------------------------------------------------------


def ctas_per_sm(config: GemvConfig, element_size: int = 2) -> int:
    """Programs resident per SM, estimated: by shared memory on the tensor-core path (num_stages
    buffers of the W and x tiles), by registers on the CUDA-core path (the fp32 accumulator
    tile, the loaded W tile, ~32 more), and by the 64 warps an SM holds."""
    threads = 32 * config.num_warps
    by_warps = 64 // config.num_warps
    tile = config.block_n * config.block_k
    if config.use_dot:
        smem = config.num_stages * (config.block_n + _DOT_BLOCK_M) * config.block_k * element_size
        return max(1, min(by_warps, _SMEM_PER_SM // smem))
    regs = tile // threads + tile * element_size // 4 // threads + 32
    return max(1, min(by_warps, 65536 // (regs * threads)))


def choose_split_k(
    num_col_blocks: int, k_tiles: int, resident: int, *, min_tiles_per_split: int = 4
) -> int:
    """K slices (a power of two) so that the grid gives every resident slot a program.

    The kernel is memory-bound: once ~all SMs hold programs with tiles in flight, HBM is the
    limit, and a ragged last wave costs little (the programs still running get the bandwidth).
    So K is split only while the column blocks fill less than 90% of one wave of resident
    programs (o_proj, down, qkv), doubling until they do or a slice would drop under
    min_tiles_per_split tiles (the pipeline needs a few tiles to reach its steady state).
    """
    split = 1
    while (
        num_col_blocks * split < 0.9 * resident
        and k_tiles >= 2 * split * min_tiles_per_split
        and split < 16
    ):
        split *= 2
    return split


def default_config(M: int, N: int, K: int, *, num_sms: int = _DEFAULT_NUM_SMS) -> GemvConfig:
    """The heuristic: 64x128 bf16 tiles on the tensor cores, 4 stages, split-K to fill waves.

    BLOCK_N = 64 is one wgmma M side for 4 warps; a [64, 128] bf16 tile is 16 KiB, and 3 tiles
    in flight per program with 2 programs per SM keeps ~100 KB of reads outstanding per SM, well
    past what HBM3's latency-bandwidth product asks (~20 KB per SM at 3.3 TB/s and ~800 ns).
    """
    assert 1 <= M <= MAX_ROWS and N >= 1 and K >= 1, (M, N, K)
    block_k = min(128, max(16, triton.next_power_of_2(K)))
    cfg = GemvConfig(block_n=64, block_k=block_k, num_warps=4, num_stages=4, use_dot=True)
    return with_split_k(cfg, M, N, K, num_sms=num_sms)


def with_split_k(
    config: GemvConfig, M: int, N: int, K: int, *, num_sms: int = _DEFAULT_NUM_SMS
) -> GemvConfig:
    """config with split_k chosen by choose_split_k for this shape (a sweep's helper)."""
    m_blocks = 1 if config.use_dot else M
    col_blocks = m_blocks * triton.cdiv(N, config.block_n)
    k_tiles = triton.cdiv(K, config.block_k)
    split = choose_split_k(col_blocks, k_tiles, num_sms * ctas_per_sm(config))
    return replace(config, split_k=split)


@lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    # Cached device properties: no sync, safe during graph capture.
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


# --- Kernels ----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])  # type: ignore[untyped-decorator]
def _skinny_gemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    x_row_stride,
    w_ptr,
    w_row_stride,
    b_ptr,
    y_ptr,
    y_row_stride,
    y_split_stride,
    M,
    N,
    K,
    k_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: axis 0 = column block * row blocks (row block fastest), axis 1 = K slice.
    # M is not specialised (M = 1 would otherwise compile apart from M = 8 and 16).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows of W past N are wrapped onto real ones rather than masked: they only feed outputs the
    # final store masks off. Rows of x past M (the tensor-core path pads M to 16) are masked
    # instead: a masked cp.async zero-fills without touching memory, where clamped rows would
    # re-read x from L2 16 times per tile at M = 1 (a quarter of W's traffic at BLOCK_N = 64).
    w_rows = (offs_n % N).to(tl.int64)
    x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)  # in bounds; masked lanes read nothing
    m_mask = (offs_m < M)[:, None]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Slices are whole tiles (k_per_split is a multiple of BLOCK_K), so only the last tile of K
    # can run past it: `k < K` is the whole mask, and EVEN_K drops it.
    w_ptrs = w_ptr + w_rows[:, None] * w_row_stride + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + x_rows[:, None] * x_row_stride + (k_start + offs_k)[None, :]

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            xk = tl.load(x_ptrs, mask=m_mask, other=0.0)
        else:
            k_mask = (k + offs_k)[None, :] < K
            w = tl.load(w_ptrs, mask=k_mask, other=0.0)
            xk = tl.load(x_ptrs, mask=m_mask & k_mask, other=0.0)
        if USE_DOT:
            # Swap AB: W's tile is the MMA's M side, the (padded) rows of x its N side.
            acc = tl.dot(w, tl.trans(xk), acc, input_precision=PRECISION)
        else:
            # BLOCK_M == 1: xk is [1, BLOCK_K]; the K reduction waits until after the loop.
            acc += w.to(tl.float32) * xk.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    # The CUDA-core path reduces over K once, here: [BLOCK_N, BLOCK_K] -> [BLOCK_N, 1].
    out = acc if USE_DOT else tl.sum(acc, axis=1)[:, None]

    # out[j, i] is y[offs_m[i], offs_n[j]].
    y_offs = offs_m.to(tl.int64)[None, :] * y_row_stride + offs_n[:, None]
    y_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT:
        tl.store(y_ptr + pid_k.to(tl.int64) * y_split_stride + y_offs, out, mask=y_mask)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            out += bias[:, None]
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit  # type: ignore[untyped-decorator]
def _split_k_reduce_kernel(  # type: ignore[no-untyped-def]
    ws_ptr,
    b_ptr,
    y_ptr,
    y_row_stride,
    M,
    N,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Workspace [SPLIT_K, M, N] fp32, contiguous. Partials are summed in slice order, so the
    # result does not depend on which program finished first.
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --- Wrapper ----------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear takes these operands (else use F.linear).

    x [M, K] with 1 <= M <= 16 and K-contiguous rows, weight [N, K] with contiguous rows whose
    starts are 16-byte aligned (K % 8 == 0 in half precision), both one float dtype, on CUDA
    (or on the CPU under the Triton interpreter).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return False
    if x.dtype != weight.dtype or x.dtype not in _FLOAT_DTYPES or x.device != weight.device:
        return False
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and _interpreting())):
        return False
    m, k = x.shape
    e = x.element_size()
    return (
        1 <= m <= MAX_ROWS
        and weight.shape[0] >= 1
        and k >= 1
        and (k * e) % 16 == 0
        and weight.stride(1) == 1
        and (weight.stride(0) * e) % 16 == 0
        and (x.stride(1) == 1 or k == 1)
    )


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y = x @ weight^T + bias for x [M <= 16, K], weight [N, K], bias [N] → y [M, N] in x's dtype.

    fp32 accumulation, bias added in fp32, one rounding to the output dtype (as F.linear). `out`
    (optional) is [M, N] in x's dtype with contiguous rows; it may be a column slice of a wider
    buffer. config=None picks default_config(M, N, K). Graph-safe: no host syncs; the split-K
    workspace is a fresh torch.empty (a graph's private pool during capture).
    """
    assert x.dim() == 2 and weight.dim() == 2, (x.shape, weight.shape)
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K, ("x and weight disagree on K", x.shape, weight.shape)
    assert x.dtype in _FLOAT_DTYPES and weight.dtype == x.dtype, (x.dtype, weight.dtype)
    assert x.stride(1) == 1 or K == 1, ("x rows must be contiguous", x.stride())
    assert weight.stride(1) == 1, ("weight rows must be contiguous", weight.stride())
    assert M <= MAX_ROWS, ("skinny_linear takes at most 16 rows; use F.linear", M)
    assert x.device == weight.device, (x.device, weight.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1, (bias.shape, bias.stride(), N)
        assert bias.dtype == x.dtype and bias.device == x.device, (bias.dtype, bias.device)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype, (out.shape, out.dtype, (M, N), x.dtype)
    assert out.stride(1) == 1 or N == 1, ("out rows must be contiguous", out.stride())
    assert out.device == x.device, (out.device, x.device)
    if M == 0 or N == 0:
        return out
    assert K >= 1, "K == 0 is not a product"

    cfg = default_config(M, N, K, num_sms=_num_sms(x.device)) if config is None else config
    block_m = _DOT_BLOCK_M if cfg.use_dot else 1
    assert cfg.block_k >= 16 and cfg.block_k == triton.next_power_of_2(cfg.block_k), cfg
    assert cfg.block_n == triton.next_power_of_2(cfg.block_n), cfg
    assert cfg.block_n >= 16 or not cfg.use_dot, ("tl.dot needs BLOCK_N >= 16", cfg)
    assert cfg.split_k >= 1, cfg

    # Region map of K for split S: slices of `tiles_per_split` whole tiles, the last one short;
    # S is recomputed so that no slice is empty (S = 4 over 9 tiles gives 3 slices of 3).
    k_tiles = triton.cdiv(K, cfg.block_k)
    tiles_per_split = triton.cdiv(k_tiles, min(cfg.split_k, k_tiles))
    split = triton.cdiv(k_tiles, tiles_per_split)
    k_per_split = tiles_per_split * cfg.block_k
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, cfg.block_n), split)
    # tl.dot on fp32 defaults to TF32: ask for full fp32 products, like F.linear's default.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if split > 1:
        # Every (slice, row, col) of the workspace is written by the GEMM kernel: no zeroing.
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        y, y_row_stride, y_split_stride = ws, N, M * N
    else:
        y, y_row_stride, y_split_stride = out, out.stride(0), 0
    _skinny_gemm_kernel[grid](
        x,
        x.stride(0),
        weight,
        weight.stride(0),
        x if bias is None else bias,  # unread when HAS_BIAS is False
        y,
        y_row_stride,
        y_split_stride,
        M,
        N,
        K,
        k_per_split,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        EVEN_K=K % cfg.block_k == 0,
        USE_DOT=cfg.use_dot,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        _split_k_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK), M)](
            ws,
            x if bias is None else bias,
            out,
            out.stride(0),
            M,
            N,
            HAS_BIAS=bias is not None,
            SPLIT_K=split,
            BLOCK=_REDUCE_BLOCK,
            num_warps=4,
        )
    return out

"""Skinny GEMM for decode: y = x @ W^T (+ bias) for a few rows of x, written to stream W at HBM
bandwidth. F.linear (cuBLAS) is the reference.

    skinny_linear(x [M, K], weight [N, K], bias [N] | None, act=, out=, config=) -> y [M, N]
    supports(x, weight, act=)            -> whether skinny_linear takes these operands
    default_config(M, N, K, num_sms)     -> GemvConfig, the explicit heuristic (no autotune;
                                            gemv_config.py, re-exported here)

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

act="silu_mul" (the MLP's down projection) takes x [M, 2K] = [gate | up] and multiplies
silu(gate) * up, computed per x tile in fp32 and rounded to x's dtype exactly as
triton_ops.silu_and_mul rounds it, so the fused call equals silu_and_mul then skinny_linear bit
for bit, one launch and one activation round trip fewer.

Split-K (GemvConfig.split_k > 1) is for shapes whose N gives too few column blocks to cover the
SMs (o_proj and down at N = 4096). Each K slice stores an fp32 partial to a [S, M, N] workspace
and bumps its output tile's arrival counter; the program that arrives last sums the S partials
in slice order 0..S-1, adds the bias and casts. One launch, and deterministic: the sum's order
does not depend on which program finished first. The counters are a persistent zeroed int32
buffer per device that the last program resets, so it is all zero again after every call (CUDA
graph replays rely on it); split-K calls on one device must therefore be stream-ordered.

PDL (pdl.py): with pdl.enabled() the kernel is launched with launch_pdl and compiled with
USE_PDL. Before gdc_wait() a program only does index math and prefetches its first
GemvConfig.prefetch_tiles W tiles into L2 (weights are constant; one prefetch per 128-byte
line), overlapping the previous kernel's tail; x, the workspace and the counters are touched
only after the wait.

Rounding follows F.linear's: products and sums in fp32, bias added in fp32, one cast to x's dtype.
Nothing here syncs the host or allocates outside torch (the workspace is a fresh torch.empty,
graph-pool safe; the counter buffer is allocated on first use, outside capture), so the wrapper
can be captured in a CUDA graph (the config heuristic reads only shapes and the cached SM count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.gemv_config import (
    DOT_BLOCK_M,
    MAX_ROWS,
    GemvConfig,
    choose_split_k,
    ctas_per_sm,
    default_config,
    num_sms,
    with_split_k,
)

__all__ = [
    "MAX_ROWS",
    "GemvConfig",
    "NormedInput",
    "choose_split_k",
    "ctas_per_sm",
    "default_config",
    "skinny_linear",
    "skinny_linear_add",
    "supports",
    "with_split_k",
]

# Triton ships no type information: each @triton.jit kernel carries two narrow ignores rather
# than annotations on its arguments (Triton reads those annotations and would specialise on them);
# a helper with no tl.constexpr argument is an untyped def to mypy and needs only the second.

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_COUNTERS = 1024  # split-K grids have a few hundred tiles: the first buffer fits them all

Activation = Literal["none", "silu_mul"]


# --- Kernels ----------------------------------------------------------------------------------


@triton.jit
def _load_x_tile(x_ptrs, K, mask, SILU_MUL, RMS_NORM, rstd, nw_ptrs):  # type: ignore[no-untyped-def]
    # x's [BLOCK_M, BLOCK_K] tile in x's dtype. With SILU_MUL, rows of x are [gate | up] (2K
    # wide) and the tile is silu(gate) * up with triton_ops.silu_and_mul's roundings: silu in
    # fp32 rounded to x's dtype, times up in fp32, rounded again. With RMS_NORM, x is the
    # residual stream and the tile is weight * (x * rstd) with triton_ops.rms_norm's roundings:
    # the normalised value cast to x's dtype, then the weight product cast again (rstd [BLOCK_M]
    # per row; nw_ptrs the norm weight's BLOCK_K slice, repeated for every row so that the
    # pipeliner streams it like x: a [1, BLOCK_K] load is too narrow for cp.async and would
    # stall every iteration; masked rows fetch nothing). Masked lanes give 0 either way.
    if SILU_MUL:
        gate = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptrs + K, mask=mask, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(x_ptrs.dtype.element_ty).to(tl.float32)
        xk = (act * up).to(x_ptrs.dtype.element_ty)
    elif RMS_NORM:
        xf = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        normed = (xf * rstd[:, None]).to(x_ptrs.dtype.element_ty).to(tl.float32)
        nw = tl.load(nw_ptrs, mask=mask, other=0.0).to(tl.float32)
        xk = (normed * nw).to(x_ptrs.dtype.element_ty)
    else:
        xk = tl.load(x_ptrs, mask=mask, other=0.0)
    return xk


@triton.jit
def _prefetch_w_l2(  # type: ignore[no-untyped-def]
    w_ptr, w_rows, w_row_stride, k_start, k_end, NUM_TILES, BLOCK_K
):
    # One `prefetch` per 128-byte line of each of this program's first NUM_TILES W tiles: a
    # [BLOCK_N, LINES] pointer grid, each pointer the first element of a line of a row (rows
    # start 16-byte aligned, so a row of the tile spans LINES lines, or LINES + 1 when its
    # start is not 128-byte aligned: the last, partial line is then left to the main loop).
    # Columns are clamped into the slice, so no address leaves W. A hint only: nothing waits
    # on it, and the result register of the asm is a dummy.
    LINE: tl.constexpr = 128 // (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    LINES: tl.constexpr = (BLOCK_K + LINE - 1) // LINE
    line_cols = tl.arange(0, LINES) * LINE
    for t in range(NUM_TILES):
        cols = tl.minimum(k_start + t * BLOCK_K + line_cols, k_end - 1)
        ptrs = w_ptr + w_rows[:, None] * w_row_stride + cols[None, :]
        # Plain .L2 (evict_normal), not ::evict_last: the line is read by this program's main
        # loop a few microseconds later, and every kernel's prefetches marked evict_last would
        # outlive their use and crowd the L2 for activations and the KV cache.
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; // dummy $0",
            "=r,l",
            [ptrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit(do_not_specialize=["M"])  # type: ignore[untyped-decorator]
def _skinny_gemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    x_row_stride,
    w_ptr,
    w_row_stride,
    b_ptr,
    y_ptr,
    y_row_stride,
    ws_ptr,
    counter_ptr,
    res_ptr,
    res_row_stride,
    sq_ptr,
    sq_cols,
    nw_ptr,
    eps,
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
    SILU_MUL: tl.constexpr,
    RMS_NORM: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    SQ_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_TILES: tl.constexpr,
):
    # Grid: axis 0 = output tile = column block * row blocks (row block fastest), axis 1 = K
    # slice. M is not specialised (M = 1 would otherwise compile apart from M = 8 and 16).
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

    if USE_PDL:
        # PDL (pdl.py): up to here only index math. W is constant, so its first tiles may be
        # pulled into L2 while the previous kernel finishes; x, the workspace and the counters
        # only after gdc_wait(), which returns once that kernel has completed and its writes
        # are visible.
        if PREFETCH_TILES > 0:
            _prefetch_w_l2(w_ptr, w_rows, w_row_stride, k_start, k_end, PREFETCH_TILES, BLOCK_K)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    # out[j, i] is y[offs_m[i], offs_n[j]].
    y_offs = offs_m.to(tl.int64)[None, :] * y_row_stride + offs_n[:, None]
    y_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    sq = tl.zeros((BLOCK_M, SQ_PAD), dtype=tl.float32)  # unused without RMS_NORM
    if RMS_NORM:
        # x's rows are the residual stream; its producer left S partial sums of squares per
        # row ([M, sq_cols] fp32). Summed in column order, they give rms_norm's variance.
        t = tl.arange(0, SQ_PAD)
        sq = tl.load(
            sq_ptr + x_rows[:, None] * sq_cols + t[None, :],
            mask=m_mask & (t < sq_cols)[None, :],
            other=0.0,
        )
    nw_ptrs = nw_ptr + (k_start + offs_k)[None, :] + 0 * x_rows[:, None]  # only with RMS_NORM
    r_offs = offs_m.to(tl.int64)[None, :] * res_row_stride + offs_n[:, None]
    res = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # unused without ADD_RESIDUAL
    if ADD_RESIDUAL:
        # This tile's residual elements, read here so the load is off the tail's critical
        # path. Safe under split-K: only the tile's last-arriving program writes them, after
        # its own read and after every other program of the tile has arrived (and read).
        res = tl.load(res_ptr + r_offs, mask=y_mask, other=0.0).to(tl.float32)

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        # rstd is loop-invariant, but computed in the loop on purpose (a select on k keeps the
        # compiler from hoisting it): before the loop, its wait on the sq load would come
        # ahead of the pipeline's first W and x copies and add a memory round trip per call.
        rstd = tl.rsqrt(tl.sum(tl.where(k >= k_start, sq, 0.0), axis=1) / K + eps)
        if EVEN_K:
            w = tl.load(w_ptrs)
            xk = _load_x_tile(x_ptrs, K, m_mask, SILU_MUL, RMS_NORM, rstd, nw_ptrs)
        else:
            k_mask = (k + offs_k)[None, :] < K
            w = tl.load(w_ptrs, mask=k_mask, other=0.0)
            xk = _load_x_tile(x_ptrs, K, m_mask & k_mask, SILU_MUL, RMS_NORM, rstd, nw_ptrs)
        if USE_DOT:
            # Swap AB: W's tile is the MMA's M side, the (padded) rows of x its N side.
            acc = tl.dot(w, tl.trans(xk), acc, input_precision=PRECISION)
        else:
            # BLOCK_M == 1: xk is [1, BLOCK_K]; the K reduction waits until after the loop.
            acc += w.to(tl.float32) * xk.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        nw_ptrs += BLOCK_K

    # The CUDA-core path reduces over K once, here: [BLOCK_N, BLOCK_K] -> [BLOCK_N, 1].
    out = acc if USE_DOT else tl.sum(acc, axis=1)[:, None]

    if SPLIT:
        # Workspace [S, M, N] fp32, contiguous: this tile of slice s at ws_tile + s * M * N.
        num_splits = tl.num_programs(1)
        slice_elems = M.to(tl.int64) * N
        ws_tile = ws_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(ws_tile + pid_k * slice_elems, out, mask=y_mask)
        # Arrival: the barrier orders every thread's partial before thread 0's counter update,
        # whose release (gpu scope, cumulative over what the barrier made visible to thread 0)
        # publishes the whole tile. The acquire half, with the barrier after it, lets every
        # thread of the last arrival see all S partials.
        tl.debug_barrier()
        count = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if count == num_splits - 1:
            # Last of the tile's S programs: sum the partials in slice order from 0 (the order
            # fixes the rounding: bit for bit the former separate reduce kernel), then the
            # epilogue (bias in fp32, one cast, a store or a residual add).
            # `.cg` reads from L2, never from this SM's L1, which is not coherent with the
            # other SMs' stores; the loop is not pipelined (no cp.async copies into it).
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # BLOCK_M = 1 without dot
            for s in tl.range(0, num_splits, num_stages=1):
                total += tl.load(
                    ws_tile + s * slice_elems, mask=y_mask, other=0.0, cache_modifier=".cg"
                )
            _epilogue(total, x_ptr, b_ptr, y_ptr, y_offs, y_mask, offs_n, offs_m, N, M, res_ptr,
                      r_offs, res, sq_ptr, sq_cols, pid_n, HAS_BIAS, ADD_RESIDUAL)  # fmt: skip
            # Every program of this tile has arrived: reset for the next call (or graph replay),
            # which cannot start before this kernel completes (under PDL it waits in gdc_wait).
            tl.store(counter_ptr + pid, 0)
    else:
        _epilogue(out, x_ptr, b_ptr, y_ptr, y_offs, y_mask, offs_n, offs_m, N, M, res_ptr, r_offs,
                  res, sq_ptr, sq_cols, pid_n, HAS_BIAS, ADD_RESIDUAL)  # fmt: skip


@triton.jit
def _epilogue(  # type: ignore[no-untyped-def]
    total, x_ptr, b_ptr, y_ptr, y_offs, y_mask, offs_n, offs_m, N, M, res_ptr, r_offs, res, sq_ptr,
    sq_cols, pid_n, HAS_BIAS, ADD_RESIDUAL,
):  # fmt: skip
    # The tile's fp32 result [BLOCK_N, BLOCK_M]: bias in fp32, one cast to x's dtype (as
    # F.linear), then to the output's if that is wider (fp32 logits: F.linear then .float()).
    # With ADD_RESIDUAL the output is added to the residual rows instead of stored,
    # rounded as triton_ops.fused_add_rms_norm rounds the sum, and the tile's sum of squares
    # of the new residual per row goes to sq[row, pid_n] for the next GEMM's RMS_NORM.
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        total += bias[:, None]
    y = total.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
    if ADD_RESIDUAL:
        summed = (y.to(tl.float32) + res).to(y_ptr.dtype.element_ty)
        tl.store(res_ptr + r_offs, summed, mask=y_mask)
        sf = tl.where(y_mask, summed.to(tl.float32), 0.0)
        tl.store(sq_ptr + offs_m * sq_cols + pid_n, tl.sum(sf * sf, axis=0), mask=offs_m < M)
    else:
        tl.store(y_ptr + y_offs, y, mask=y_mask)


# --- Split-K arrival counters -----------------------------------------------------------------

# One zeroed int32 buffer per device, shared by every split-K call (calls on a device are stream
# ordered, so they never overlap) and left all zero by each. Replaced by a larger one when a
# grid outgrows it; the old one is kept alive, since a captured CUDA graph may still use it.
_counters: dict[torch.device, torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tile_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """The device's counter buffer, grown (outside graph capture only) to >= num_tiles."""
    buf = _counters.get(device)
    if buf is not None and buf.numel() >= num_tiles:
        return buf
    if _capturing(device):
        have = 0 if buf is None else buf.numel()
        raise RuntimeError(
            f"skinny_linear: split-K needs {num_tiles} tile counters on {device} but {have} "
            "exist, and they cannot be allocated during CUDA graph capture: run the same "
            "shapes eagerly once before capturing (a warm-up)"
        )
    if buf is not None:
        _retired_counters.append(buf)
    size = max(_MIN_COUNTERS, triton.next_power_of_2(num_tiles))
    buf = _counters[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


# --- Wrapper ----------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor, weight: torch.Tensor, *, act: Activation = "none") -> bool:
    """Whether skinny_linear takes these operands (else use F.linear, after silu_and_mul for
    act="silu_mul").

    weight [N, K] with contiguous rows whose starts are 16-byte aligned (K % 8 == 0 in half
    precision); x [M, K] (act="none") or [M, 2K] = [gate | up] (act="silu_mul") with
    1 <= M <= 16 and K-contiguous rows; both one float dtype, on CUDA (or on the CPU under the
    Triton interpreter).
    """
    if x.dim() != 2 or weight.dim() != 2 or act not in ("none", "silu_mul"):
        return False
    k = weight.shape[1]
    if x.shape[1] != (2 * k if act == "silu_mul" else k):
        return False
    if x.dtype != weight.dtype or x.dtype not in _FLOAT_DTYPES or x.device != weight.device:
        return False
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and _interpreting())):
        return False
    m = x.shape[0]
    e = x.element_size()
    return (
        1 <= m <= MAX_ROWS
        and weight.shape[0] >= 1
        and k >= 1
        and (k * e) % 16 == 0
        and weight.stride(1) == 1
        and (weight.stride(0) * e) % 16 == 0
        and (x.stride(1) == 1 or x.shape[1] == 1)
    )


@dataclass(frozen=True)
class NormedInput:
    """x is the residual stream, RMS-normalised by the GEMM as it loads x (no norm kernel):
    weight * (x * rsqrt(sum(sumsq[row]) / K + eps)), with triton_ops.rms_norm's roundings.

    sumsq [M, S] fp32 are partial sums of squares of x's rows, as skinny_linear_add leaves them
    (summed in column order: the variance's rounding differs from the one-pass norm kernel's
    in the last bits, the formula does not)."""

    weight: torch.Tensor
    sumsq: torch.Tensor
    eps: float


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: Activation = "none",
    norm: NormedInput | None = None,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y = act(x) @ weight^T + bias for weight [N, K], bias [N] → y [M, N] in x's dtype
    (or in fp32 when `out` is: the product rounded to x's dtype first, as F.linear(...).float()).

    act="none": x is [M <= 16, K]. act="silu_mul": x is [M <= 16, 2K] = [gate | up] and act(x)
    is silu(gate) * up, bit for bit triton_ops.silu_and_mul(x) (fused into the x loads).
    norm: x is [M, K] and act(x) is its RMSNorm (NormedInput), applied as x is loaded.
    fp32 accumulation, bias added in fp32, one rounding to x's dtype (as F.linear). `out`
    (optional) is [M, N] in x's dtype or fp32 with contiguous rows; it may be a column slice of
    a wider buffer. config=None picks default_config(M, N, K). Graph-safe: no host syncs; the
    split-K workspace is a fresh torch.empty (a graph's private pool during capture), and the
    split-K counters must exist before capture (any eager call of a split-K shape creates them).
    Launched with PDL when pdl.enabled().
    """
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, act, norm, out, None, config)
    return out


def skinny_linear_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: Activation = "none",
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """residual += act(x) @ weight^T + bias, in place; returns the new residual rows' partial
    sums of squares [M, S] fp32, the `sumsq` of a NormedInput for the next GEMM.

    The product is rounded to the dtype (as skinny_linear returns it), then added to the
    residual in fp32 and rounded again: bit for bit skinny_linear followed by
    triton_ops.fused_add_rms_norm's residual update. residual is [M, N] with contiguous rows.
    """
    M, N = residual.shape[0], weight.shape[0]
    assert residual.shape == (x.shape[0], N), (residual.shape, x.shape, weight.shape)
    cfg = _config(x, weight, config)
    sumsq = torch.empty((M, triton.cdiv(N, cfg.block_n)), dtype=torch.float32, device=x.device)
    _launch(x, weight, bias, act, None, residual, sumsq, cfg)
    return sumsq


def _config(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None) -> GemvConfig:
    if config is not None:
        return config
    return default_config(x.shape[0], *weight.shape, num_sms=num_sms(x.device))


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: Activation,
    norm: NormedInput | None,
    out: torch.Tensor,
    sumsq: torch.Tensor | None,
    config: GemvConfig | None,
) -> None:
    """One kernel launch: out = act(x) @ W^T + b, or out += that (sumsq given: out is the
    residual and sumsq receives its per-tile sums of squares)."""
    assert act in ("none", "silu_mul"), act
    assert act == "none" or norm is None, "act and norm do not combine"
    assert norm is None or sumsq is None, "a GEMM normalises its input or adds, not both"
    assert x.dim() == 2 and weight.dim() == 2, (x.shape, weight.shape)
    M = x.shape[0]
    N, K = weight.shape
    x_cols = 2 * K if act == "silu_mul" else K
    assert x.shape[1] == x_cols, ("x and weight disagree on K", act, x.shape, weight.shape)
    assert x.dtype in _FLOAT_DTYPES and weight.dtype == x.dtype, (x.dtype, weight.dtype)
    assert x.stride(1) == 1 or x_cols == 1, ("x rows must be contiguous", x.stride())
    assert weight.stride(1) == 1, ("weight rows must be contiguous", weight.stride())
    assert M <= MAX_ROWS, ("skinny_linear takes at most 16 rows; use F.linear", M)
    assert x.device == weight.device, (x.device, weight.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1, (bias.shape, bias.stride(), N)
        assert bias.dtype == x.dtype and bias.device == x.device, (bias.dtype, bias.device)
    assert out.shape == (M, N), (out.shape, (M, N))
    wide = out.dtype == torch.float32 and sumsq is None  # fp32 logits from a half-precision x
    assert out.dtype == x.dtype or wide, ("out is x's dtype (or fp32)", out.dtype, x.dtype)
    assert out.stride(1) == 1 or N == 1, ("out rows must be contiguous", out.stride())
    assert out.device == x.device, (out.device, x.device)
    if norm is not None:
        assert norm.weight.shape == (K,) and norm.weight.stride(0) == 1, norm.weight.shape
        assert norm.weight.dtype == x.dtype, (norm.weight.dtype, x.dtype)
        assert norm.sumsq.dim() == 2 and norm.sumsq.shape[0] == M, (norm.sumsq.shape, M)
        assert norm.sumsq.dtype == torch.float32 and norm.sumsq.is_contiguous()
    if M == 0 or N == 0:
        return
    assert K >= 1, "K == 0 is not a product"

    cfg = _config(x, weight, config)
    block_m = DOT_BLOCK_M if cfg.use_dot else 1
    assert cfg.block_k >= 16 and cfg.block_k == triton.next_power_of_2(cfg.block_k), cfg
    assert cfg.block_n == triton.next_power_of_2(cfg.block_n), cfg
    assert cfg.block_n >= 16 or not cfg.use_dot, ("tl.dot needs BLOCK_N >= 16", cfg)
    assert cfg.split_k >= 1 and cfg.prefetch_tiles >= 0, cfg

    # Region map of K for split S: slices of `tiles_per_split` whole tiles, the last one short;
    # S is recomputed so that no slice is empty (S = 4 over 9 tiles gives 3 slices of 3).
    k_tiles = triton.cdiv(K, cfg.block_k)
    tiles_per_split = triton.cdiv(k_tiles, min(cfg.split_k, k_tiles))
    split = triton.cdiv(k_tiles, tiles_per_split)
    k_per_split = tiles_per_split * cfg.block_k
    num_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, cfg.block_n)
    grid = (num_tiles, split)
    # tl.dot on fp32 defaults to TF32: ask for full fp32 products, like F.linear's default.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if split > 1:
        # Every (slice, row, col) of the workspace is written before it is read: no zeroing.
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device, num_tiles)
    else:
        ws = counters = out  # unread when SPLIT is False
    use_pdl = pdl.enabled()
    if sumsq is not None:
        assert sumsq.shape == (M, triton.cdiv(N, cfg.block_n)) and sumsq.is_contiguous()
    sq = norm.sumsq if norm is not None else sumsq
    sq_cols = 1 if sq is None else sq.shape[1]
    _skinny_gemm_kernel[grid](
        x,
        x.stride(0),
        weight,
        weight.stride(0),
        x if bias is None else bias,  # unread when HAS_BIAS is False
        out,
        out.stride(0),
        ws,
        counters,
        out,  # the residual, read and written only with ADD_RESIDUAL
        out.stride(0),
        out if sq is None else sq,  # read only with RMS_NORM, written only with ADD_RESIDUAL
        sq_cols,
        x if norm is None else norm.weight,  # read only with RMS_NORM
        0.0 if norm is None else norm.eps,
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
        SILU_MUL=act == "silu_mul",
        RMS_NORM=norm is not None,
        ADD_RESIDUAL=sumsq is not None,
        SQ_PAD=triton.next_power_of_2(sq_cols),
        USE_PDL=use_pdl,
        PREFETCH_TILES=cfg.prefetch_tiles if use_pdl else 0,  # one compile when PDL is off
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl.launch_kwargs(),
    )

"""Launch shapes of the skinny decode GEMM (triton_gemv.py): GemvConfig and the heuristic that
picks one from (M, N, K) and the SM count. Pure arithmetic on shapes, no kernels: the wrapper
calls it on every launch, including during CUDA graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton

DOT_BLOCK_M = 16
"""tl.dot needs every dim >= 16; rows of x past M are clamped copies, never stored."""
_SMEM_PER_SM = 227 * 1024  # H100/H200 shared memory a block may use; sets CTAs per SM
_DEFAULT_NUM_SMS = 132  # H100 SXM; the interpreter (CPU) has no device to ask
MAX_ROWS = 16
"""Most rows of x one call takes: the padded MMA side of the tensor-core path."""


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of skinny_linear; default_config picks one from (M, N, K)."""

    block_n: int = 64
    """Rows of W (output columns) per program; >= 16 on the tensor-core path."""
    block_k: int = 128
    """K elements per tile: a power of two >= 16."""
    split_k: int = 1
    """K slices (programs along grid axis 1); > 1 adds the fp32 workspace and tile counters."""
    num_warps: int = 4
    """Warps per program (4 = one Hopper warpgroup)."""
    num_stages: int = 4
    """Software-pipeline depth of the K loop: tiles in flight per program is num_stages - 1."""
    use_dot: bool = True
    """Tensor cores (swap-AB tl.dot) when True; CUDA-core FMAs, one program per row, when False."""
    prefetch_tiles: int = 2
    """W tiles each program prefetches into L2 before gdc_wait() when PDL is on; 0 = none."""


# --- Heuristic --------------------------------------------------------------------------------


def ctas_per_sm(config: GemvConfig, element_size: int = 2) -> int:
    """Programs resident per SM, estimated: by shared memory on the tensor-core path (num_stages
    buffers of the W and x tiles), by registers on the CUDA-core path (the fp32 accumulator
    tile, the loaded W tile, ~32 more), and by the 64 warps an SM holds."""
    threads = 32 * config.num_warps
    by_warps = 64 // config.num_warps
    tile = config.block_n * config.block_k
    if config.use_dot:
        smem = config.num_stages * (config.block_n + DOT_BLOCK_M) * config.block_k * element_size
        return max(1, min(by_warps, _SMEM_PER_SM // smem))
    regs = tile // threads + tile * element_size // 4 // threads + 32
    return max(1, min(by_warps, 65536 // (regs * threads)))


def choose_split_k(
    num_col_blocks: int, k_tiles: int, resident: int, *, min_tiles_per_split: int = 4
) -> int:
    """K slices (a power of two) so that the grid fills one wave of resident programs.

    The kernel is memory-bound: once ~all SMs hold programs with tiles in flight, HBM is the
    limit. K is split while doubling the slices still fits the grid in one wave (o_proj and
    down at N = 4096: 64 column blocks, 4 slices = 256 programs for 264 slots), and a slice
    keeps at least min_tiles_per_split tiles (the pipeline needs a few to reach its steady
    state). A grid past one wave runs a ragged second wave and pays the split's reduction
    anyway: qkv (96 column blocks) took 4 slices under a looser rule and measured faster with 2
    (docs/perf.md). Shapes that fill the SMs without splitting (gate_up, the LM head) keep 1.
    """
    split = 1
    while (
        num_col_blocks * split * 2 <= resident
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
def num_sms(device: torch.device) -> int:
    # Cached device properties: no sync, safe during graph capture.
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)

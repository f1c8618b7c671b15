"""Greedy sampling's argmax over the vocabulary in one launch: torch.argmax(x, dim=-1), faster.

    argmax(x [M, V]) -> [M] int64, the index of each row's largest value (the first one on ties;
    the first NaN if the row has any, as torch.argmax)

torch's reduction gives a batch-1 row of 128k fp32 logits to a few thread blocks: 38 us on an
H100, 0.7% of a Llama-3.1-8B decode step (engine bench.step_timeline). Here each row is cut into
CHUNK-element slices, one program each (32 programs for 128k), that reduce their slice to a
(value, first index) pair; the program that arrives last for its row (an arrival counter, as in
triton_gemv's split-K) reduces the row's pairs in slice order and writes the result. The
order makes the result exact and deterministic: the first slice holding the maximum gives the
lowest index. The counters are a zeroed int32 buffer per device that each row's last program
resets, so calls on one device must be stream-ordered (the sampler's are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096
"""Elements per program: 16 KB of fp32 logits."""
_MAX_INDEX = 2**31 - 1
_BIG = tl.constexpr(_MAX_INDEX)  # no index reaches it: the "none" of a min over indices

_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit  # type: ignore[untyped-decorator]
def _argmax_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    x_row_stride,
    part_val_ptr,  # [M, num_chunks] fp32: each slice's maximum (NaN if it holds a NaN)
    part_idx_ptr,  # [M, num_chunks] int32: its first index
    counter_ptr,
    out_ptr,
    V,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < V
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + offs, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    best = tl.max(tl.where(is_nan, float("-inf"), x), axis=0)
    hit = tl.where(has_nan, is_nan, (x == best) & mask)
    idx = tl.min(tl.where(hit, offs, _BIG), axis=0)
    part = row * num_chunks + chunk
    tl.store(part_val_ptr + part, tl.where(has_nan, float("nan"), best))
    tl.store(part_idx_ptr + part, idx)
    # Arrival (see triton_gemv's split-K): the barrier orders every thread's stores before the
    # release; the acquire lets the last program see every slice's pair.
    tl.debug_barrier()
    count = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if count == num_chunks - 1:
        c = tl.arange(0, CHUNKS_PAD)
        c_mask = c < num_chunks
        base = row * num_chunks + c
        vals = tl.load(part_val_ptr + base, mask=c_mask, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + base, mask=c_mask, other=_BIG, cache_modifier=".cg")
        nans = vals != vals
        any_nan = tl.max(nans.to(tl.int32), axis=0) > 0
        top = tl.max(tl.where(nans, float("-inf"), vals), axis=0)
        pick = tl.where(any_nan, nans, (vals == top) & c_mask)
        tl.store(out_ptr + row, tl.min(tl.where(pick, idxs, _BIG), axis=0).to(tl.int64))
        tl.store(counter_ptr + row, 0)  # every slice of this row has arrived


def _row_counters(device: torch.device, rows: int) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None or buf.numel() < rows:
        # Replacing the buffer is safe: kernels still queued on it finish before the caching
        # allocator hands its memory out again (same stream).
        buf = _counters[device] = torch.zeros(max(1024, rows), dtype=torch.int32, device=device)
    return buf


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for x [M, V] (fp32, bf16 or fp16, rows K-contiguous): [M] int64."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    M, V = x.shape
    assert 0 < V < _MAX_INDEX, V
    out = torch.empty(M, dtype=torch.int64, device=x.device)
    if M == 0:
        return out
    num_chunks = triton.cdiv(V, CHUNK)
    part_val = torch.empty(M, num_chunks, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(M, num_chunks, dtype=torch.int32, device=x.device)
    _argmax_kernel[(M, num_chunks)](
        x,
        x.stride(0),
        part_val,
        part_idx,
        _row_counters(x.device, M),
        out,
        V,
        CHUNK=CHUNK,
        CHUNKS_PAD=triton.next_power_of_2(num_chunks),
        num_warps=8,
    )
    return out

"""Triton kernels for the memory-bound ops around the GEMMs and attention, with typed wrappers.

Every op here reads each input element once and writes each output element once, accumulating in
float32; the plain-torch references (and the oracles in tests) live in ops_ref.py. Wrappers check
shapes, dtypes and strides and pass strides through, so views (q/k/v slices of a fused QKV output,
a per-layer slice of a KV pool) are used without copies. Row offsets are formed in int64: at
prefill sizes, row * stride overflows int32 (e.g. 64k tokens x 32k intermediate).

    rms_norm(x, weight, eps)                       -> normed
    fused_add_rms_norm(x, residual, weight, eps)   -> (normed, residual), residual updated in place
    embedding_sumsq(ids, table)                    -> (table[ids], per-row sums of squares)
    rotary_embedding(positions, q, k, cos_half, sin_half, inplace=...) -> (q_rot, k_rot)
    silu_and_mul(x)                                -> silu(x[..., :I]) * x[..., I:]
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping)  (slots < 0 are padding, skipped)
The attention prologue fused into one launch (norm, RoPE, KV write) is triton_prologue.py.

Every kernel takes a constexpr USE_PDL (pdl.py): compiled with it, a program does only index math
and weight reads, then gdc_wait(), then gdc_launch_dependents(), then everything else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels import pdl

# Triton ships no type information, and mypy 2.x applies pyproject's `strict` override to this
# module too, so each @triton.jit kernel with constexpr parameters carries two narrow ignores
# rather than annotations on its arguments (Triton reads those and would specialise on them).

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _num_warps(tile: int) -> int:
    # At least 8 elements per thread, so each thread's bf16 accesses are 16 bytes wide (fewer
    # elements per thread and Triton's layout narrows the vectors); at most 16 warps.
    return max(1, min(16, tile // 256 // 2))


# --- RMSNorm, with or without the residual add ------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    x_row_stride,
    res_ptr,
    res_row_stride,
    w_ptr,
    out_ptr,
    out_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per row; the whole row lives in registers, so x (and residual) are read once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + row * res_row_stride + cols
        res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the model dtype before the norm reads it: the engine materialises
        # `hidden + sublayer(...)` in that dtype, and greedy parity with HF depends on it.
        new_res = (x + res).to(res_ptr.dtype.element_ty)
        tl.store(res_ptrs, new_res, mask=mask)
        x = new_res.to(tl.float32)
    # Masked lanes hold 0, so they add nothing to the sum; divide by the true width.
    variance = tl.sum(x * x, axis=0) / n_cols
    normed = x * tl.rsqrt(variance + eps)
    # HF casts the normalised value to the input dtype before the weight multiply; so do we.
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask)


def _check_rows(name: str, t: torch.Tensor, n_cols: int) -> None:
    assert t.dim() == 2 and t.shape[1] == n_cols, (name, tuple(t.shape), n_cols)
    assert t.stride(1) == 1, (name, "last dim must be contiguous", t.stride())
    assert t.dtype in _FLOAT_DTYPES, (name, t.dtype)


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
) -> None:
    n_rows, n_cols = x.shape
    _check_rows("x", x, n_cols)
    _check_rows("out", out, n_cols)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype, x.shape, x.dtype)
    assert weight.shape == (n_cols,) and weight.stride(0) == 1, (weight.shape, weight.stride())
    assert weight.dtype == x.dtype, ("weight must be in the model dtype", weight.dtype, x.dtype)
    if residual is not None:
        _check_rows("residual", residual, n_cols)
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
    assert x.device == weight.device == out.device, (x.device, weight.device, out.device)
    if n_rows == 0:
        return
    block_n = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x,
        x.stride(0),
        x if residual is None else residual,  # unread when HAS_RESIDUAL is False
        0 if residual is None else residual.stride(0),
        weight,
        out,
        out.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        USE_PDL=pdl.enabled(),
        num_warps=_num_warps(block_n),
        **pdl.launch_kwargs(),
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF RMSNorm over the last dim of x [..., N]; weight [N] in x's dtype. `out` may be x."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    assert out.shape == x.shape, (out.shape, x.shape)
    # x may be copied to flatten it (it is only read); out must be written through a view.
    rows = x.reshape(-1, x.shape[-1])
    out_rows = out if out.dim() == 2 else out.view(-1, out.shape[-1])
    _launch_rms_norm(rows, None, weight, out_rows, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place, in the model dtype), then return (rms_norm(residual), residual).

    x, residual: [tokens, N]. Pass out=x to normalise into x as well (each row is read whole
    before any of it is written, so aliasing is safe). One read and one write of each tensor.
    """
    assert x.dim() == 2 and residual.shape == x.shape, (x.shape, residual.shape)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _launch_rms_norm(x, residual, weight, out, eps)
    return out, residual


@triton.jit  # type: ignore[untyped-decorator]
def _embed_sumsq_kernel(  # type: ignore[no-untyped-def]
    ids_ptr,
    table_ptr,
    table_row_stride,
    out_ptr,
    out_row_stride,
    sq_ptr,
    n_cols,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per token: its table row, copied, and the row's sum of squares in fp32.
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tok = tl.load(ids_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(table_ptr + tok * table_row_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    tl.store(sq_ptr + row, tl.sum(xf * xf, axis=0))


def embedding_sumsq(ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding lookup with each row's sum of squares: (table[ids] [T, D], sumsq [T, 1]
    fp32), the sumsq a NormedInput (triton_gemv) takes, so the first layer's input norm needs no
    kernel of its own. ids: [T] ints, each in [0, table rows) (not checked on the device)."""
    assert ids.dim() == 1 and not ids.is_floating_point() and ids.is_contiguous(), ids.shape
    assert table.dim() == 2, table.shape
    _check_rows("table", table, table.shape[1])
    assert ids.device == table.device, (ids.device, table.device)
    n_rows, n_cols = ids.shape[0], table.shape[1]
    out = torch.empty((n_rows, n_cols), dtype=table.dtype, device=table.device)
    sumsq = torch.empty((n_rows, 1), dtype=torch.float32, device=table.device)
    if n_rows == 0:
        return out, sumsq
    block_n = triton.next_power_of_2(n_cols)
    _embed_sumsq_kernel[(n_rows,)](
        ids,
        table,
        table.stride(0),
        out,
        out.stride(0),
        sumsq,
        n_cols,
        BLOCK_N=block_n,
        USE_PDL=pdl.enabled(),
        num_warps=_num_warps(block_n),
        **pdl.launch_kwargs(),
    )
    return out, sumsq


# --- Rotary embedding (neox: dim i pairs with i + D/2) ----------------------------------------


@triton.jit  # no annotations at all: nothing for mypy to flag on the decorator
def _rope_halves(x1, x2, cos, sin):  # type: ignore[no-untyped-def]
    # x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1], in float32. Shared
    # by both RoPE kernels: the same expression compiles to the same (FMA-contracted) arithmetic.
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit  # type: ignore[untyped-decorator]
def _rotate_heads(  # type: ignore[no-untyped-def]
    in_ptr,
    in_head_stride,
    out_ptr,
    out_head_stride,
    NUM_HEADS: tl.constexpr,
    cos,
    sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, NUM_HEADS, BLOCK_H):
        h = h0 + heads
        mask = (h < NUM_HEADS) & (d < HALF)
        src = in_ptr + h * in_head_stride + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = _rope_halves(x1, x2, cos, sin)
        dst = out_ptr + h * out_head_stride + d
        tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _rope_kernel(  # type: ignore[no-untyped-def]
    pos_ptr,
    cos_ptr,
    sin_ptr,
    cache_row_stride,
    q_ptr,
    q_tok_stride,
    q_head_stride,
    q_out_ptr,
    q_out_tok_stride,
    q_out_head_stride,
    k_ptr,
    k_tok_stride,
    k_head_stride,
    k_out_ptr,
    k_out_tok_stride,
    k_out_head_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Head counts are constexpr (fixed per model, so one compile): the head loops unroll, and
    # the interpreter cannot pass a run-time loop bound into a nested jit function.
    # One program per token: its cos/sin row is gathered once and shared by all q and k heads.
    tok = tl.program_id(0).to(tl.int64)
    if USE_PDL:  # positions are refilled by the host every step: read them after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cs_mask = d < HALF
    cos = tl.load(cos_ptr + pos * cache_row_stride + d, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cache_row_stride + d, mask=cs_mask, other=0.0).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]
    _rotate_heads(
        q_ptr + tok * q_tok_stride,
        q_head_stride,
        q_out_ptr + tok * q_out_tok_stride,
        q_out_head_stride,
        NUM_Q_HEADS,
        cos,
        sin,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr + tok * k_tok_stride,
        k_head_stride,
        k_out_ptr + tok * k_out_tok_stride,
        k_out_head_stride,
        NUM_K_HEADS,
        cos,
        sin,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )


def _check_heads(name: str, t: torch.Tensor, num_tokens: int, head_dim: int) -> None:
    assert t.dim() == 3 and t.shape[0] == num_tokens and t.shape[2] == head_dim, (name, t.shape)
    assert t.stride(2) == 1, (name, "head_dim must be contiguous", t.stride())
    assert t.dtype in _FLOAT_DTYPES, (name, t.dtype)


def _check_index(name: str, t: torch.Tensor, num_tokens: int) -> None:
    """positions / slot_mapping: [T] int32 or int64, contiguous."""
    assert t.shape == (num_tokens,), (name, t.shape, num_tokens)
    assert t.dtype in (torch.int32, torch.int64), (name, t.dtype)
    assert t.stride(0) == 1 or num_tokens <= 1, (name, t.stride())


def _check_tables(cos_half: torch.Tensor, sin_half: torch.Tensor, head_dim: int) -> None:
    assert cos_half.dim() == 2 and cos_half.shape[1] == head_dim // 2, (cos_half.shape, head_dim)
    assert sin_half.shape == cos_half.shape and sin_half.stride() == cos_half.stride()
    assert cos_half.stride(1) == 1, cos_half.stride()


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox RoPE on q [T, Hq, D] and k [T, Hk, D] at positions [T] → (q_rot, k_rot).

    cos_half, sin_half: [max_positions, D // 2] (RotaryEmbedding's tables, any float dtype).
    q and k may be strided views (e.g. of a fused QKV output); inplace=True rotates them there
    and returns them, otherwise fresh contiguous tensors are returned and q, k are untouched.
    Positions must lie in [0, max_positions): they index the tables unchecked, as on the GPU a
    check would cost a host sync.
    """
    num_tokens, _, head_dim = q.shape
    half = head_dim // 2
    assert head_dim == 2 * half, head_dim
    _check_heads("q", q, num_tokens, head_dim)
    _check_heads("k", k, num_tokens, head_dim)
    assert k.dtype == q.dtype, (q.dtype, k.dtype)
    _check_index("positions", positions, num_tokens)
    _check_tables(cos_half, sin_half, head_dim)
    assert q.device == k.device == positions.device == cos_half.device == sin_half.device
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    max_heads = max(q.shape[1], k.shape[1])
    # A [heads, D/2] tile of about 2k elements per operand half keeps registers in check.
    block_h = min(triton.next_power_of_2(max(max_heads, 1)), max(1, 2048 // block_half))
    _rope_kernel[(num_tokens,)](
        positions,
        cos_half,
        sin_half,
        cos_half.stride(0),
        q,
        q.stride(0),
        q.stride(1),
        q_out,
        q_out.stride(0),
        q_out.stride(1),
        k,
        k.stride(0),
        k.stride(1),
        k_out,
        k_out.stride(0),
        k_out.stride(1),
        NUM_Q_HEADS=q.shape[1],
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        USE_PDL=pdl.enabled(),
        num_warps=_num_warps(block_h * block_half),
        **pdl.launch_kwargs(),
    )
    return q_out, k_out


# --- SiLU and multiply (SwiGLU activation) ----------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, x_row_stride, out_ptr, out_row_stride, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    gate_ptrs = x_ptr + row * x_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu(gate) is rounded to the model dtype before the multiply in the engine's MLP.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] = [gate | up] → silu(gate) * up, [..., I]; out (if given) must be contiguous."""
    n_cols = x.shape[-1] // 2
    assert x.shape[-1] == 2 * n_cols, x.shape
    rows = x.reshape(-1, 2 * n_cols)  # a view whenever the leading dims flatten without a copy
    _check_rows("x", rows, 2 * n_cols)
    out_shape = (*x.shape[:-1], n_cols)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    assert out.shape == out_shape and out.dtype == x.dtype, (out.shape, out.dtype, out_shape)
    assert out.is_contiguous() and out.device == x.device, (out.stride(), out.device)
    n_rows = rows.shape[0]
    if n_rows == 0 or n_cols == 0:
        return out
    block = min(1024, triton.next_power_of_2(n_cols))
    grid = (n_rows, triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](
        rows,
        rows.stride(0),
        out,
        n_cols,
        n_cols,
        BLOCK=block,
        USE_PDL=pdl.enabled(),
        num_warps=_num_warps(block),
        **pdl.launch_kwargs(),
    )
    return out


# --- KV-cache write by slot mapping -----------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _write_kv_kernel(  # type: ignore[no-untyped-def]
    key_ptr,
    key_tok_stride,
    key_head_stride,
    value_ptr,
    value_tok_stride,
    value_head_stride,
    k_cache_ptr,
    v_cache_ptr,
    cache_slot_stride,
    cache_head_stride,
    slot_ptr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    if USE_PDL:  # the slot mapping is refilled by the host every step: read it after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    # slot < 0 marks padding (CUDA-graph batches padded to a captured size): nothing is read or
    # written, via the mask, so padded rows never clobber a live sequence's cache.
    valid = slot >= 0
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    for h0 in range(0, NUM_HEADS, BLOCK_H):
        h = h0 + heads
        mask = (h < NUM_HEADS) & (d < HEAD_DIM) & valid
        dst = slot * cache_slot_stride + h * cache_head_stride + d
        k = tl.load(key_ptr + tok * key_tok_stride + h * key_head_stride + d, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(value_ptr + tok * value_tok_stride + h * value_head_stride + d, mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_caches(
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, head_dim: int
) -> None:
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim), (k_cache.shape,)
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _FLOAT_DTYPES, k_cache.dtype
    block_size = k_cache.shape[1]
    # Flat slot addressing needs blocks laid end to end and head_dim contiguous.
    assert k_cache.stride(3) == 1 and k_cache.stride(0) == block_size * k_cache.stride(1), (
        k_cache.stride()
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slots [T].

    A slot is block_id * block_size + offset; slots < 0 are skipped. Slots are not bounds-checked
    (a check would cost a host sync); the scheduler owns their validity.
    """
    num_tokens, num_heads, head_dim = key.shape
    _check_heads("key", key, num_tokens, head_dim)
    _check_heads("value", value, num_tokens, head_dim)
    assert value.shape == key.shape, (value.shape, key.shape)
    _check_caches(k_cache, v_cache, num_heads, head_dim)
    _check_index("slot_mapping", slot_mapping, num_tokens)
    assert key.device == value.device == k_cache.device == v_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    _write_kv_kernel[(num_tokens,)](
        key,
        key.stride(0),
        key.stride(1),
        value,
        value.stride(0),
        value.stride(1),
        k_cache,
        v_cache,
        k_cache.stride(1),
        k_cache.stride(2),
        slot_mapping,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        USE_PDL=pdl.enabled(),
        num_warps=_num_warps(block_h * block_d),
        **pdl.launch_kwargs(),
    )

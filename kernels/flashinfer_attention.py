"""FlashInfer paged attention for a mixed batch: a second CUDA backend, same contract as Triton's.

Contract (attention_ref.paged_attention, triton_attention.triton_paged_attention): q is the packed
ragged batch [num_tokens, num_heads, head_dim]; sequence s owns rows query_start_loc[s]:
query_start_loc[s + 1] and has seq_lens[s] tokens of context after this step, its new tokens last
(causal, bottom-right aligned); the new tokens' K/V are already in the paged cache, k_cache and
v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].

Mapping onto FlashInfer (0.5.3):
  - our cache is FlashInfer's "NHD" paged layout, passed as the tuple (k_cache, v_cache);
    a block is a page, block_size is page_size;
  - a sequence's pages are CSR: kv_indices[kv_indptr[i]:kv_indptr[i + 1]] is the first
    ceil(seq_len / block_size) entries of its block-table row, and kv_last_page_len[i] =
    seq_len - (pages - 1) * block_size, in 1..block_size (flashinfer_indices builds these);
  - single-token sequences -> BatchDecodeWithPagedKVCacheWrapper (tensor cores when GQA);
    longer ones -> BatchPrefillWithPagedKVCacheWrapper(causal=True), whose causal mask puts
    query i at position kv_len - q_len + i: our bottom-right alignment; qo_indptr is the
    cumulative query lengths of those sequences;
  - sequences with no new tokens own no rows and appear in neither wrapper.
The wrappers are made once per workspace and re-planned every step: plan_flashinfer plans both
(host work, the one JIT compile on first use), every layer then calls flashinfer_paged_attention
with the same FlashInferPlan. A group whose rows are one contiguous run of the packed batch runs
on slices of q and out; otherwise its rows are gathered and scattered back (index_copy_).
"""

from __future__ import annotations

import functools
import importlib
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "FlashInferIndices",
    "FlashInferPlan",
    "PagedKVIndices",
    "flashinfer_available",
    "flashinfer_indices",
    "flashinfer_paged_attention",
    "plan_flashinfer",
]

# Tensor-core decode runs FlashInfer's fa2 batch-prefill kernels; prefill on fa2 too makes the
# two share one JIT module (one compile instead of two) and works on every arch. "auto" would
# pick fa3 on Hopper: faster on long prefills, a second multi-minute compile.
PREFILL_BACKEND = "fa2"


@dataclass(frozen=True)
class PagedKVIndices:
    """One wrapper's share of a step in FlashInfer's CSR page-table form (int32 unless noted).

    The indptr and last-page tensors stay on the host: FlashInfer's plan() reads them there
    (a device tensor would cost it a device-to-host sync) and copies them over itself.
    """

    seqs: tuple[int, ...]
    """Batch index of each of its sequences, in batch order."""
    num_rows: int
    """Query tokens of its sequences (= qo_indptr[-1])."""
    row_start: int | None
    """Its rows are the packed rows row_start:row_start + num_rows, when that run is contiguous."""
    rows: torch.Tensor | None
    """[num_rows] int64 on block_tables' device: packed row of each query; None when contiguous."""
    qo_indptr: torch.Tensor
    """[num_seqs + 1] host: cumulative query lengths (rows of the gathered or sliced q)."""
    kv_indptr: torch.Tensor
    """[num_seqs + 1] host: cumulative page counts, ceil(seq_len / block_size) each."""
    kv_indices: torch.Tensor
    """[kv_indptr[-1]] on block_tables' device: the pages (block ids), sequence after sequence."""
    kv_last_page_len: torch.Tensor
    """[num_seqs] host: tokens in each sequence's last page, 1..block_size."""


@dataclass(frozen=True)
class FlashInferIndices:
    decode: PagedKVIndices
    """Single-token sequences (BatchDecodeWithPagedKVCacheWrapper)."""
    prefill: PagedKVIndices
    """Sequences with two or more new tokens (BatchPrefillWithPagedKVCacheWrapper)."""


def flashinfer_indices(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    block_size: int,
) -> FlashInferIndices:
    """FlashInfer's page-table tensors for one step, split into decodes and prefills.

    Pure (no FlashInfer needed; runs on CPU tensors too). Host lists become small host tensors;
    the page indices are gathered from block_tables on its own device after one host-to-device
    copy of a few per-sequence numbers (and of the row maps, only when a group's rows are not
    contiguous), with no device-to-host sync.
    """
    num_seqs = len(seq_lens)
    assert len(query_start_loc) == num_seqs + 1, (len(query_start_loc), num_seqs)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, block_tables.shape
    width = block_tables.shape[1]
    decode_seqs: list[int] = []
    prefill_seqs: list[int] = []
    for s in range(num_seqs):
        q_len = query_start_loc[s + 1] - query_start_loc[s]
        assert 0 <= q_len <= seq_lens[s], (s, q_len, seq_lens[s])
        assert -(-seq_lens[s] // block_size) <= width, (s, seq_lens[s], width)
        if q_len == 1:
            decode_seqs.append(s)
        elif q_len > 1:
            prefill_seqs.append(s)

    # Sequence s's j-th page sits at flat position s * width + j of block_tables. Over all group
    # sequences (decodes first) with global page offsets K[i], position of global page t is
    # base[i] + t for the owner i of t, base[i] = s_i * width - K[i]: a repeat_interleave.
    seqs = decode_seqs + prefill_seqs
    pages = [-(-seq_lens[s] // block_size) for s in seqs]
    base: list[int] = []
    total_pages = 0
    for s, p in zip(seqs, pages, strict=True):
        base.append(s * width - total_pages)
        total_pages += p
    groups = [_rows_of(decode_seqs, query_start_loc), _rows_of(prefill_seqs, query_start_loc)]
    row_maps = [rows for _, rows in groups]  # empty when the group's rows are contiguous

    # One host-to-device copy; region map of `packed` (int64, lengths in brackets):
    #   base [G] | pages [G] | decode rows [0 or D rows] | prefill rows [0 or P rows]
    parts = [base, pages, *row_maps]
    packed = torch.tensor([x for part in parts for x in part], dtype=torch.int64)
    packed = packed.to(block_tables.device)
    base_t, pages_t, decode_rows_t, prefill_rows_t = torch.split(packed, [len(p) for p in parts])
    if seqs:
        # output_size: the length is known on the host, so no sync to size the result.
        pos = base_t.repeat_interleave(pages_t, output_size=total_pages)
        pos += torch.arange(total_pages, device=pos.device)
        all_indices = block_tables.reshape(-1).index_select(0, pos).to(torch.int32)
    else:
        all_indices = torch.empty(0, dtype=torch.int32, device=block_tables.device)
    num_decode_pages = sum(pages[: len(decode_seqs)])
    return FlashInferIndices(
        decode=_group(
            decode_seqs,
            seq_lens,
            query_start_loc,
            block_size,
            groups[0][0],
            decode_rows_t,
            all_indices[:num_decode_pages],
        ),
        prefill=_group(
            prefill_seqs,
            seq_lens,
            query_start_loc,
            block_size,
            groups[1][0],
            prefill_rows_t,
            all_indices[num_decode_pages:],
        ),
    )


def _rows_of(seqs: list[int], query_start_loc: list[int]) -> tuple[int | None, list[int]]:
    """(row_start, []) when the sequences' rows are one contiguous run, else (None, rows)."""
    if not seqs:
        return 0, []
    contiguous = all(
        query_start_loc[a + 1] == query_start_loc[b] for a, b in itertools.pairwise(seqs)
    )
    if contiguous:
        return query_start_loc[seqs[0]], []
    return None, [r for s in seqs for r in range(query_start_loc[s], query_start_loc[s + 1])]


def _group(
    seqs: list[int],
    seq_lens: list[int],
    query_start_loc: list[int],
    block_size: int,
    row_start: int | None,
    rows: torch.Tensor,
    kv_indices: torch.Tensor,
) -> PagedKVIndices:
    qo_indptr, kv_indptr, last_page_len = [0], [0], []
    for s in seqs:
        pages = -(-seq_lens[s] // block_size)
        qo_indptr.append(qo_indptr[-1] + query_start_loc[s + 1] - query_start_loc[s])
        kv_indptr.append(kv_indptr[-1] + pages)
        last_page_len.append(seq_lens[s] - (pages - 1) * block_size)
    return PagedKVIndices(
        seqs=tuple(seqs),
        num_rows=qo_indptr[-1],
        row_start=row_start,
        rows=None if row_start is not None else rows,
        qo_indptr=torch.tensor(qo_indptr, dtype=torch.int32),
        kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32),
        kv_indices=kv_indices,
        kv_last_page_len=torch.tensor(last_page_len, dtype=torch.int32),
    )


@functools.cache
def _flashinfer() -> Any:
    """The flashinfer module, imported on first use (seconds: it sets up its JIT)."""
    return importlib.import_module("flashinfer")


def flashinfer_available() -> bool:
    """Whether flashinfer imports here (it does not say whether a GPU is present)."""
    try:
        _flashinfer()
    except (ImportError, OSError):
        return False
    return True


class _Wrappers:
    """FlashInfer's wrappers bound to one float workspace, made once, re-planned every step.

    A plan() overwrites a wrapper's state, so only the newest FlashInferPlan made from these
    wrappers may run: `generation` counts plans and each FlashInferPlan records its own.
    """

    def __init__(self, workspace: torch.Tensor) -> None:
        self.workspace = workspace
        self.generation = 0
        self._decode: dict[bool, Any] = {}
        self._prefill: Any = None

    def decode(self, use_tensor_cores: bool) -> Any:
        if use_tensor_cores not in self._decode:
            self._decode[use_tensor_cores] = _flashinfer().BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, kv_layout="NHD", use_tensor_cores=use_tensor_cores
            )
        return self._decode[use_tensor_cores]

    def prefill(self) -> Any:
        if self._prefill is None:
            self._prefill = _flashinfer().BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, kv_layout="NHD", backend=PREFILL_BACKEND
            )
        return self._prefill


# Wrappers per workspace tensor (by identity; tensors' == is elementwise, hence WeakIdKey...).
# Each wrapper allocates 8 MiB of device and 8 MiB of pinned memory, so they are made once.
# The wrappers hold a second Python view of the workspace, not the key itself: the entry goes
# when the caller drops its workspace tensor (a value holding its own key would never go).
_WRAPPERS: Any = WeakIdKeyDictionary()  # torch.utils.weak is untyped


def _wrappers_for(workspace: torch.Tensor) -> _Wrappers:
    wrappers = _WRAPPERS.get(workspace)
    if wrappers is None:
        wrappers = _Wrappers(workspace.detach())
        _WRAPPERS[workspace] = wrappers
    assert isinstance(wrappers, _Wrappers)
    return wrappers


@dataclass(frozen=True)
class FlashInferPlan:
    """One step's planned wrappers, shared by every layer; valid until the next plan_flashinfer
    on the same workspace."""

    num_tokens: int
    """Rows of the packed batch (q.shape[0])."""
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    """q's and the caches' dtype (FlashInfer compiles and plans per dtype)."""
    indices: FlashInferIndices
    decode_wrapper: Any
    """Planned BatchDecodeWithPagedKVCacheWrapper, or None when the step has no decodes."""
    prefill_wrapper: Any
    """Planned BatchPrefillWithPagedKVCacheWrapper, or None when the step has no prefills."""
    wrappers: _Wrappers
    generation: int


def plan_flashinfer(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    workspace: torch.Tensor,
) -> FlashInferPlan:
    """Plan one step for every layer (host work; the first call per shape JIT-compiles).

    block_tables lives on the device the kernels run on. workspace: FlashInfer's float
    workspace (128 MiB of uint8 is its recommendation), zeroed before first use, on that device;
    pass the same tensor object every step (its wrappers are cached by identity). The softmax
    scale is given at call time (flashinfer_paged_attention), as for the Triton backend.
    """
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert workspace.device == block_tables.device, (workspace.device, block_tables.device)
    indices = flashinfer_indices(block_tables, seq_lens, query_start_loc, block_size)
    wrappers = _wrappers_for(workspace)
    wrappers.generation += 1
    # sm_scale=1.0 here and k_scale=scale at run: both wrappers' run() multiply the planned
    # sm_scale by k_scale (meant for fp8 K) before launching, exactly 1.0 * scale, so the scale
    # stays a call argument as in the Triton backend. (q_scale would do the same, but prefill's
    # run() does not declare it in its typed overloads or docs; k_scale both do.)
    decode_wrapper = None
    if indices.decode.seqs:
        d = indices.decode
        decode_wrapper = wrappers.decode(use_tensor_cores=num_heads > num_kv_heads)
        decode_wrapper.plan(
            indptr=d.kv_indptr,
            indices=d.kv_indices,
            last_page_len=d.kv_last_page_len,
            num_qo_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=block_size,
            pos_encoding_mode="NONE",
            q_data_type=dtype,
            kv_data_type=dtype,
            sm_scale=1.0,
        )
    prefill_wrapper = None
    if indices.prefill.seqs:
        p = indices.prefill
        prefill_wrapper = wrappers.prefill()
        prefill_wrapper.plan(
            qo_indptr=p.qo_indptr,
            paged_kv_indptr=p.kv_indptr,
            paged_kv_indices=p.kv_indices,
            paged_kv_last_page_len=p.kv_last_page_len,
            num_qo_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim_qk=head_dim,
            page_size=block_size,
            causal=True,
            pos_encoding_mode="NONE",
            sm_scale=1.0,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
    return FlashInferPlan(
        num_tokens=query_start_loc[-1],
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        indices=indices,
        decode_wrapper=decode_wrapper,
        prefill_wrapper=prefill_wrapper,
        wrappers=wrappers,
        generation=wrappers.generation,
    )


def flashinfer_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: FlashInferPlan,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV (mixed batch).

    q: [num_tokens, num_heads, head_dim] (rows may be strided, e.g. a slice of a packed qkv);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] with equal strides, the
    plan's dtype (fp16 or bf16). Returns `out` (contiguous; allocated when None), shaped as q.
    """
    assert q.dim() == 3 and k_cache.dim() == 4, (q.shape, k_cache.shape)
    assert q.shape == (plan.num_tokens, plan.num_heads, plan.head_dim), (q.shape, plan)
    cache_shape = (plan.block_size, plan.num_kv_heads, plan.head_dim)
    assert k_cache.shape[1:] == cache_shape, (k_cache.shape, cache_shape)
    # FlashInfer reads both caches with K's strides (it checks they are equal).
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert q.dtype == k_cache.dtype == v_cache.dtype == plan.dtype, (q.dtype, k_cache.dtype)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, (q.stride(), k_cache.stride())
    assert q.device == k_cache.device == v_cache.device, (q.device, k_cache.device)
    assert plan.generation == plan.wrappers.generation, "stale plan: its workspace was re-planned"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The kernels write out densely ([rows, heads, head_dim] row-major).
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), out.shape
    kv = (k_cache, v_cache)
    groups = (
        (plan.decode_wrapper, plan.indices.decode),
        (plan.prefill_wrapper, plan.indices.prefill),
    )
    for wrapper, ix in groups:
        if wrapper is None:
            continue
        if ix.row_start is not None:
            rows = slice(ix.row_start, ix.row_start + ix.num_rows)
            wrapper.run(q[rows], kv, k_scale=scale, out=out[rows])
        else:
            assert ix.rows is not None
            o = wrapper.run(q.index_select(0, ix.rows), kv, k_scale=scale)
            out.index_copy_(0, ix.rows, o)
    return out

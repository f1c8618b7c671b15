"""flashinfer_indices (FlashInfer's CSR page tables from our block tables) on CPU, no FlashInfer.

Hand-worked batches, then a randomized check that the CSR form rebuilds every sequence's
length and exactly the first ceil(seq_len / block_size) entries of its block-table row.
"""

from __future__ import annotations

import random

import pytest
import torch

from baton.kernels.flashinfer_attention import PagedKVIndices, flashinfer_indices

PAD = 99  # table padding: would show up in kv_indices if ever read


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(x) for x in t.tolist()]


def _assert_group(
    g: PagedKVIndices,
    seqs: list[int],
    row_start: int | None,
    rows: list[int] | None,
    qo_indptr: list[int],
    kv_indptr: list[int],
    kv_indices: list[int],
    last_page_len: list[int],
) -> None:
    assert g.seqs == tuple(seqs)
    assert g.num_rows == qo_indptr[-1]
    assert g.row_start == row_start
    assert _ints(g.rows) == rows
    assert _ints(g.qo_indptr) == qo_indptr
    assert _ints(g.kv_indptr) == kv_indptr
    assert _ints(g.kv_indices) == kv_indices
    assert _ints(g.kv_last_page_len) == last_page_len
    for t in (g.qo_indptr, g.kv_indptr, g.kv_indices, g.kv_last_page_len):
        assert t.dtype == torch.int32, t.dtype
    if g.rows is not None:
        assert g.rows.dtype == torch.int64


@pytest.mark.parametrize("table_dtype", [torch.int64, torch.int32])
def test_mixed_batch_by_hand(table_dtype: torch.dtype) -> None:
    # block_size 4; per sequence (cached, new) -> seq_len, pages, last page len, group
    #   s0: (5, 1) -> 6, 2 pages, 2   decode,  row 0
    #   s1: (0, 3) -> 3, 1 page,  3   prefill, rows 1..3
    #   s2: (7, 1) -> 8, 2 pages, 4   decode,  row 4
    #   s3: (2, 0) -> 2, no rows: in neither group
    #   s4: (4, 5) -> 9, 3 pages, 1   prefill, rows 5..9
    tables = torch.tensor(
        [
            [7, 3, PAD, PAD],
            [2, PAD, PAD, PAD],
            [5, 6, PAD, PAD],
            [1, PAD, PAD, PAD],
            [0, 4, 8, PAD],
        ],
        dtype=table_dtype,
    )
    ix = flashinfer_indices(tables, [6, 3, 8, 2, 9], [0, 1, 4, 5, 5, 10], block_size=4)
    # decode rows 0 and 4 are not contiguous (s1's rows lie between): gathered
    _assert_group(ix.decode, [0, 2], None, [0, 4], [0, 1, 2], [0, 2, 4], [7, 3, 5, 6], [2, 4])
    _assert_group(
        ix.prefill,
        [1, 4],
        None,
        [1, 2, 3, 5, 6, 7, 8, 9],
        [0, 3, 8],
        [0, 1, 4],
        [2, 0, 4, 8],
        [3, 1],
    )


def test_contiguous_groups_are_slices() -> None:
    # decodes first, then prefills (a zero-token sequence between them breaks nothing)
    #   s0: 1 token of context (the minimum) -> 1 page, last 1; s1: 16 = 4 full pages, last 4
    #   s2: no rows; s3: (3, 2) -> 5, 2 pages, last 1; s4: (0, 4) -> 4, 1 page, last 4
    tables = torch.tensor(
        [
            [9, PAD, PAD, PAD],
            [1, 2, 3, 4],
            [PAD, PAD, PAD, PAD],
            [6, 5, PAD, PAD],
            [0, PAD, PAD, PAD],
        ]
    )
    ix = flashinfer_indices(tables, [1, 16, 0, 5, 4], [0, 1, 2, 2, 4, 8], block_size=4)
    _assert_group(ix.decode, [0, 1], 0, None, [0, 1, 2], [0, 1, 5], [9, 1, 2, 3, 4], [1, 4])
    _assert_group(ix.prefill, [3, 4], 2, None, [0, 2, 6], [0, 2, 3], [6, 5, 0], [1, 4])


def test_pure_decode_and_empty_groups() -> None:
    tables = torch.tensor([[3, 4], [5, PAD], [7, 8]])
    ix = flashinfer_indices(tables, [5, 2, 8], [0, 1, 2, 3], block_size=4)
    _assert_group(
        ix.decode, [0, 1, 2], 0, None, [0, 1, 2, 3], [0, 2, 3, 5], [3, 4, 5, 7, 8], [1, 2, 4]
    )
    _assert_group(ix.prefill, [], 0, None, [0], [0], [], [])
    empty = flashinfer_indices(torch.zeros(0, 3, dtype=torch.int64), [], [0], block_size=4)
    _assert_group(empty.decode, [], 0, None, [0], [0], [], [])


def test_non_contiguous_block_tables() -> None:
    """A column slice of a wider table (row stride != width) reads the same entries."""
    wide = torch.tensor([[10, 11, 12, PAD, 1], [13, PAD, PAD, PAD, 2]])
    tables = wide[:, :4]
    assert not tables.is_contiguous()
    ix = flashinfer_indices(tables, [9, 3], [0, 2, 5], block_size=4)
    _assert_group(ix.prefill, [0, 1], 0, None, [0, 2, 5], [0, 3, 4], [10, 11, 12, 13], [1, 3])


def test_rejects_bad_batches() -> None:
    tables = torch.tensor([[1, 2]])
    with pytest.raises(AssertionError):  # more new tokens than context
        flashinfer_indices(tables, [2], [0, 3], block_size=4)
    with pytest.raises(AssertionError):  # context longer than the table covers
        flashinfer_indices(tables, [9], [0, 1], block_size=4)
    with pytest.raises(AssertionError):  # query_start_loc of the wrong length
        flashinfer_indices(tables, [2], [0, 1, 2], block_size=4)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_rebuild_tables(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    seqs = [(rng.randint(0, 60), rng.choice([0, 1, 1, 1, rng.randint(2, 30)])) for _ in range(12)]
    seq_lens = [max(c + n, 1) for c, n in seqs]
    width = max(-(-n // block_size) for n in seq_lens) + 2
    tables = torch.randint(
        0, 1000, (len(seqs), width), generator=torch.Generator().manual_seed(seed)
    )
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    ix = flashinfer_indices(tables, seq_lens, qsl, block_size)

    seen_rows: list[int] = []
    for g, want_q_len in ((ix.decode, lambda n: n == 1), (ix.prefill, lambda n: n > 1)):
        assert list(g.seqs) == [s for s, (_, n) in enumerate(seqs) if want_q_len(n)]
        rows = (
            list(range(g.row_start, g.row_start + g.num_rows))
            if g.row_start is not None
            else _ints(g.rows)
        )
        assert rows is not None
        seen_rows += rows
        for i, s in enumerate(g.seqs):
            q0, q1 = int(g.qo_indptr[i]), int(g.qo_indptr[i + 1])
            assert rows[q0:q1] == list(range(qsl[s], qsl[s + 1]))
            k0, k1 = int(g.kv_indptr[i]), int(g.kv_indptr[i + 1])
            last = int(g.kv_last_page_len[i])
            assert 1 <= last <= block_size
            assert (k1 - k0 - 1) * block_size + last == seq_lens[s]
            assert _ints(g.kv_indices[k0:k1]) == _ints(tables[s, : k1 - k0])
    assert sorted(seen_rows) == list(range(qsl[-1]))  # every packed row in exactly one group

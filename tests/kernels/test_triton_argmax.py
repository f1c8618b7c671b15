"""The one-launch argmax (kernels/triton_argmax.py) against torch.argmax, on the GPU when there
is one, otherwise under Triton's CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.kernels import triton_argmax  # noqa: E402
from baton.kernels.triton_argmax import CHUNK, argmax  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _counters_zero() -> bool:
    return all(int(buf.abs().sum()) == 0 for buf in triton_argmax._counters.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (3, 100), (2, CHUNK), (4, 3 * CHUNK + 7)])
def test_matches_torch(dtype: torch.dtype, rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype=dtype, device=DEVICE)
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    assert _counters_zero(), "every row's last program resets its counter"


def test_ties_infinities_and_nan_as_torch() -> None:
    """Ties across and within slices give the lowest index; -inf rows give 0; a NaN wins (the
    first one), as torch.argmax decides."""
    vocab = 2 * CHUNK + 50
    x = torch.randn(6, vocab)
    x[0, [7, CHUNK + 3, 2 * CHUNK + 1]] = 50.0  # the same maximum in three slices
    x[1, [CHUNK + 9, CHUNK + 4]] = 50.0  # twice in one slice
    x[2] = float("-inf")
    x[3, 2 * CHUNK + 10] = float("inf")
    x[4, [CHUNK + 5, 2 * CHUNK + 2]] = float("nan")
    x[4, 3] = float("inf")
    x[5, :] = 1.0
    x = x.to(DEVICE)
    want = x.cpu().argmax(dim=-1)
    assert want.tolist() == [7, CHUNK + 4, 0, 2 * CHUNK + 10, CHUNK + 5, 0]
    assert torch.equal(argmax(x).cpu(), want)
    # A row slice of a wider tensor (row stride != V), and a batch larger than the first
    # counter buffer.
    wide = torch.randn(3, vocab + 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(argmax(wide[:, :vocab]), wide[:, :vocab].argmax(dim=-1))
    many = torch.randn(1500, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert torch.equal(argmax(many), many.argmax(dim=-1))
    assert _counters_zero()

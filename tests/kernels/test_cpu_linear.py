"""oneDNN-packed linear vs its reference, F.linear, on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton.kernels.cpu_linear import can_pack, pack_weight, packed_linear

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(dtype: torch.dtype, rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=g).to(dtype)
    assert can_pack(w)
    got = packed_linear(x, pack_weight(w), b, 96)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_packed_linear_keeps_leading_dims() -> None:
    w = torch.randn(8, 4)
    x = torch.randn(2, 3, 4)
    y = packed_linear(x, pack_weight(w), None, 8)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_cannot_pack_integer_weights() -> None:
    assert not can_pack(torch.ones(4, 4, dtype=torch.int8))

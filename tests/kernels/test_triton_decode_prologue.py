"""The attention prologue folded into the decode kernel (paged_decode_attention(prologue=)) vs
the two launches it replaces: triton_prologue.qk_norm_rope_write_kv, then the decode kernel.

Runs on CUDA when there is a device, otherwise under Triton's CPU interpreter, with small shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from baton.kernels import attention_ref, pdl  # noqa: E402
from baton.kernels.triton_decode import DecodePrologue, paged_decode_attention  # noqa: E402
from baton.kernels.triton_prologue import qk_norm_rope_write_kv  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BLOCK_SIZE = 16
EPS = 1e-6
CASES = {
    # name: (q heads, kv heads, head_dim, per-head q/k RMSNorm)
    "llama": (4, 2, 32, False),
    "qwen3_mqa": (8, 1, 64, True),
}
# Context per sequence after this step; 0 is a CUDA-graph padding row (slot -1), 1 a sequence
# whose only token is the new one, 300 spans several tiles per split at 3 splits.
SEQ_LENS = [300, 9, 0, 1, 130, 64]


@pytest.fixture(params=[False, True], ids=["plain_launch", "pdl_launch"])
def pdl_launch(request: pytest.FixtureRequest) -> Iterator[bool]:
    on = bool(request.param)
    if on and not pdl.supported(DEVICE):
        pytest.skip("PDL needs a compiled (not interpreted) kernel on compute capability >= 9.0")
    saved = pdl._enabled
    pdl.set_enabled(on)
    yield on
    pdl.set_enabled(saved)


def _inputs(case: str, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """A decode step engine-style: fused qkv rows (unrotated), caches holding every older
    token (the new tokens' slots NaN), shuffled block tables, RoPE tables, norm weights."""
    hq, hk, dim, qk_norm = CASES[case]
    g = torch.Generator().manual_seed(hq * dim)
    b = len(SEQ_LENS)
    needed = [-(-max(n, 1) // BLOCK_SIZE) for n in SEQ_LENS]
    num_blocks = sum(needed) + 2
    shape = (num_blocks, BLOCK_SIZE, hk, dim)
    k_cache = torch.randn(*shape, generator=g).to(dtype)
    v_cache = torch.randn(*shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1
    tables, slots = [], []
    for n, nb in zip(SEQ_LENS, needed, strict=True):
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + [perm[0]] * (width - nb))
        slot = blocks[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE if n else -1
        slots.append(slot)
        if n:
            k_cache.view(-1, hk, dim)[slot] = float("nan")
            v_cache.view(-1, hk, dim)[slot] = float("nan")
    angles = torch.rand(max(SEQ_LENS) + 1, dim // 2, generator=g, dtype=torch.float64) * 6.3
    weights = [(1.0 + 0.3 * torch.randn(dim, generator=g)).to(dtype) for _ in "qk"]
    on = {
        "qkv": torch.randn(b, (hq + 2 * hk) * dim, generator=g).to(dtype),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "tables": torch.tensor(tables, dtype=torch.int32),
        "seq_lens": torch.tensor(SEQ_LENS, dtype=torch.int32),
        "positions": torch.tensor([max(n - 1, 0) for n in SEQ_LENS], dtype=torch.int64),
        "slots": torch.tensor(slots, dtype=torch.int64),
        "cos_half": angles.cos().to(dtype),
        "sin_half": angles.sin().to(dtype),
        "q_norm_weight": weights[0] if qk_norm else None,
        "k_norm_weight": weights[1] if qk_norm else None,
    }
    return {k: None if t is None else t.to(DEVICE) for k, t in on.items()}


def _views(qkv: torch.Tensor, case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hq, hk, dim, _ = CASES[case]
    b = qkv.shape[0]
    q = qkv[:, : hq * dim].view(b, hq, dim)
    k = qkv[:, hq * dim : (hq + hk) * dim].view(b, hk, dim)
    v = qkv[:, (hq + hk) * dim :].view(b, hk, dim)
    return q, k, v


def _two_launches(a: dict[str, torch.Tensor | None], case: str, splits: int, preload: bool):  # type: ignore[no-untyped-def]
    qkv, k_cache, v_cache = (t.clone() for t in (a["qkv"], a["k_cache"], a["v_cache"]))  # type: ignore[union-attr]
    q, k, v = _views(qkv, case)
    q, k = qk_norm_rope_write_kv(
        a["positions"], q, k, v, a["cos_half"], a["sin_half"], k_cache, v_cache, a["slots"],  # type: ignore[arg-type]
        a["q_norm_weight"], a["k_norm_weight"], EPS,
    )  # fmt: skip
    scale = 1 / math.sqrt(q.shape[-1])
    out = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        a["tables"],
        a["seq_lens"],
        scale,
        splits,
        preload=preload,  # type: ignore[arg-type]
    )
    return out, k_cache, v_cache, q


def _folded(a: dict[str, torch.Tensor | None], case: str, splits: int, preload: bool):  # type: ignore[no-untyped-def]
    qkv, k_cache, v_cache = (t.clone() for t in (a["qkv"], a["k_cache"], a["v_cache"]))  # type: ignore[union-attr]
    q, k, v = _views(qkv, case)
    prologue = DecodePrologue(
        k, v, a["positions"], a["cos_half"], a["sin_half"], a["slots"],  # type: ignore[arg-type]
        a["q_norm_weight"], a["k_norm_weight"], EPS,
    )  # fmt: skip
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    paged_decode_attention(
        q, k_cache, v_cache, a["tables"], a["seq_lens"], scale, splits, out=out,  # type: ignore[arg-type]
        preload=preload, prologue=prologue,
    )  # fmt: skip
    assert torch.equal(qkv, a["qkv"]), "the folded prologue leaves q, k and v as they were"
    return out, k_cache, v_cache


@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preload"])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_folded_prologue_matches_two_launches(
    case: str, dtype: torch.dtype, splits: int, preload: bool, pdl_launch: bool
) -> None:
    """Same output and caches as the prologue kernel followed by the decode kernel: bit for
    bit without the head norm; with it, to the norm's variance summation order (an ulp)."""
    a = _inputs(case, dtype)
    want, k_want, v_want, q_rot = _two_launches(a, case, splits, preload)
    got, k_got, v_got = _folded(a, case, splits, preload)
    assert not got.isnan().any(), "an output element was not written"
    assert torch.equal(got[2].cpu(), torch.zeros_like(got[2].cpu())), "padding row gives zeros"
    # Bitwise under the interpreter without the head norm. With it the variance sums in another
    # order; on a GPU the rotation's multiply-adds may contract differently (an ulp).
    exact = not CASES[case][3] and not ON_GPU
    tol = 0.0 if exact else (2e-2 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # Every new token's K/V row landed in its slot (NaN before), nothing else moved.
    torch.testing.assert_close(k_got, k_want, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(v_got, v_want, atol=0, rtol=0, equal_nan=True)
    assert not k_got.isnan().any() and not v_got.isnan().any()

    # And both are attention over the rotated q and the updated caches (float64 oracle).
    seq_lens = [int(n) for n in a["seq_lens"].tolist()]  # type: ignore[union-attr]
    plan = attention_ref.plan_attention(
        a["tables"].long().cpu(),
        seq_lens,
        list(range(len(seq_lens) + 1)),
        BLOCK_SIZE,  # type: ignore[union-attr]
    )
    oracle = attention_ref.paged_attention(
        q_rot.cpu().double(), k_want.cpu().double(), v_want.cpu().double(), plan,
        1 / math.sqrt(q_rot.shape[-1]),
    )  # fmt: skip
    live = [i for i, n in enumerate(seq_lens) if n]  # the oracle has no padding rows
    diff = got.cpu().double()[live] - oracle[live]
    rel = float(diff.norm() / oracle[live].norm())
    assert rel < (1e-4 if dtype == torch.float32 else 1e-2), rel


def test_folded_prologue_checks_inputs() -> None:
    a = _inputs("llama", torch.float32)
    q, k, v = _views(a["qkv"], "llama")  # type: ignore[arg-type]
    args = (q, a["k_cache"], a["v_cache"], a["tables"], a["seq_lens"], 0.1, 2)
    good = DecodePrologue(k, v, a["positions"], a["cos_half"], a["sin_half"], a["slots"])  # type: ignore[arg-type]
    bad = [
        DecodePrologue(k[:2], v, a["positions"], a["cos_half"], a["sin_half"], a["slots"]),  # type: ignore[arg-type]
        DecodePrologue(k, v, a["positions"][:2], a["cos_half"], a["sin_half"], a["slots"]),  # type: ignore[arg-type,index]
        DecodePrologue(k, v, a["positions"], a["cos_half"][:, :3], a["sin_half"], a["slots"]),  # type: ignore[arg-type,index]
        DecodePrologue(k, v, a["positions"], a["cos_half"], a["sin_half"], a["slots"], q[0, 0]),  # type: ignore[arg-type]
    ]
    for prologue in bad:
        with pytest.raises(AssertionError):
            paged_decode_attention(*args, prologue=prologue)  # type: ignore[arg-type]
    rows = torch.arange(q.shape[0], device=DEVICE)
    with pytest.raises(AssertionError, match="rows=None"):
        paged_decode_attention(*args, rows=rows, prologue=good)  # type: ignore[arg-type]

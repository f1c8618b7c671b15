"""The skinny GEMM (kernels/triton_gemv.py) compiled for sm_90 on any machine (Triton ships
ptxas): what the CPU interpreter accepts but the compiler rejects, and the PTX of the PDL path,
which the interpreter never traces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()


# The PDL variant (with split-K and the fused SiLU) compiled for sm_90: the interpreter never
# traces it, so its ordering is read from the PTX. Prints the kernel's PTX, code only.
_PDL_PTX_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from baton.kernels import triton_gemv as gemv

fn = gemv._skinny_gemm_kernel
consts = dict(HAS_BIAS=True, SPLIT=True, EVEN_K=False, USE_DOT=True, PRECISION="tf32",
              BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SILU_MUL=True, RMS_NORM=False,
              ADD_RESIDUAL=True, SQ_PAD=64, USE_PDL=True, PREFETCH_TILES=2)
types = {"ws_ptr": "*fp32", "counter_ptr": "*i32", "sq_ptr": "*fp32", "eps": "fp32"}
signature, attrs = {}, {}
for i, name in enumerate(fn.arg_names):
    if name in consts:
        signature[name] = "constexpr"
        continue
    signature[name] = types.get(name, "*bf16" if name.endswith("_ptr") else "i32")
    if name != "M":
        attrs[(i,)] = [["tt.divisibility", 16]]
src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
options = {"num_warps": 4, "num_stages": 4, "launch_pdl": True}
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
print(ptx.split(".section")[0])
"""


def test_pdl_variant_ptx() -> None:
    """sm_90 PTX of the PDL kernel: before griddepcontrol.wait only L2 prefetches of W, one per
    128-byte line (2 per thread for two [64, 128] bf16 tiles over 128 threads, not one per
    element); launch_dependents after the wait; the split-K arrival is a gpu-scope acq_rel
    atomic and the last program reads the partials with ld.global.cg."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _PDL_PTX_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ptx = proc.stdout
    wait = ptx.index("griddepcontrol.wait")
    assert wait < ptx.index("griddepcontrol.launch_dependents")
    before = ptx[:wait]
    for op in ("ld.global", "st.global", "cp.async", "atom.global", "red.global"):
        assert op not in before, f"{op} before griddepcontrol.wait"
    assert before.count("prefetch.global.L2") == ptx.count("prefetch.global.L2") == 2
    assert "atom.global.gpu.acq_rel.add" in ptx
    assert "ld.global.cg" in ptx
    assert "wgmma.mma_async" in ptx


@pytest.mark.skipif(ON_GPU, reason="on CUDA the tests above compile every kernel")
def test_kernels_compile_for_sm90() -> None:
    """Compile the kernel for sm_90 on this CPU-only machine (Triton ships ptxas): 16-byte
    loads of W, wgmma on the default tile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "baton.kernels.bench.gemv", "--ptx-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wgmma" in proc.stdout.splitlines()[0], proc.stdout[-3000:]

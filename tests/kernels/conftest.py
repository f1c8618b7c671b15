"""Kernel tests run on CUDA when present, else under Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is imported (triton.jit reads it when kernels are
decorated), so it is set here, before any test module loads; the interpreter's known bugs are
patched once for every kernel test.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_interpreter() -> None:
    """Two bugs of Triton 3.6's CPU interpreter (the GPU compiler is unaffected), fixed here for
    the kernel tests:
    - a scalar (a 1-element array there) used as a loop bound goes through int(array), which
      numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream after 3.6 by #9172);
    - tl.dot on bfloat16 multiplies the raw uint16 bit patterns as integers: upcast to float32
      first (exact, like the tensor cores' bf16 products with float32 accumulation).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    lang_tensor = interp._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def upcast(x: Any) -> Any:
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(data, tl.float32)

    create_dot = interp.InterpreterBuilder.create_dot

    def create_dot_bf16(self: Any, a: Any, b: Any, *args: Any) -> Any:
        return create_dot(self, upcast(a), upcast(b), *args)

    interp._patch_lang_tensor = patch_lang_tensor
    interp.InterpreterBuilder.create_dot = create_dot_bf16


_patch_triton_interpreter()

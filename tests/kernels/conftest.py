"""Kernel-test set-up: which backends run, and a fix for the Triton interpreter.

Kernel tests run on CUDA (marked `gpu`) and, on CPU, under the Triton interpreter when
TRITON_INTERPRET=1 is set before triton is imported; otherwise they skip, and only the reference
tests run.

Two fixes for Triton 3.6's interpreter (compiled kernels are unaffected):
- it multiplies bfloat16 tl.dot operands as their raw uint16 storage, so we widen bfloat16
  operands to fp32 first (exact: the product of two bfloat16 values fits in fp32);
- it turns scalar tensors (held as 1-element arrays) into loop bounds with int(array), which
  numpy >= 2.4 refuses for arrays that are not 0-d, so `range(lo, hi)` over loaded values fails.
"""

from __future__ import annotations

import os

import numpy as np

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None

    if interpreter is not None:
        _create_dot = interpreter.InterpreterBuilder.create_dot

        def _widen_bf16(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            widened = (x.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened, tl.float32)

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return _create_dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)

        interpreter.InterpreterBuilder.create_dot = create_dot

        _patch_lang_tensor = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interpreter._patch_lang_tensor = patch_lang_tensor

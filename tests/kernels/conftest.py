"""Kernel-test set-up: which backends run, and a fix for the Triton interpreter.

Kernel tests run on CUDA (marked `gpu`) and, on CPU, under the Triton interpreter when
TRITON_INTERPRET=1 is set before triton is imported; otherwise they skip, and only the reference
tests run.

Two fixes for Triton 3.6's interpreter (compiled kernels are unaffected):
- it multiplies bfloat16 tl.dot operands as their raw uint16 storage, so we widen bfloat16
  operands to fp32 first (exact: the product of two bfloat16 values fits in fp32);
- it turns scalar tensors (held as 1-element arrays) into loop bounds with int(array), which
  numpy >= 2.4 refuses for arrays that are not 0-d, so `range(lo, hi)` over loaded values fails;
- its float -> float8e4nv cast drops the carry of a rounding (125.0 -> 64.0) and rounds ties
  away from zero, so casts to and from float8e4nv go through torch's float8_e4m3fn (RTNE, as
  the GPU converts).
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

        import torch

        _create_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

        def _as_float32(x):
            if x.dtype.scalar == tl.bfloat16:
                return (x.data.astype(np.uint32) << 16).view(np.float32)
            return x.data.astype(np.float32)

        def create_fp_to_fp(self, src, dst_type, rounding_mode):
            src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
            if dst_ty == tl.float8e4nv and src_ty in (tl.float32, tl.float16, tl.bfloat16):
                data = torch.from_numpy(np.ascontiguousarray(_as_float32(src))).to(torch.float8_e4m3fn)
                return interpreter.TensorHandle(data.view(torch.uint8).numpy(), dst_ty)
            if src_ty == tl.float8e4nv and dst_ty == tl.float32:
                data = torch.from_numpy(np.ascontiguousarray(src.data)).view(torch.float8_e4m3fn).float()
                return interpreter.TensorHandle(data.numpy(), dst_ty)
            return _create_fp_to_fp(self, src, dst_type, rounding_mode)

        interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp

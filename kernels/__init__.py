"""pdserve.kernels: Triton kernels of the model runner, and their pure-torch references.

    store_kv                 write this step's K/V into the paged cache        store_kv.py
    paged_decode_attention   one query token per sequence, split-K             decode_attention.py
    paged_prefill_attention  packed causal chunks, cached prefix read in place prefill_attention.py
    rms_norm                 HF RMSNorm, optionally fused with the residual add rms_norm.py
    apply_rotary             NeoX rotary embedding of q and k, in place         rotary.py
    rotary_store_kv          rotary fused with store_kv (q in place, k/v to cache) rotary.py
    silu_and_mul             gated MLP activation                               activation.py
    row_argmax               each row's first maximal column, in two stages     argmax.py
    gemv                     batch-1 x @ W^T (+ b) at memory bandwidth          gemv.py
    gemv_rows                the same for 2..16 rows, W read once               gemv.py
    copy_blocks              whole KV blocks of all layers to/from staging      copy_blocks.py
    int_matmul               x @ W for 4/8-bit grouped-int weights (AWQ, GPTQ,  int_gemm.py
                             GGUF): M <= 16 int_gemv, else dequantize + cuBLAS  gemv_int.py
    quantize_fp8_per_token   activations -> e4m3 + per-row scales (_scaled_mm)  fp8_linear.py
    fp8_gemv                 M <= 16 rows x @ (fp8 W * s)^T, weight-only        gemv_fp8.py
    (gemv_config.py: the GEMVs' launch configurations, a measured table + a heuristic;
     split_k.py: their split-K reduction in one kernel)
The attention kernels and the KV stores also take fp8 (e4m3) caches with per-head scales.

`reference` holds the torch version of each (`<name>_ref`), which defines the semantics.
Importing this package must work without triton (CPU CI uses only the references), so the kernels
are imported only when triton is installed; check `triton_available()` before using one. They are
imported eagerly, not lazily, because store_kv and rms_norm share their module's name and a lazily
imported submodule would shadow the function of the same name on this package.
"""

from __future__ import annotations


def _hand_over_the_top_level_name() -> None:
    """This folder was imported as the top-level `kernels`: a checkout's root is on sys.path (as
    `python -m ...`, `python -c` and `python -m pytest` put the working directory there). That
    name belongs to the `kernels` distribution transformers (5.25 and later) imports, so the
    import is handed to it: the folder's import is replaced by that package's, found on sys.path
    without the checkout's root. pdserve itself only ever imports `pdserve.kernels`. Without such
    a distribution this module stays, empty."""
    import importlib.machinery
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_the_top_level_name()
else:
    import os

    # Triton 3.10 turns FP fusion (multiply-add contracted into FMA) off by default. These kernels
    # were written, tuned and checked with it on, Triton's default up to 3.9: keep it, unless the
    # user chose otherwise (TRITON_DEFAULT_FP_FUSION=0, or TRITON_FORCE_DISABLE_FP_FUSION).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    from pdserve.kernels import reference

    def triton_available() -> bool:
        """Whether triton imports (the kernels still need a CUDA device or the interpreter)."""
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    __all__ = ["reference", "triton_available"]

    if triton_available():
        from pdserve.kernels.activation import silu_and_mul
        from pdserve.kernels.copy_blocks import copy_blocks
        from pdserve.kernels.decode_attention import paged_decode_attention
        from pdserve.kernels.fp8_linear import fp8_gemv, quantize_fp8_per_token
        from pdserve.kernels.gemv import gemv, gemv_rows
        from pdserve.kernels.int_gemm import int_matmul
        from pdserve.kernels.prefill_attention import paged_prefill_attention
        from pdserve.kernels.rms_norm import rms_norm
        from pdserve.kernels.rotary import apply_rotary, rotary_store_kv
        from pdserve.kernels.store_kv import store_kv

        __all__ += ["store_kv", "paged_decode_attention", "paged_prefill_attention", "rms_norm",
                    "apply_rotary", "rotary_store_kv", "silu_and_mul", "gemv", "gemv_rows", "copy_blocks", "int_matmul",
                    "fp8_gemv", "quantize_fp8_per_token"]

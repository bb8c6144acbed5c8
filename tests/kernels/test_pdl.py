"""Programmatic dependent launch (kernels/pdl.py): every decode-path kernel waits for the kernel
before it before touching memory, PDL stays off where it cannot run, and (GPU) a CUDA graph of
decode kernels gives the same bits with PDL as without.

    python -m pytest tests/kernels/test_pdl.py -q        (the compile test not under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

(activation, allreduce_norm, decode_attention, gemv, gemv_fp8, gemv_fp8_v2, gemv_int, gemv_int_v2, pdl, rms_norm,
 rotary, store_kv) = (importlib.import_module(f"pdserve.kernels.{name}") for name in (  # modules, not the functions
    "activation allreduce_norm decode_attention gemv gemv_fp8 gemv_fp8_v2 gemv_int gemv_int_v2 pdl rms_norm "
    "rotary store_kv").split())

DECODE_KERNELS = [activation._silu_and_mul_kernel, allreduce_norm._allreduce_add_rms_norm_kernel,
                  decode_attention._decode_split_kernel, decode_attention._merge_splits_kernel, gemv._gemv_kernel,
                  gemv_fp8._fp8_gemv_kernel, gemv_fp8_v2._fp8_gemv_v2_kernel, gemv_int._int_gemv_kernel,
                  gemv_int_v2._int_gemv_v2_kernel, rms_norm._rms_norm_kernel, rotary._rotary_kernel,
                  rotary._rotary_store_kv_kernel, store_kv._store_kv_kernel]


@pytest.mark.parametrize("kernel", DECODE_KERNELS, ids=lambda k: k.fn.__name__)
def test_prologue_comes_first(kernel):
    """The kernel's first statement (after its docstring) is `if PDL: pdl.prologue()`: nothing is
    read or written before the previous kernel has ended (the ordering PDL relies on)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    first = body[0]
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "PDL", ast.unparse(first)
    assert ast.unparse(first.body[0]) == "pdl.prologue()"
    assert "PDL" in kernel.arg_names


def test_launch_args_off_cpu_and_when_disabled():
    assert pdl.launch_args(torch.zeros(2)) == {}
    if torch.cuda.is_available() and pdl.AVAILABLE and torch.cuda.get_device_capability()[0] >= 9:
        x = torch.zeros(2, device="cuda")
        assert pdl.launch_args(x) == {"PDL": True, "launch_pdl": True}
        pdl.set_enabled(False)
        try:
            assert pdl.launch_args(x) == {}
        finally:
            pdl.set_enabled(True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles a real kernel")
@pytest.mark.skipif(not pdl.AVAILABLE, reason="this Triton has no griddepcontrol")
def test_wait_precedes_every_memory_access_in_ptx():
    """Compiled for sm_90 (Triton's compiler and ptxas run on CPU): griddepcontrol.wait is the first
    instruction touching the kernel's work, before any global load or store; without PDL it is absent."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def ptx(use_pdl: bool) -> str:
        k = gemv._gemv_kernel
        ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "out_ptr": "*bf16"}
        const = {"HAS_BIAS": False, "HAS_SCALE": False, "BLOCK_N": 16, "BLOCK_K": 512, "PDL": use_pdl}
        sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in k.arg_names}
        compiled = triton.compile(ASTSource(fn=k, signature=sig, constexprs=const, attrs={}),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        return compiled.asm["ptx"]

    on, off = ptx(True), ptx(False)
    assert "griddepcontrol" not in off
    lines = [ln.strip() for ln in on.splitlines()]
    wait = next(i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.wait"))
    memory = [i for i, ln in enumerate(lines) if any(op in ln for op in ("ld.global", "st.global", "atom.global"))]
    assert memory and wait < min(memory)
    assert any(ln.startswith("griddepcontrol.launch_dependents") for ln in lines)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_of_decode_kernels_same_bits_with_and_without_pdl():
    """norm -> GEMV -> SiLU-and-mul -> GEMV -> norm, captured in a CUDA graph and replayed: with
    PDL (every kernel starting while the one before it ends) the bits equal those without."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU and compiled kernels")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden, inter = 1024, 2816
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    nw = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5
    w_up = torch.randn(2 * inter, hidden, device=dev, dtype=torch.bfloat16) / 32
    w_down = torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16) / 32

    def chain():
        h = x
        r = res
        for _ in range(8):
            n, r = rms_norm.rms_norm(h, nw, 1e-5, r)
            h = gemv.gemv(activation.silu_and_mul(gemv.gemv(n, w_up)), w_down)
        return rms_norm.rms_norm(h, nw, 1e-5, r)[0]

    outputs = {}
    for enabled in (False, True):
        pdl.set_enabled(enabled)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eager = chain()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
            outputs[enabled] = out.clone()
        finally:
            pdl.set_enabled(True)
    assert torch.equal(outputs[True], outputs[False])

"""int_gemv_v3 (kernels/gemv_int_v3.py: wgmma with an integer-only int4 dequantization) against
the reference, and its sm_90 compilation (no spills, the K loop's instructions per packed word).

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_gemv_int_v3.py -q     (interpreter cases)
    python -m pytest tests/kernels/test_gemv_int_v3.py -q                         (compile cases; GPU cases with CUDA)
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from pdserve.kernels import reference as ref
from pdserve.kernels.testing import rel_error
from tests.kernels.test_quant_kernels import BF16, FP16, RUN_INTERPRET, backends, random_int_weight

# The kernel is exact up to fp32 summation (weights 128 + q and x exact in 16 bits); the reference
# rounds each dequantized weight to x's dtype, which alone is ~2e-3 (bf16) / ~3e-4 (fp16) relative.
MAX_ERR = {BF16: 8e-3, FP16: 1e-3}

# (M, K, N, group, dtype, block_n, block_k, num_warps, split_k, bias, fractional zeros)
V3_INTERP = [(1, 256, 128, 128, BF16, 64, 128, 4, 1, False, False),
             (3, 256, 100, 32, FP16, 64, 128, 4, 3, True, True),     # odd N, G 32 (BLOCK_K -> 32), split-K
             (16, 512, 128, 128, BF16, 128, 64, 4, 4, True, True),   # BLOCK_M 16, two column blocks of n'
             (9, 256, 72, 64, FP16, 64, 64, 4, 2, False, False),     # a verify step's 9 rows
             (16, 256, 48, 128, FP16, 64, 128, 4, 1, False, True),
             (3, 256, 256, 128, BF16, 256, 128, 4, 2, True, False)]  # 8 columns per thread (two 16-byte loads)
V3_GPU = [(m, k, n, 128, BF16, bn, 128, w, s, False, False) for m in (1, 4, 9, 16)
          for k, n, bn, w, s in ((4096, 6144, 128, 4, 4), (14336, 4096, 256, 4, 8))] + \
         [(3, 4096, 4104, 64, FP16, 128, 128, 4, 8, True, True), (16, 4096, 4096, 32, BF16, 512, 128, 8, 16, True, True),
          (8, 8192, 4096, 128, FP16, 256, 128, 4, 1, False, False)]


@pytest.mark.parametrize("device,case", backends(V3_GPU, V3_INTERP))
def test_int_gemv_v3(device, case):
    from pdserve.kernels.gemv_int_v3 import int_gemv_v3
    m, k, n, group, dtype, block_n, block_k, warps, split, with_bias, fractional = case
    qweight, scales, zeros = random_int_weight(k, n, 4, group, dtype, device, seed=m + n)
    if fractional:  # GGUF-style zero points
        zeros = (zeros.float() + 0.37).to(dtype)
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    out = int_gemv_v3(x, qweight, scales, zeros, 4, group, bias, block_n=block_n, block_k=block_k, split_k=split,
                      num_warps=warps)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out, ref.int_matmul_ref(x, qweight, scales, zeros, 4, group, bias)) <= MAX_ERR[dtype]
    if split > 1:  # the split-K workspace is zero again: a second call (a graph replay) agrees, up to
        # the order of the fp32 atomic adds on a GPU (one rounding of the output apart)
        from pdserve.kernels.split_k import WORKSPACE
        again = int_gemv_v3(x, qweight, scales, zeros, 4, group, bias, block_n=block_n, block_k=block_k,
                            split_k=split, num_warps=warps)
        torch.testing.assert_close(again, out, rtol=1e-2 if dtype == BF16 else 2e-3, atol=1e-2)
        ws, locks = WORKSPACE.get(torch.device(device), n, m)
        assert not ws.any() and not locks.any()


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(
    not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU"))])
def test_int_gemv_v3_rejects_what_it_cannot_run(device):
    from pdserve.kernels.gemv_int_v3 import int_gemv_v3
    qweight, scales, zeros = random_int_weight(256, 64, 4, 128, BF16, device)
    x = torch.randn(2, 256).to(BF16)
    with pytest.raises(ValueError, match="BLOCK_N"):
        int_gemv_v3(x, qweight, scales, zeros, 4, 128, block_n=32, block_k=128, split_k=1, num_warps=4)
    with pytest.raises(ValueError, match="bf16 / fp16"):
        int_gemv_v3(x.float(), qweight, scales, zeros, 4, 128, block_n=64, block_k=128, split_k=1, num_warps=4)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(
    not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU"))])
def test_int_gemv_runs_version_3_configs(device, monkeypatch):
    """gemv_int.int_gemv with a version-3 configuration (a table entry) runs this kernel for 16-bit
    x; fp32 x, which it cannot take, gets the heuristic's configuration instead: both right."""
    from pdserve.kernels import gemv_int_v3
    from pdserve.kernels.gemv_config import GemvConfig
    from pdserve.kernels.gemv_int import int_gemv
    qweight, scales, zeros = random_int_weight(256, 128, 4, 64, BF16, device, seed=5)
    config = GemvConfig(64, 64, split_k=2, num_warps=4, num_stages=1, version=3)
    calls = []
    real = gemv_int_v3.int_gemv_v3
    monkeypatch.setattr(gemv_int_v3, "int_gemv_v3", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for dtype in (BF16, FP16, torch.float32):
        x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
        out = int_gemv(x, qweight, scales.to(dtype), zeros.to(dtype), 4, 64, config=config)
        expected = ref.int_matmul_ref(x, qweight, scales.to(dtype), zeros.to(dtype), 4, 64)
        assert rel_error(out, expected) <= MAX_ERR.get(dtype, 1e-4)
    assert [c["block_n"] for c in calls] == [64, 64]  # bf16 and fp16 only


def test_version_3_configs_and_the_table_from_the_environment(tmp_path, monkeypatch):
    """GemvConfig checks version 3's shape rules; $PDSERVE_GEMV_TABLE adds measured entries at the
    first choice (a v3 entry for int4 only), and a broken file is a clear error."""
    import json
    from dataclasses import asdict

    from pdserve.kernels import gemv_config as gc
    with pytest.raises(ValueError, match="version 3"):
        gc.GemvConfig(32, 128, num_warps=4, version=3)  # BLOCK_N < 16 * warps
    with pytest.raises(ValueError, match="version 3"):
        gc.GemvConfig(64, 128, num_warps=2, version=3)  # wgmma: warps in fours
    with pytest.raises(ValueError, match="version"):
        gc.GemvConfig(64, 128, dot=True, version=3)
    v3 = gc.GemvConfig(256, 128, split_k=8, num_warps=4, num_stages=1, version=3)
    assert v3.short() == "v3 n256 k128 s8 w4 st1"
    assert gc.fit(v3, "int4", 4096, 64).block_k == 64  # within the group
    path = tmp_path / "table.json"
    path.write_text(json.dumps([{"kind": "int4", "k": 4096, "n": 6144, "bucket": 4, **asdict(v3)}]))
    monkeypatch.setattr(gc, "TUNED", dict(gc.TUNED))
    monkeypatch.setattr(gc, "_env_table_loaded", False)
    monkeypatch.setenv(gc.TABLE_ENV, str(path))
    gc._choose.cache_clear()
    try:
        assert gc.choose("int4", 3, 4096, 6144, 128, torch.device("cpu")) == v3
        assert gc.choose("int4", 1, 4096, 6144, 128, torch.device("cpu")).version != 3  # bucket 1: not in the file
        path.write_text(json.dumps([{"kind": "fp8", "k": 4096, "n": 6144, "bucket": 4, **asdict(v3)}]))
        monkeypatch.setattr(gc, "_env_table_loaded", False)
        with pytest.raises(ValueError, match="PDSERVE_GEMV_TABLE"):
            gc.choose("int4", 3, 4096, 6144, 128, torch.device("cpu"))
    finally:
        gc._choose.cache_clear()


# --- sm_90 compilation on CPU (as test_gemv_compile.py) ---------------------------------------------

def _triton_tools():
    try:
        import triton
    except ImportError:
        return None
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


INTS = ("M", "N", "K", "magic", "tiles_per_split", "split_k", "stride_xm", "stride_qw", "stride_s", "stride_z",
        "stride_om")
DIVISIBLE = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr", "ws_ptr", "lock_ptr", "N", "K",
             "stride_xm", "stride_qw", "stride_s", "stride_z", "stride_om")


def compile_v3_sm90(block_m: int, block_n: int, block_k: int, num_warps: int, x_type: str = "bf16"):
    """-> (cubin, ttgir) of one variant with the 8B shapes' specialization (G = 128, fp16 scales)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdserve.kernels.gemv_int_v3 import _int_gemv_v3_kernel as fn
    sig = {"x_ptr": f"*{x_type}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16",
           "out_ptr": f"*{x_type}", "ws_ptr": "*fp32", "lock_ptr": "*i32", **{name: "i32" for name in INTS}}
    const = dict(GROUP_SIZE=128, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=True,
                 X_KIND={"bf16": 1, "fp16": 2}[x_type], BLOCK_M=block_m, ASM=True, NW=num_warps)
    sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})
    return compiled.asm["cubin"], compiled.asm["ttgir"]


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest backward branch's range (the K loop)."""
    ins = [(int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: list[str] = []
    for addr, op in ins:
        target = re.search(r"BRA\s+.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o in ins if int(target.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, x, most loop instructions per packed word): bounds ~5% above
# the counts measured with Triton 3.9's ptxas (18.7 19.6 14.5 15.6 13.3 14.4 15.3)
V3_COMPILE = [(8, 128, 128, 4, "bf16", 19.7), (16, 128, 128, 4, "bf16", 20.6), (8, 256, 128, 4, "bf16", 15.3),
              (16, 256, 128, 4, "bf16", 16.4), (8, 512, 128, 8, "bf16", 14.0), (16, 512, 128, 8, "bf16", 15.2),
              (16, 256, 128, 4, "fp16", 16.1)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels: run without TRITON_INTERPRET")
@pytest.mark.skipif(_triton_tools() is None or not os.path.isfile(os.path.join(_triton_tools() or "", "cuobjdump")),
                    reason="triton without its NVIDIA tools")
@pytest.mark.parametrize("variant", V3_COMPILE, ids=lambda v: "-".join(map(str, v[:5])))
def test_int_gemv_v3_compiles_for_sm90(variant, tmp_path):
    block_m, block_n, block_k, warps, x_type, max_per_word = variant
    cubin, ttgir = compile_v3_sm90(block_m, block_n, block_k, warps, x_type)
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    tools = _triton_tools()
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", str(path)], capture_output=True,
                           text=True, check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    assert stack == 0 and regs <= 255, usage
    assert "warp_group_dot" in ttgir, "Triton did not pick wgmma (MMAv3)"
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    body = loop_body(sass)
    words = block_n * block_k // 8 // (32 * warps)  # packed words per thread per iteration
    assert len(body) / words <= max_per_word, f"{len(body)} loop instructions for {words} words per thread"
    assert not any("SHFL.IDX" in op for op in body), "the words' layout conversion left the registers"

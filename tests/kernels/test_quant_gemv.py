"""The small-batch quantized GEMVs (gemv_int.py, gemv_fp8.py) against their references, the
configurations they run with (gemv_config.py), and which kernel the quantized linears call per M.

Backends as in test_quant_kernels.py: CUDA (marked gpu) and the Triton interpreter on CPU:
    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_gemv.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.kernels import reference as ref
from pdserve.kernels.gemv_config import GemvConfig
from pdserve.kernels.testing import rel_error, tolerance
from tests.kernels.test_quant_kernels import BF16, FP16, FP32, RUN_INTERPRET, backends, random_int_weight

FMA1, FMA_WIDE = GemvConfig(16, 64), GemvConfig(32, 128, num_warps=2)
DOT = GemvConfig(16, 128, dot=True)

# (M, K, N, bits, group, dtype, config, split_k); N odd or not a multiple of BLOCK_N on purpose
INT_INTERP = [(1, 256, 37, 4, 64, FP32, FMA1, 1), (3, 256, 37, 4, 128, BF16, FMA1, 2),
              (16, 256, 40, 4, 128, BF16, DOT, 2), (3, 256, 24, 4, 64, FP16, DOT, 1),
              (1, 256, 48, 4, 128, BF16, DOT, 3), (4, 128, 33, 8, 32, FP32, FMA_WIDE, 2),
              (2, 128, 16, 8, 64, BF16, DOT, 2), (3, 512, 20, 4, 256, FP32, FMA_WIDE, 4),
              (16, 256, 40, 8, 64, FP32, DOT, 2)]
# + (with bias, integer zero points): every combination under the interpreter, one each on the GPU
# (each combination is another compiled kernel)
INT_INTERP = [c + (b, z) for c in INT_INTERP for b in (False, True) for z in (True, False)]
# version 2 (gemv_int_v2.py, M <= 4 per launch; M = 16 runs as four launches): BLOCK_K within a group
V2_SMALL, V2_WIDE = GemvConfig(16, 64, version=2), GemvConfig(64, 128, num_warps=2, version=2)
INT_V2_INTERP = [(1, 256, 37, 4, 64, BF16, V2_SMALL, 1), (3, 256, 37, 4, 128, FP32, V2_WIDE, 2),
                 (4, 512, 40, 4, 128, FP16, V2_WIDE, 3), (16, 256, 48, 4, 64, BF16, V2_SMALL, 2),
                 (2, 128, 33, 8, 32, BF16, V2_SMALL, 2), (1, 256, 64, 8, 256, FP32, V2_WIDE, 1),
                 (1, 512, 24, 4, 32, BF16, V2_WIDE, 4),
                 # slices along K (reduced across warps in the program; a chunk is slices x BLOCK_K)
                 (1, 512, 37, 4, 64, BF16, GemvConfig(16, 32, slices=4, version=2), 2),
                 (3, 1024, 40, 4, 128, FP32, GemvConfig(32, 64, num_warps=2, slices=2, version=2), 3),
                 (4, 256, 24, 8, 64, FP16, GemvConfig(8, 32, slices=8, version=2), 1)]
INT_INTERP += [c + (b, z) for c in INT_V2_INTERP for b in (False, True) for z in (True, False)]
INT_GPU = [(1, 4096, 6144, 4, 128, BF16, None, None, False, True),
           (3, 4096, 6144, 4, 128, BF16, None, None, True, True),
           (16, 4096, 6144, 4, 128, BF16, None, None, False, True),
           (1, 14336, 4096, 4, 128, BF16, None, None, False, True),
           (1, 4096, 4104, 4, 64, FP16, GemvConfig(128, 256, num_warps=8), 8, True, False),
           (16, 4096, 4104, 4, 64, FP16, GemvConfig(64, 256, dot=True), 4, False, True),
           (1, 4096, 6144, 4, 128, BF16, GemvConfig(1024, 128, version=2), 8, False, True),
           (3, 14336, 4104, 4, 64, FP16, GemvConfig(512, 64, version=2), 16, True, False),
           (4, 4096, 4096, 4, 128, BF16, GemvConfig(256, 128, num_warps=2, version=2), 4, False, True),
           (1, 4096, 6144, 4, 128, FP32, GemvConfig(512, 128, version=2), 1, True, True),
           (2, 4096, 4096, 8, 128, BF16, GemvConfig(512, 128, version=2), 8, False, True),
           (1, 4096, 4096, 4, 128, BF16, GemvConfig(128, 64, num_warps=8, slices=8, version=2), 8, False, True),
           (4, 14336, 4104, 4, 64, FP16, GemvConfig(128, 64, slices=4, version=2), 7, True, False),
           (3, 4096, 6144, 4, 128, FP32, GemvConfig(128, 128, slices=4, version=2), 2, False, True)]


@pytest.mark.parametrize("device,case", backends(INT_GPU, INT_INTERP))
def test_int_gemv(device, case):
    from dataclasses import replace

    from pdserve.kernels.gemv_int import int_gemv
    m, k, n, bits, group, dtype, config, split, with_bias, integer_zeros = case  # (AWQ/GPTQ, GGUF)
    qweight, scales, zeros = random_int_weight(k, n, bits, group, dtype, device, seed=m + n)
    if not integer_zeros:  # GGUF-style fractional zero points
        zeros = (zeros.float() + 0.37).to(dtype)
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    config = config and replace(config, split_k=split)
    out = int_gemv(x, qweight, scales, zeros, bits, group, bias, config=config)
    expected = ref.int_matmul_ref(x, qweight, scales, zeros, bits, group, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out, expected) <= tolerance(dtype)


FP8_INTERP = [(1, 200, 37, FP32, FMA1, 1), (3, 256, 37, BF16, GemvConfig(16, 64, num_warps=2), 3),
              (16, 128, 40, FP16, GemvConfig(16, 32, dot=True), 2), (1, 96, 24, BF16, GemvConfig(16, 32, dot=True), 1),
              (3, 200, 19, FP32, GemvConfig(16, 64), 2), (4, 64, 16, BF16, FMA1, 1),
              (16, 200, 24, FP32, GemvConfig(16, 64, dot=True), 2)]
FP8_V2 = [(1, 200, 37, BF16, GemvConfig(8, 64, version=2), 2), (3, 256, 19, FP32, GemvConfig(4, 128, version=2), 1),
          (4, 512, 24, FP16, GemvConfig(16, 256, version=2), 2), (16, 128, 16, BF16, GemvConfig(8, 32, version=2), 1),
          (2, 96, 8, BF16, GemvConfig(8, 64, version=2), 1)]
FP8_INTERP = [c + (b,) for c in FP8_INTERP + FP8_V2 for b in (False, True)]
FP8_GPU = [(1, 4096, 6144, BF16, None, None, False), (3, 4096, 6144, BF16, None, None, True),
           (16, 14336, 4096, BF16, None, None, False),
           (1, 4096, 4104, FP16, GemvConfig(32, 512, num_warps=8), 4, True),
           (16, 4096, 4104, FP16, GemvConfig(64, 256, dot=True), 4, False),
           (1, 4096, 6144, BF16, GemvConfig(8, 1024, version=2), 1, False),
           (3, 14336, 4104, BF16, GemvConfig(16, 1024, version=2), 2, True),
           (4, 4000, 4096, FP16, GemvConfig(4, 1024, version=2), 3, False),
           (1, 4096, 28672, BF16, GemvConfig(8, 2048, num_warps=8, version=2), 1, True)]


@pytest.mark.parametrize("device,case", backends(FP8_GPU, FP8_INTERP))
def test_fp8_gemv(device, case):
    from dataclasses import replace

    from pdserve.kernels.gemv_fp8 import fp8_gemv
    m, k, n, dtype, config, split, with_bias = case
    gen = torch.Generator().manual_seed(k + n + m)
    weight = (torch.randn(n, k, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    out = fp8_gemv(x, weight, scale, bias, config=config and replace(config, split_k=split))
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out, ref.fp8_gemv_ref(x, weight, scale, bias)) <= tolerance(dtype)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(
    not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU"))])
def test_split_k_leaves_the_workspace_zeroed(device):
    """The last program of each column block takes the sums out and clears the counters: a second
    call (as a CUDA graph replays it) gives the same output."""
    from pdserve.kernels.gemv_fp8 import fp8_gemv
    from pdserve.kernels.gemv_int import int_gemv
    from pdserve.kernels.split_k import WORKSPACE
    qweight, scales, zeros = random_int_weight(256, 40, 4, 64, FP32, device)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    w8 = (torch.randn(40, 256, generator=torch.Generator().manual_seed(1)) * 50).to(torch.float8_e4m3fn)
    s8 = torch.full((40,), 1e-3)
    for call in (lambda: int_gemv(x, qweight, scales, zeros, 4, 64, config=GemvConfig(16, 64, split_k=4)),
                 lambda: fp8_gemv(x, w8, s8, config=GemvConfig(16, 64, split_k=4))):
        first, second = call(), call()
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        ws, locks = WORKSPACE.get(torch.device(device), 40, 3)
        assert not ws.any() and not locks.any()


def test_bench_gemv_shapes_argument():
    from pdserve.services.bench_gemv import MODEL_SHAPES, parse_shapes
    assert parse_shapes("llama2-70b") == MODEL_SHAPES["llama2-70b"]
    assert parse_shapes("all") == MODEL_SHAPES["llama3-8b"] + MODEL_SHAPES["llama2-70b"]
    assert parse_shapes("4096x6144, 14336X4096") == [(4096, 6144), (14336, 4096)]
    assert parse_shapes("4096x") == [] and parse_shapes("100x64") == [] and parse_shapes("qwen") == []


def test_configs_are_fitted_to_the_weight():
    from pdserve.kernels import gemv_config as gc
    assert [gc.bucket_of(m) for m in (1, 2, 4, 5, 8, 16)] == [1, 4, 4, 16, 16, 16]
    with pytest.raises(ValueError, match="1..16 rows"):
        gc.bucket_of(17)
    # BLOCK_K halves until it divides K and aligns with the group; too few words for tl.dot -> FMA
    fitted = gc.fit(GemvConfig(64, 256, dot=True, split_k=64), "int4", 384, 128)
    assert fitted == GemvConfig(64, 128, dot=True, split_k=3)
    assert gc.fit(GemvConfig(64, 256, dot=True), "int4", 96, 32) == GemvConfig(64, 32, dot=False)
    assert gc.fit(GemvConfig(64, 256), "int8", 14336, None).block_k == 256  # per channel: G = K
    assert gc.fit(GemvConfig(16, 1024), "fp8", 200, None).block_k == 256  # fp8 masks K
    # version 2: a chunk of BLOCK_K inputs never spans two groups
    assert gc.fit(GemvConfig(512, 256, version=2), "int4", 4096, 128).block_k == 128
    assert gc.fit(GemvConfig(512, 256), "int4", 4096, 128).block_k == 256
    assert gc.fit(GemvConfig(512, 256, split_k=99, version=2), "int4", 4096, 32) == \
        GemvConfig(512, 32, split_k=99, version=2)
    with pytest.raises(ValueError, match="version"):
        GemvConfig(64, 128, dot=True, version=2)
    assert gc.fit(GemvConfig(8, 1024, version=2), "fp8", 200, None).block_k == 256
    # slices: the chunk (slices x BLOCK_K) halves its slices until it divides K; split_k <= chunks
    assert gc.fit(GemvConfig(128, 64, split_k=99, slices=8, version=2), "int4", 576, 64) == \
        GemvConfig(128, 64, split_k=9, slices=1, version=2)
    assert gc.fit(GemvConfig(128, 64, split_k=99, slices=8, version=2), "int4", 14336, 128) == \
        GemvConfig(128, 64, split_k=28, slices=8, version=2)
    with pytest.raises(ValueError, match="slices"):
        GemvConfig(128, 64, slices=4)
    h = gc.heuristic("int4", 1, 4096, 6144, num_sms=132)  # 12 column blocks -> split to ~4 per SM
    assert h.version == 2 and h.split_k == 44 and 12 * h.split_k >= 4 * 132
    assert not gc.heuristic("int4", 16, 4096, 6144, num_sms=132).version == 2  # tensor cores from M = 5
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(48, 128)
    with pytest.raises(ValueError, match="up to 4 rows"):
        gc.tune({("int4", 4096, 4096, 16): GemvConfig(64, 128)})
    for kind in gc.KINDS:
        for bucket in gc.BUCKETS:
            assert gc.candidates(kind, bucket) and all(c.dot for c in gc.candidates(kind, 16))


def test_tuned_table_round_trips_through_json(tmp_path):
    from pdserve.kernels import gemv_config as gc
    entries = {("int4", 4096, 6144, 1): GemvConfig(128, 256, split_k=8, num_warps=8),
               ("fp8", 14336, 4096, 16): GemvConfig(64, 256, split_k=4, dot=True)}
    path = tmp_path / "table.json"
    path.write_text(gc.tuned_to_json(entries))
    saved = dict(gc.TUNED)
    try:
        gc.tune({}, replace_all=True)
        assert gc.load_tuned(str(path)) == 2 and gc.TUNED == entries
        assert gc.choose("int4", 1, 4096, 6144, 128, torch.device("cpu")) == entries[("int4", 4096, 6144, 1)]
        assert gc.choose("fp8", 9, 14336, 4096, None, torch.device("cpu")) == entries[("fp8", 14336, 4096, 16)]
        assert gc.choose("fp8", 1, 14336, 4096, None, torch.device("cpu")) == gc.fit(
            gc.heuristic("fp8", 1, 14336, 4096, 8), "fp8", 14336, None)
    finally:
        gc.tune(saved, replace_all=True)
    pasted = "".join(gc.tuned_as_python(entries | {("int4", 1, 1, 1): GemvConfig(128, 64, slices=8, version=2)}))
    assert "GemvConfig(128, 256, split_k=8, dot=False, num_warps=8, num_stages=3)" in pasted
    assert "GemvConfig(128, 64, split_k=1, dot=False, num_warps=4, num_stages=3, version=2, slices=8)" in pasted


# --- which kernel the quantized linears run, per M ------------------------------------------------

def test_kernel_choice_by_rows():
    from pdserve.kernels.fp8_linear import fp8_linear_method
    from pdserve.kernels.int_gemm import int_matmul_method
    assert [int_matmul_method(m) for m in (1, 3, 16, 17, 256)] == ["gemv"] * 3 + ["dequant"] * 2
    assert [fp8_linear_method(m) for m in (1, 3, 16, 17, 256)] == ["gemv"] * 3 + ["scaled_mm"] * 2


def _int_linear(fmt: str, use_triton: bool):
    """An IntLinear (two fused shards, K = 256, G = 64) loaded from tensors in the checkpoint's
    own layout: AWQ's interleaved [K, N/8] words, or GPTQ's [K/8, N] words with an act-order g_idx."""
    from pdserve.common.models.quantization.int_linear import IntLinear
    from pdserve.common.models.quantization.packing import pack_cols, pack_rows
    k, sizes, group = 256, [24, 16], 64
    layer = IntLinear(k, sizes, 4, group, fmt, False, use_triton, BF16, desc_act=fmt == "gptq",
                      scales_dtype=FP16)
    gen = torch.Generator().manual_seed(3)
    g_idx = torch.randperm(k, generator=gen) // group  # each group: 64 scattered inputs
    for shard, ns in enumerate(sizes):
        q = torch.randint(0, 16, (k, ns), generator=gen)
        zeros = torch.randint(0, 16, (k // group, ns), generator=gen)
        scales = (0.01 + 0.02 * torch.rand(k // group, ns, generator=gen)).to(FP16)
        qweight = pack_cols(q, 4, awq_order=True) if fmt == "awq" else pack_rows(q, 4)
        layer.qweight.weight_loader(layer.qweight, qweight, shard)
        layer.qzeros.weight_loader(layer.qzeros, pack_cols(zeros, 4, awq_order=fmt == "awq"), shard)
        layer.scales.weight_loader(layer.scales, scales, shard)
        if fmt == "gptq":
            layer.g_idx.weight_loader(layer.g_idx, g_idx, shard)
    layer.finish_loading()
    assert (layer.perm is not None) == (fmt == "gptq")
    return layer


@pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int_linear_runs_the_gemv_up_to_16_rows(fmt, version):
    """IntLinear on the Triton path (gemv for M <= 16, dequantize + matmul above) equals its
    CPU reference path, for AWQ's layout and GPTQ act-order (inputs gathered by perm first),
    with the table's kernel of either version for this weight (K = 256, N = 40)."""
    from pdserve.kernels import gemv_config as gc
    saved = dict(gc.TUNED)
    if version == 2:
        gc.tune({("int4", 256, 40, b): GemvConfig(32, 128, split_k=2, version=2) for b in (1, 4)})
    try:
        triton_layer, cpu_layer = _int_linear(fmt, True), _int_linear(fmt, False)
        for m in (1, 3, 16, 17):
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(BF16)
            got, want = triton_layer(x), cpu_layer(x)
            assert got.shape == (m, 40) and rel_error(got, want) <= tolerance(BF16), m
    finally:
        gc.tune(saved, replace_all=True)


@pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
def test_fp8_linear_is_weight_only_up_to_16_rows():
    """Fp8Linear on the Triton path: M <= 16 gives the W8A16 numbers (fp8_gemv_ref, activations
    not quantized), M = 17 the W8A8 ones of torch._scaled_mm (fp8_linear_ref)."""
    from pdserve.common.models.quantization.fp8 import Fp8Linear
    linear = torch.nn.Linear(128, 40, bias=True)
    layer = Fp8Linear.from_linear(linear, use_triton=True)
    for m in (1, 3, 16, 17):
        x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
        got = layer(x)
        w8a16 = ref.fp8_gemv_ref(x, layer.weight, layer.weight_scale, layer.bias)
        w8a8 = ref.fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.bias)
        expected, other = (w8a16, w8a8) if m <= 16 else (w8a8, w8a16)
        assert rel_error(got, expected) <= 1e-5, m
        assert rel_error(got, other) > 1e-3, m  # the two paths' numbers are told apart


@pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
def test_bench_gemv_sweep_runs_and_writes_a_loadable_table(tmp_path, capsys):
    """The GPU sweep's own code path, on CPU (--smoke: one small shape, three configs per kind
    and M): every config checked and timed, the best per (kind, bucket) written as a table."""
    from pdserve.kernels import gemv_config as gc
    from pdserve.services import bench_gemv
    table = tmp_path / "table.json"
    bench_gemv.main(["--smoke", "--table-out", str(table)])
    printed = capsys.readouterr().out
    assert "wrong results (dropped): 0" in printed and "TUNED entries" in printed
    saved = dict(gc.TUNED)
    try:
        assert gc.load_tuned(str(table)) == 6
        assert {(kind, b) for kind, _, _, b in gc.TUNED} == {(kind, b) for kind in ("int4", "fp8") for b in gc.BUCKETS}
    finally:
        gc.tune(saved, replace_all=True)
    bench_gemv.main(["--smoke", "--kinds", "int4", "--table-out", str(table)])  # one kind swept
    assert {row["kind"] for row in json.loads(table.read_text())} == {"int4"}
    with pytest.raises(SystemExit):
        bench_gemv.main(["--kinds", "int3"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or RUN_INTERPRET, reason="needs CUDA (without TRITON_INTERPRET)")
def test_split_k_gemvs_replay_in_a_cuda_graph():
    """Split-K GEMVs captured back to back in one CUDA graph (as a decode step is) and replayed:
    each replay gives the eager results, so the workspace and the counters are clean after each."""
    from pdserve.kernels.gemv_fp8 import fp8_gemv
    from pdserve.kernels.gemv_int import int_gemv
    qweight, scales, zeros = random_int_weight(4096, 6144, 4, 128, FP16, "cuda")
    w8 = (torch.randn(4096, 14336, device="cuda") * 50).to(torch.float8_e4m3fn)
    s8 = torch.full((4096,), 1e-3, device="cuda")
    x = torch.randn(16, 14336, device="cuda", dtype=BF16)
    calls = [lambda m=m: int_gemv(x[:m, :4096], qweight, scales, zeros, 4, 128,
                                  config=GemvConfig(64, 128, split_k=16, dot=m > 4)) for m in (1, 3, 16)]
    calls += [lambda m=m: fp8_gemv(x[:m], w8, s8, config=GemvConfig(32, 256, split_k=8, dot=m > 4)) for m in (1, 3, 16)]
    calls += [lambda m=m: int_gemv(x[:m, :4096], qweight, scales, zeros, 4, 128,  # version 2 (M = 16: 4 launches)
                                   config=GemvConfig(512, 128, split_k=8, version=2)) for m in (1, 3, 16)]
    calls += [lambda m=m: fp8_gemv(x[:m], w8, s8, config=GemvConfig(8, 1024, split_k=4, version=2)) for m in (1, 3)]
    eager = [call() for call in calls]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    for _ in range(3):
        graph.replay()
        for got, want in zip(outs, eager):
            assert rel_error(got, want) <= 1e-3  # the same sums, added in another order


# (M, K, N, dtype, config): the down projection's GEMV with silu(gate) * up computed inside it
FP8_GATED_INTERP = [(1, 200, 37, BF16, GemvConfig(8, 64, version=2)), (3, 256, 19, FP32, GemvConfig(4, 128, version=2)),
                    (2, 96, 8, FP16, GemvConfig(8, 64, version=2)), (1, 128, 16, BF16, GemvConfig(16, 32))]
FP8_GATED_GPU = [(1, 14336, 4096, BF16, None), (4, 14336, 4096, BF16, None), (1, 7168, 4096, BF16, None)]


@pytest.mark.parametrize("device,case", backends(FP8_GATED_GPU, FP8_GATED_INTERP))
def test_fp8_gemv_gated_equals_activation_then_gemv(device, case):
    from pdserve.kernels.activation import silu_and_mul
    from pdserve.kernels.gemv_fp8 import fp8_gemv
    m, k, n, dtype, config = case
    gen = torch.Generator().manual_seed(k + n + m)
    weight = (torch.randn(n, k, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(device)
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 2).to(device, dtype)
    fused = fp8_gemv(gate_up, weight, scale, config=config, gated=True)
    # the same kernel configuration on the activation's output: the same numbers (version 1 configs
    # run the activation first, so they are equal by construction)
    separate = fp8_gemv(silu_and_mul(gate_up), weight, scale, config=config)
    assert fused.shape == (m, n) and fused.dtype == dtype
    assert torch.equal(fused, separate)
    assert rel_error(fused, ref.fp8_gemv_ref(silu_and_mul(gate_up), weight, scale, None)) <= tolerance(dtype)

"""Quantized-weight kernels (int_gemm, fp8 KV in the attention kernels) against their references
(the small-batch GEMVs: test_quant_gemv.py).

Same two backends as test_kernels.py: `gpu` (CUDA, Llama-sized shapes, marked gpu) and the
Triton interpreter on CPU (tiny shapes, TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_kernels.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.kernels import reference as ref
from pdserve.kernels import triton_available
from pdserve.kernels.testing import rel_error, tolerance

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_GPU = triton_available() and torch.cuda.is_available() and not INTERPRET
RUN_INTERPRET = triton_available() and INTERPRET
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def backends(gpu_cases: list, interpret_cases: list) -> list:
    skip_gpu = pytest.mark.skipif(not RUN_GPU, reason="needs CUDA and triton (without TRITON_INTERPRET)")
    skip_interp = pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
    return ([pytest.param("cuda", c, marks=[pytest.mark.gpu, skip_gpu], id=f"gpu-{c}") for c in gpu_cases]
            + [pytest.param("cpu", c, marks=skip_interp, id=f"interp-{c}") for c in interpret_cases])


def random_int_weight(k: int, n: int, bits: int, group: int, dtype, device, seed: int = 0):
    """Packed [K/P, N] int32 of random values, scales ~ 0.01-0.03, integer zero points."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    per_word = 32 // bits
    shifts = (torch.arange(per_word) * bits).view(1, per_word, 1)
    words = (q.view(k // per_word, per_word, n).long() << shifts).sum(1)
    qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scales = (0.01 + 0.02 * torch.rand(k // group, n, generator=gen)).to(dtype)
    zeros = torch.randint(0, 1 << bits, (k // group, n), generator=gen).to(dtype)
    return qweight.to(device), scales.to(device), zeros.to(device)


INT_GPU = [(m, k, n, b, g, BF16) for m in (1, 7, 64, 256) for (k, n) in ((4096, 6144), (14336, 4096))
           for b, g in ((4, 128), (8, 32))] + [(1, 4096, 6144, 4, 128, FP16), (33, 8192, 1024, 4, 64, FP16)]
INT_INTERP = [(1, 64, 32, 4, 32, FP32), (1, 128, 48, 8, 32, BF16), (1, 256, 16, 4, 128, FP32),
              (5, 64, 40, 4, 32, FP32), (33, 128, 72, 4, 64, BF16), (3, 64, 24, 8, 32, FP16)]


@pytest.mark.parametrize("device,case", backends(INT_GPU, INT_INTERP))
@pytest.mark.parametrize("with_bias", [False, True])
def test_int_matmul(device, case, with_bias):
    from pdserve.kernels.int_gemm import int_matmul
    m, k, n, bits, group, dtype = case
    qweight, scales, zeros = random_int_weight(k, n, bits, group, dtype, device, seed=m + k)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    expected = ref.int_matmul_ref(x, qweight, scales, zeros, bits, group, bias)
    for method in ("gemv", "dequant", "fused") if m <= 16 else ("dequant", "fused"):
        out = int_matmul(x, qweight, scales, zeros, bits, group, bias, method=method)
        assert out.shape == (m, n) and out.dtype == dtype
        err = rel_error(out, expected)
        assert err <= tolerance(dtype), f"{method}: relative error {err:.2e}"


@pytest.mark.parametrize("device,case", backends([(4096, 6144, 4, 128, BF16), (8192, 1024, 8, 32, FP16)],
                                                 [(128, 40, 4, 64, FP32), (64, 24, 8, 32, BF16)]))
def test_int_dequantize_equals_the_reference(device, case):
    from pdserve.kernels.int_gemm import int_dequantize
    k, n, bits, group, dtype = case
    qweight, scales, zeros = random_int_weight(k, n, bits, group, dtype, device, seed=k)
    w = int_dequantize(qweight, scales, zeros, bits, group, dtype)
    expected = ref.dequantize_int_ref(qweight, scales, zeros, bits, group)
    assert w.shape == (k, n) and w.dtype == dtype
    assert rel_error(w, expected.to(dtype)) <= tolerance(dtype)


@pytest.mark.parametrize("device,case", backends([(1, 4096, BF16), (256, 14336, BF16), (3, 4096, FP16)],
                                                 [(1, 64, FP32), (5, 200, BF16), (2, 48, FP16)]))
def test_quantize_fp8_per_token(device, case):
    from pdserve.kernels.fp8_linear import quantize_fp8_per_token
    m, k, dtype = case
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(device, dtype)
    x[0, 0] = 0  # a zero next to large values
    q, scale = quantize_fp8_per_token(x)
    q_ref, scale_ref = ref.fp8_quantize_per_row_ref(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # the same fp8 codes up to one rounding step where x / scale sits on a rounding boundary
    assert (q.float() - q_ref.float()).abs().le(q_ref.float().abs() * 0.0625 + 1e-6).all()
    assert (q.float() == q_ref.float()).float().mean() > 0.99


# --- fp8 KV cache ------------------------------------------------------------------------------

def fp8_paged_kv(context_lens, num_kv_heads, head_dim, block_size, device, seed, per_tensor=False):
    """make_paged_kv's layout (NaN-poisoned free slots) quantized to e4m3 with per-head scales."""
    from pdserve.kernels.testing import make_paged_kv
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, FP32, device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    scales = (0.5 + torch.rand(2, num_kv_heads, generator=gen)) * 4 / 448  # |x| ~ N(0, 1) -> amax ~ 4
    if per_tensor:
        scales[:] = scales.max()
    k_scale, v_scale = scales[0].to(device), scales[1].to(device)
    kv.k_cache = ref.quantize_kv_ref(kv.k_cache, k_scale)
    kv.v_cache = ref.quantize_kv_ref(kv.v_cache, v_scale)
    return kv, k_scale, v_scale


@pytest.mark.parametrize("device,case", backends(
    [(1, 16, BF16), (33, 16, BF16), (512, 32, FP16)], [(1, 16, BF16), (7, 16, FP32), (20, 8, BF16)]))
def test_store_kv_fp8(device, case):
    from pdserve.kernels import rotary_store_kv, store_kv
    num_tokens, block_size, dtype = case
    num_kv_heads, head_dim, num_blocks = 4, 64, 40
    gen = torch.Generator().manual_seed(num_tokens)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(device, dtype)
    v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(device, dtype)
    k[0, 0, 0] = 1e6  # saturates at 448 * scale
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    slots[1::3] = -1
    k_scale = (torch.rand(num_kv_heads, generator=gen) * 0.02 + 0.01).to(device)
    v_scale = (torch.rand(num_kv_heads, generator=gen) * 0.02 + 0.01).to(device)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    got = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
    want = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
    store_kv(k, v, got[0], got[1], slots, k_scale, v_scale)
    ref.store_kv_ref(k, v, want[0], want[1], slots, k_scale, v_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert float(got[0].float().abs().max()) == 448.0
    # fused with rotary: q rotated in place, rotated k quantized
    q = torch.randn(num_tokens, 8, head_dim, generator=gen).to(device, dtype)
    positions = torch.randint(0, 100, (num_tokens,), generator=gen).to(device)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(128).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
    got.zero_()
    want.zero_()
    q_ref = ref.rotary_store_kv_ref(q, k, v, positions, cos_sin, want[0], want[1], slots, k_scale, v_scale)
    rotary_store_kv(q, k, v, positions, cos_sin, got[0], got[1], slots, k_scale, v_scale)
    torch.testing.assert_close(q, q_ref)
    differ = (got.view(torch.uint8) != want.view(torch.uint8))
    assert differ.float().mean() < 0.01  # rotation products round differently at an fp8 boundary, rarely
    assert (got.float() - want.float()).abs().le(want.float().abs() * 0.0625 + 1e-3).all()


FP8_DECODE = [([1, 7, 33], 4, 4, 64, 16, BF16, None, None), ([129, 70], 8, 1, 64, 32, BF16, None, 3),
              ([200, 5], 16, 1, 64, 8, FP32, None, 4), ([150, 40], 4, 1, 128, 16, BF16, 50, 3)]
FP8_DECODE_GPU = [([1025, 3, 2048, 17], 32, 8, 128, 16, BF16, None, None), ([3000, 77], 32, 2, 128, 16, BF16, None, None),
                  ([33, 129, 1200], 32, 8, 128, 16, FP16, None, 7)]


@pytest.mark.parametrize("device,case", backends(FP8_DECODE_GPU, FP8_DECODE))
def test_paged_decode_attention_fp8(device, case):
    from pdserve.kernels import paged_decode_attention
    context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits = case
    kv, k_scale, v_scale = fp8_paged_kv(context_lens, num_kv_heads, head_dim, block_size, device, len(context_lens))
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim ** -0.5, window)
    out = paged_decode_attention(*args, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    expected = ref.paged_decode_attention_ref(*args, k_scale=k_scale, v_scale=v_scale)
    assert not out.isnan().any()
    assert rel_error(out, expected) <= tolerance(dtype)


FP8_PREFILL = [([33, 16], [0, 16], 8, 2, 64, 16, FP32, None), ([70, 1, 20], [40, 100, 0], 8, 1, 64, 32, BF16, None),
               ([90, 12], [30, 0], 4, 2, 64, 16, BF16, 40)]
FP8_PREFILL_GPU = [([200, 1, 513, 77], [300, 1000, 0, 1], 32, 4, 128, 32, BF16, None),
                   ([600, 33, 1], [500, 0, 2000], 32, 8, 128, 16, BF16, 256)]


@pytest.mark.parametrize("device,case", backends(FP8_PREFILL_GPU, FP8_PREFILL))
def test_paged_prefill_attention_fp8(device, case):
    from pdserve.kernels import paged_prefill_attention
    from pdserve.kernels.testing import query_start_loc
    query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window = case
    context = [q + p for q, p in zip(query_lens, prefix_lens)]
    kv, k_scale, v_scale = fp8_paged_kv(context, num_kv_heads, head_dim, block_size, device, 3, per_tensor=True)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc(query_lens, device), kv.context_lens,
            head_dim ** -0.5, window)
    out = paged_prefill_attention(*args, k_scale=k_scale, v_scale=v_scale)
    expected = ref.paged_prefill_attention_ref(*args, k_scale=k_scale, v_scale=v_scale)
    assert not out.isnan().any()
    assert rel_error(out, expected) <= tolerance(dtype)


@pytest.mark.parametrize("device,case", backends([("Q4_K", 1, 4096, 4096), ("Q8_0", 7, 4096, 4096), ("Q4_1", 64, 4096, 1024)],
                                                 [("Q4_K", 1, 256, 16), ("Q8_0", 3, 64, 16), ("Q4_1", 1, 128, 24),
                                                  ("Q4_0", 5, 64, 8)]))
def test_int_matmul_on_gguf_blocks(device, case):
    """GGUF blocks converted to the running layout (fp32 scales, fractional zeros) through the kernels."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from pdserve.common.models.quantization.gguf_blocks import KERNEL_TYPES, to_running_layout
    from pdserve.kernels.int_gemm import int_matmul
    qtype, m, k, n = case
    rng = np.random.default_rng(k)
    if qtype == "Q4_K":
        raw = rng.integers(0, 256, (n, k // 256 * 144), dtype=np.uint8)
        blocks = raw.reshape(n, -1, 144)
        blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
        blocks[..., 4:16] |= 1
    else:
        raw = quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), GGMLQuantizationType[qtype])
    parts = {name: t.to(device) for name, t in to_running_layout(raw, qtype).items()}
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, BF16)
    args = (parts["qweight"], parts["scales"], parts["qzeros"], KERNEL_TYPES[qtype], 32)
    assert rel_error(int_matmul(x, *args), ref.int_matmul_ref(x, *args)) <= tolerance(BF16)

"""The C++ CPU kernels (kernels/cpu.py) against the torch code they replace.

Element-wise kernels must give `TorchOps`' (HF's) values bit for bit in bf16 and agree to fp32
rounding in float32; the paged decode and the prefill attention match kernels/reference.py, and in
bf16 the prefill attention rounds as torch's flash SDPA (the torch path's) does. Shapes cover both
work splits of the decode attention (all KV heads of a sequence per item, one head per item), the
16-token block path and the token-by-token tail, sliding windows, chunks after a cached prefix, and
vector tails (sizes that are not multiples of the vector width). The build itself is tested by
`test_kernels_build`: on a machine without a compiler the rest are skipped, and the engine runs the
torch path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pdserve.common.models.attention import PrefillSeq
from pdserve.common.models.cpu_ops import CpuKernelAttention, CpuPagedAttention
from pdserve.common.models.llama import Rotary, TorchOps
from pdserve.kernels import cpu
from pdserve.kernels.reference import paged_decode_attention_ref, paged_prefill_attention_ref

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu.load():
        pytest.skip(f"CPU kernels do not build here: {cpu.load_error()}")


def test_kernels_build():
    assert cpu.load(), cpu.load_error()


@pytest.fixture(params=["amx", "avx512"])
def prompt_path(request):
    """The bf16 prompt attention's two paths: AMX tiles (where the CPU has them) and AVX512-BF16."""
    amx = request.param == "amx"
    if cpu.set_amx(amx) != amx:
        cpu.set_amx(True)
        pytest.skip("this CPU (or its kernel build) has no AMX tiles")
    yield request.param
    cpu.set_amx(True)


def _cache(num_blocks, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, block_size, window", [
    ([1, 17, 40, 100, 3, 64, 250, 33, 16], 9, 3, 64, 16, None),  # 9 sequences: whole-sequence items
    ([1, 17, 40, 100, 3, 64, 250, 33, 16], 9, 3, 64, 16, 40),
    ([250], 8, 2, 128, 16, None),  # one sequence: an item per KV head
    ([250], 8, 2, 128, 16, 17),
    ([5, 70, 33, 48, 9, 12, 200, 1], 4, 4, 24, 8, None),  # D and BS not multiples of 16: token by token
    ([40, 3, 97, 64, 18, 33, 16, 250], 16, 2, 64, 16, None),  # G 8: two register groups of 4 heads in P V
    ([40, 3, 97, 64, 18, 33, 16, 250], 9, 3, 128, 16, None),  # D 128, G 3: groups of 2 and 1 in P V
    ([40, 3, 97, 64, 18, 33, 16, 250], 6, 2, 32, 32, 20),  # D 32 (one bf16 vector a row), blocks of 32
])
def test_paged_decode_attention(dtype, lens, heads, kv_heads, head_dim, block_size, window):
    width = -(-max(lens) // block_size)
    num_blocks = len(lens) * width + 3
    k_cache, v_cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))[:len(lens) * width]
    table = table.view(len(lens), width)
    lengths = torch.tensor(lens)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, :heads * head_dim].view(len(lens), heads, head_dim)  # strided rows, as in the model
    scale = head_dim ** -0.5
    got = cpu.paged_decode_attention(q, k_cache, v_cache, table, lengths, scale, window)
    want = paged_decode_attention_ref(q, k_cache, v_cache, table.int(), lengths.int(), scale, window)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len, context_len, heads, kv_heads, head_dim, window", [
    (200, 200, 9, 3, 64, None),  # a whole prompt: blocks of 16 rows and a tail of 8
    (1, 1, 9, 3, 64, None),
    (37, 250, 9, 3, 64, None),  # a chunk after 213 cached tokens
    (100, 100, 8, 2, 128, 17),  # sliding window shorter than a block of rows
    (45, 120, 4, 4, 24, 50),  # D not a multiple of 16: token by token
    # bf16 on AVX512-BF16 (cpu_prefill_bf16.h): D 32 (one pair vector a key), keys over three 512-key
    # splits (accumulators rescaled between them), an odd window start (pairs start a key early)
    (300, 1100, 4, 2, 32, 701),
    (40, 1030, 8, 2, 128, None),  # D 128: two query vectors a P V pass, a chunk after 990 cached
])
def test_prefill_attention(dtype, q_len, context_len, heads, kv_heads, head_dim, window, prompt_path):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(q_len, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, :heads * head_dim].view(q_len, heads, head_dim)  # strided rows, as in the model
    keys = torch.randn(context_len, 2, kv_heads, head_dim, generator=g).to(dtype)
    k, v = keys[:, 0], keys[:, 1]  # strided rows too
    scale = head_dim ** -0.5
    got = cpu.prefill_attention(q, k, v, scale, window)
    # the reference reads a paged cache: one block per token, the table in order
    table = torch.arange(context_len, dtype=torch.int32)[None]
    want = paged_prefill_attention_ref(q, k[:, None].contiguous(), v[:, None].contiguous(), table,
                                       torch.tensor([0, q_len], dtype=torch.int32),
                                       torch.tensor([context_len], dtype=torch.int32), scale, window)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context_len, q_len, window, head_dim", [
    (200, 37, None, 64), (700, 150, None, 64), (1100, 300, 701, 32), (300, 45, 50, 128)])
def test_prefill_attention_same_rows_fresh_or_after_a_prefix(dtype, context_len, q_len, window, head_dim,
                                                             prompt_path):
    """A prompt's last rows get the same bits whether the whole prompt runs (a prefix-cache miss)
    or only they do, after the cached rest (a hit): a repeated request must not change its answer."""
    g = torch.Generator().manual_seed(4)
    heads, kv_heads = 8, 2
    q = torch.randn(context_len, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(context_len, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    scale = head_dim ** -0.5
    fresh = cpu.prefill_attention(q, k, v, scale, window)[-q_len:]
    after_prefix = cpu.prefill_attention(q[-q_len:].contiguous(), k, v, scale, window)
    assert torch.equal(fresh, after_prefix)


@pytest.mark.parametrize("q_len, context_len, window", [
    (37, 37, None),  # SmolLM2's chat prompt: where normalised fp32 weights changed the greedy answer
    (200, 200, None),
    (37, 250, None),  # a chunk after a cached prefix: K/V gathered through a shuffled block table
    (100, 700, None),  # keys past torch's 512-key split: its running max and rescaled sums
    (300, 300, 50),  # sliding window: the torch path's masked SDPA
    (64, 1100, 600),  # a window over three splits, the first partly hidden
])
def test_prefill_attention_rounds_like_torch_sdpa(q_len, context_len, window, prompt_path):
    """bf16: the kernel backend's prompt attention gives the torch path's numbers (flash SDPA, what
    HF runs) up to the order of fp32 sums: at most 4% of the outputs differ, by a bf16 step of
    the values' scale (a small output is a sum that cancels: its own step is finer).
    Weights normalised in fp32 before P V (more exact, not SDPA's bf16 weights) differed in ~10%
    and turned the packaged model's bf16 chat answer (a near tie) into another one."""
    heads, kv_heads, head_dim, block_size, dtype = 9, 3, 64, 16, torch.bfloat16
    g = torch.Generator().manual_seed(3)
    num_blocks = -(-context_len // block_size)
    kv = (2 * torch.randn(2, num_blocks + 7, block_size, kv_heads, head_dim, generator=g)).to(dtype)
    table = torch.randperm(num_blocks + 7, generator=g)[:num_blocks]
    qkv = (2 * torch.randn(q_len, (heads + 2 * kv_heads) * head_dim, generator=g)).to(dtype)
    q = qkv[:, :heads * head_dim].view(q_len, heads, head_dim)  # strided rows, as in the model
    # the chunk's own keys (read when no prefix is cached): its rows of the cache, strided like q
    chunk_kv = kv.index_select(1, table).view(2, -1, kv_heads * head_dim)[:, context_len - q_len:context_len]
    qkv[:, heads * head_dim:] = chunk_kv.permute(1, 0, 2).reshape(q_len, -1)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(q_len, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(q_len, kv_heads, head_dim)
    seq = PrefillSeq(q_start=0, q_len=q_len, context_len=context_len, block_table=table)
    args = (heads, kv_heads, head_dim, block_size, window)
    got = CpuKernelAttention(*args)._prefill(q, k, v, kv[0], kv[1], seq).float()
    want = CpuPagedAttention(*args)._prefill(q, k, v, kv[0], kv[1], seq).float()
    differ = got != want
    assert differ.float().mean() <= 0.04, f"{differ.float().mean():.3f} of the outputs differ from SDPA's"
    torch.testing.assert_close(got, want, atol=2 ** -7, rtol=2 ** -7)  # V ~ 2 randn: one bf16 step of 1-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, size", [(1, 576), (37, 576), (5, 70)])
def test_rms_norm(dtype, rows, size):
    x = torch.randn(rows, size).to(dtype)
    residual = torch.randn(rows, size).to(dtype)
    weight = (1 + 0.1 * torch.randn(size)).to(dtype)
    want_out, want_residual = TorchOps.rms_norm(x, weight, 1e-5, residual.clone())
    res = residual.clone()
    got_out, got_residual = cpu.rms_norm(x, weight, 1e-5, res)
    assert got_residual is res and torch.equal(got_residual, want_residual)  # updated in place, exactly
    plain = cpu.rms_norm(x, weight, 1e-5)
    if dtype == torch.bfloat16:
        assert torch.equal(got_out, want_out) and torch.equal(plain, TorchOps.rms_norm(x, weight, 1e-5))
    else:  # the sum of squares is added in another order
        torch.testing.assert_close(got_out, want_out, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(plain, TorchOps.rms_norm(x, weight, 1e-5), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inner", [(1, 1536), (33, 1536), (3, 21)])
def test_silu_and_mul(dtype, rows, inner):
    x = (3 * torch.randn(rows, 2 * inner)).to(dtype)
    got, want = cpu.silu_and_mul(x), TorchOps.silu_and_mul(x)
    if inner % 16 == 0:  # the vector body computes silu exactly as torch's kernel does
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 16])
def test_rotary_store_kv(dtype, head_dim):
    heads, kv_heads, tokens, block_size = 9, 3, 7, 16
    rotary = Rotary(head_dim, 512, 10000.0, None)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.tensor([0, 1, 9, 100, 200, 300, 511])
    want_q, want_k = TorchOps.rotary(q, k, positions, rotary.cos_sin)
    k_cache = torch.zeros(8, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 4, -1, 70, 71, 127, 16])
    cpu.rotary_store_kv(q, k, v, positions, rotary.cos_sin, k_cache, v_cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # in place, HF's roundings
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], want_k[t]) and torch.equal(flat_v[slot], v[t])
    written = set(s for s in slots.tolist() if s >= 0)
    untouched = [s for s in range(flat_k.shape[0]) if s not in written]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_the_avx2_gemv_on_a_cpu_with_avx512():
    """The GEMV's AVX2 code (CPUs without AVX-512) is what an AVX-512 CPU runs when the kernels
    are built for Haswell: `test_gemv_bf16` again in such a build (a subprocess: one build of the
    kernels per process)."""
    flags = open("/proc/cpuinfo").read()
    if " avx2" not in flags or " avx512f" not in flags:
        pytest.skip("the CPU has no AVX2, or no AVX-512 (then test_gemv_bf16 runs the AVX2 code itself)")
    env = {**os.environ, "PDSERVE_CPU_MARCH": "haswell"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_gemv_bf16"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "12 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k, bias", [(37, 64, False), (960, 576, True), (576, 1536, False)])
def test_gemv_bf16(rows, n, k, bias):
    """The 1-4-row bf16 linear: every output is the fp32 sum of exact bf16 products (+ bias) rounded
    once to bf16, so it is within one bf16 rounding (and the sum order's fp32 error) of the exact
    product; rows may be strided; N not a multiple of the rows a block takes."""
    if not cpu.gemv_bf16_available():
        pytest.skip("neither AVX512-BF16 nor AVX2 on this CPU")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 2 * k, generator=g).to(torch.bfloat16)[:, :k]  # strided rows
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    got = cpu.gemv_bf16(x, w, b)
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    step = exact.abs() * 2 ** -8 + 1e-5 * k ** 0.5  # half a bf16 step (round to nearest) + fp32 sums
    assert ((got.double() - exact).abs() <= step).all()

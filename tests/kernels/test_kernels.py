"""Each Triton kernel against its reference in pdserve.kernels.reference, on fresh random inputs.

Two backends, same test bodies:
  gpu        CUDA, full-size cases (Llama-like shapes, contexts > 1024 for split-K); marked `gpu`.
  interpret  CPU under the Triton interpreter, small cases; runs only with TRITON_INTERPRET=1:
                 TRITON_INTERPRET=1 python -m pytest tests/kernels -q
Without either, these tests skip and tests/kernels/test_reference.py still checks the references.
"""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.kernels import reference as ref
from pdserve.kernels import triton_available
from pdserve.kernels.testing import make_paged_kv, query_start_loc, rel_error, tolerance

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_GPU = triton_available() and torch.cuda.is_available() and not INTERPRET
RUN_INTERPRET = triton_available() and INTERPRET

if triton_available():
    from pdserve import kernels as K

BF16, FP32 = torch.bfloat16, torch.float32


def backends(gpu_cases: list, interpret_cases: list) -> list:
    """pytest params (device, case): GPU cases marked gpu, interpreter cases on CPU."""
    skip_gpu = pytest.mark.skipif(not RUN_GPU, reason="needs CUDA and triton (without TRITON_INTERPRET)")
    skip_interp = pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
    return ([pytest.param("cuda", c, marks=[pytest.mark.gpu, skip_gpu], id=f"gpu-{c}") for c in gpu_cases]
            + [pytest.param("cpu", c, marks=skip_interp, id=f"interp-{c}") for c in interpret_cases])


def check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN in kernel output"
    err = rel_error(out, expected)
    assert err <= tolerance(dtype), f"relative error {err:.2e} > {tolerance(dtype):.0e}"


# --- store_kv ---------------------------------------------------------------------------------

STORE_GPU = [(t, bs, dt, it) for t in (1, 7, 33, 512) for bs in (16, 32) for dt in (BF16, FP32) for it in (32, 64)]
STORE_INTERP = [(1, 16, BF16, 64), (7, 16, FP32, 32), (33, 32, BF16, 64), (20, 8, FP32, 32)]


@pytest.mark.parametrize("device,case", backends(STORE_GPU, STORE_INTERP))
def test_store_kv(device, case):
    num_tokens, block_size, dtype, index_bits = case
    num_kv_heads, head_dim, num_blocks = 4, 64, 40
    gen = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(num_tokens, (8 + 2 * num_kv_heads) * head_dim, generator=gen).to(device, dtype)
    k = qkv[:, 8 * head_dim : (8 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (8 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1                                              # padded batch entries
    slot_mapping = slots.to(device, torch.int64 if index_bits == 64 else torch.int32)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    expected = kv.clone()
    ref.store_kv_ref(k, v, expected[0], expected[1], slot_mapping)
    K.store_kv(k, v, kv[0], kv[1], slot_mapping)
    assert torch.equal(kv, expected)


# --- decode attention -------------------------------------------------------------------------

# (context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window, num_splits)
DECODE_GPU = [
    ([1], 32, 8, 128, 16, BF16, None, None),
    ([7, 33, 129, 16, 32], 32, 8, 128, 16, BF16, None, None),
    ([1025, 3, 2048, 17, 513], 32, 8, 128, 16, BF16, None, None),
    ([4096, 1], 32, 8, 128, 16, BF16, None, None),
    ([4000, 100, 2500], 32, 4, 128, 32, BF16, None, None),          # GQA 8
    ([1500, 64, 31, 2049, 700, 5, 1024, 9], 8, 8, 64, 16, BF16, None, None),   # GQA 1, 8 seqs
    ([3000, 77], 32, 2, 128, 16, BF16, None, None),                 # GQA 16: tl.dot path
    ([3000, 77, 1], 16, 1, 64, 32, FP32, None, None),
    ([2048, 333], 32, 8, 64, 8, FP32, None, None),
    ([2048, 333, 5], 32, 8, 128, 16, BF16, 256, None),              # sliding window
    ([1100, 4000], 32, 2, 128, 32, BF16, 1000, None),
    ([700, 1], 8, 2, 64, 16, FP32, 1, None),
    ([33, 129, 1200], 32, 8, 128, 16, BF16, None, 1),
    ([33, 129, 1200], 32, 8, 128, 16, BF16, None, 7),
    ([0, 50], 32, 8, 128, 16, BF16, None, 4),                       # empty (padded) row
]
DECODE_INTERP = [
    ([1, 7, 33], 4, 4, 64, 16, BF16, None, None),
    ([16, 32, 48], 8, 2, 64, 16, FP32, None, None),
    ([129, 70], 8, 1, 64, 32, BF16, None, 3),                       # GQA 8, split-K
    ([200, 5], 16, 1, 64, 8, FP32, None, 4),                        # GQA 16: tl.dot path
    ([200, 5], 16, 1, 64, 16, BF16, None, 2),
    ([150, 40], 4, 1, 128, 16, BF16, 50, 3),                        # sliding window + splits
    ([0, 33], 4, 2, 64, 16, FP32, 8, None),
]


@pytest.mark.parametrize("device,case", backends(DECODE_GPU, DECODE_INTERP))
def test_paged_decode_attention(device, case):
    context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits = case
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=len(context_lens))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(len(context_lens), num_heads + 3, head_dim, generator=gen).to(device, dtype)[:, :num_heads]  # view
    scale = head_dim ** -0.5
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, window)
    out = K.paged_decode_attention(*args, num_splits=num_splits)
    check(out, ref.paged_decode_attention_ref(*args), dtype)


# (group sizes, last context of each group, num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits)
DECODE_GROUPS_GPU = [
    ([9], [600], 9, 3, 64, 16, BF16, None, 64),                     # SmolLM2's verify step, k = 8
    ([9, 1, 9], [2000, 37, 64], 9, 3, 64, 16, BF16, None, 10),
    ([5, 3, 1, 16], [4100, 700, 1, 16], 32, 8, 128, 16, BF16, None, None),
    ([16, 2], [300, 2], 64, 8, 128, 16, BF16, None, 4),             # GQA 8 x 16 rows: 128 query rows
    ([9, 4], [1300, 90], 32, 8, 128, 16, BF16, 256, 6),             # sliding window
    ([7, 7], [513, 100], 16, 4, 64, 32, FP32, None, 1),
]
DECODE_GROUPS_INTERP = [
    ([3, 1, 2], [40, 5, 17], 4, 2, 64, 16, FP32, None, 3),
    ([4, 1], [70, 0], 4, 1, 64, 16, BF16, None, 2),                 # a padded row (no context)
    ([5], [33], 6, 2, 64, 8, FP32, 10, 4),                          # window shorter than the group's span
    ([2, 2], [19, 64], 8, 8, 32, 16, BF16, None, None),
    ([9, 2], [60, 20], 6, 2, 32, 8, FP32, None, 3),                 # 27 query rows in a tile of 32 (a verify group)
]


@pytest.mark.parametrize("device,case", backends(DECODE_GROUPS_GPU, DECODE_GROUPS_INTERP))
def test_paged_decode_attention_row_groups(device, case):
    """Row groups (a verify step's rows of one sequence, contexts growing by one): every row as
    the reference computes it alone, whatever the split count; rows after a group's first do
    nothing of their own (their program returns), so each output comes from the leader's."""
    sizes, lasts, num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits = case
    kv = make_paged_kv(lasts, num_kv_heads, head_dim, block_size, dtype, device, seed=len(sizes))
    contexts, tables, groups = [], [], []
    for g, (n, last) in enumerate(zip(sizes, lasts)):
        for i in range(n):
            contexts.append(max(0, last - (n - 1) + i))
            tables.append(kv.block_tables[g])
            groups.append(n if i == 0 else 0)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    block_tables = torch.stack(tables)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(len(contexts), num_heads, head_dim, generator=gen).to(device, dtype)
    scale = head_dim ** -0.5
    args = (q, kv.k_cache, kv.v_cache, block_tables, context_lens, scale, window)
    row_groups = torch.tensor(groups, dtype=torch.int32, device=device)
    out = K.paged_decode_attention(*args, num_splits=num_splits, row_groups=row_groups, max_group_rows=max(sizes))
    check(out, ref.paged_decode_attention_ref(*args), dtype)


# --- prefill attention ------------------------------------------------------------------------

# (query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window)
PREFILL_GPU = [
    ([1], [0], 32, 8, 128, 16, BF16, None),
    ([7, 33, 129], [0, 0, 0], 32, 8, 128, 16, BF16, None),
    ([16, 32, 64, 128], [0, 16, 64, 128], 32, 8, 128, 16, BF16, None),   # block boundaries
    ([200, 1, 513, 77], [300, 1000, 0, 1], 32, 4, 128, 32, BF16, None),  # prefix cache / chunked
    ([512] * 4, [0, 512, 1024, 7], 8, 8, 64, 16, BF16, None),
    ([300, 45], [100, 0], 32, 2, 128, 16, FP32, None),
    ([129, 257], [3, 0], 16, 4, 64, 8, FP32, None),
    ([600, 33, 1], [500, 0, 2000], 32, 8, 128, 16, BF16, 256),          # sliding window
    ([100, 100], [0, 50], 8, 1, 64, 32, FP32, 1),
    ([5, 40, 130, 64], [62, 63, 64, 65], 32, 8, 128, 16, BF16, None),   # prefixes at BLOCK_N edges
    ([9, 3, 40], [30, 31, 33], 8, 2, 64, 16, FP32, None),
]
PREFILL_INTERP = [
    ([1, 7], [0, 0], 4, 4, 64, 16, BF16, None),
    ([33, 16], [0, 16], 8, 2, 64, 16, FP32, None),
    ([70, 1, 20], [40, 100, 0], 8, 1, 64, 32, BF16, None),              # prefix + decode-like row
    ([129], [3], 4, 1, 128, 8, BF16, None),
    ([90, 12], [30, 0], 4, 2, 64, 16, FP32, 40),                         # sliding window
    ([5, 40], [62, 63], 4, 2, 64, 16, BF16, None),                       # prefixes at BLOCK_N edges
    ([9, 3], [30, 31], 4, 1, 64, 16, FP32, None),
]


@pytest.mark.parametrize("device,case", backends(PREFILL_GPU, PREFILL_INTERP))
def test_paged_prefill_attention(device, case):
    query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window = case
    context_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=sum(query_lens))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(sum(query_lens), num_heads + 3, head_dim, generator=gen).to(device, dtype)[:, 3:]  # view
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc(query_lens, device), kv.context_lens,
            head_dim ** -0.5, window)
    out = K.paged_prefill_attention(*args)
    check(out, ref.paged_prefill_attention_ref(*args), dtype)


# --- rms_norm ---------------------------------------------------------------------------------

RMS_GPU = [(t, n, dt, res) for t, n in ((1, 64), (7, 4096), (129, 5120), (8192, 4096))
           for dt in (BF16, FP32, torch.float16) for res in (False, True)]
RMS_INTERP = [(1, 64, BF16, False), (7, 1000, FP32, True), (5, 4096, BF16, True), (3, 96, torch.float16, False)]


@pytest.mark.parametrize("device,case", backends(RMS_GPU, RMS_INTERP))
def test_rms_norm(device, case):
    num_tokens, hidden_size, dtype, with_residual = case
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden_size, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=gen)).to(device, dtype)
    residual = torch.randn(num_tokens, hidden_size, generator=gen).to(device, dtype) if with_residual else None
    out = K.rms_norm(x, weight, 1e-6, residual)
    expected = ref.rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        check(out[1], expected[1], dtype)
        out, expected = out[0], expected[0]
    check(out, expected, dtype)


# --- rotary -----------------------------------------------------------------------------------

ROTARY_GPU = [(t, h, kvh, d, dt) for t in (1, 7, 129, 8192) for h, kvh in ((32, 8), (8, 8), (32, 2))
              for d in (64, 128) for dt in (BF16, FP32)]
ROTARY_INTERP = [(1, 4, 4, 64, BF16), (7, 8, 2, 128, FP32), (33, 6, 2, 64, BF16)]


def rope_cache(max_position: int, head_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


@pytest.mark.parametrize("device,case", backends(ROTARY_GPU, ROTARY_INTERP))
def test_apply_rotary(device, case):
    num_tokens, num_heads, num_kv_heads, head_dim, dtype = case
    gen = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(device, dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)          # strided views
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    cos_sin = rope_cache(4096, head_dim, device)
    q_expected, k_expected = ref.apply_rotary_ref(q, k, positions, cos_sin)
    K.apply_rotary(q, k, positions, cos_sin)
    check(q, q_expected, dtype)
    check(k, k_expected, dtype)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before), "v was modified"


ROTARY_STORE_GPU = [(t, h, kvh, d, dt) for t in (1, 7, 129, 4096) for h, kvh in ((32, 8), (16, 2))
                    for d in (64, 128) for dt in (BF16, FP32)]
ROTARY_STORE_INTERP = [(1, 4, 4, 64, BF16), (9, 8, 2, 128, FP32)]


@pytest.mark.parametrize("device,case", backends(ROTARY_STORE_GPU, ROTARY_STORE_INTERP))
def test_rotary_store_kv(device, case):
    num_tokens, num_heads, num_kv_heads, head_dim, dtype = case
    block_size, num_blocks = 16, -(-num_tokens // 16) + 3
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(device, dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)          # strided views
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    k_before = k.clone()
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::4] = -1                                             # padded batch entries
    slot_mapping = slots.to(device, torch.int32)
    cos_sin = rope_cache(4096, head_dim, device)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    expected = kv.clone()
    q_expected = ref.rotary_store_kv_ref(q, k, v, positions, cos_sin, expected[0], expected[1], slot_mapping)
    K.rotary_store_kv(q, k, v, positions, cos_sin, kv[0], kv[1], slot_mapping)
    check(q, q_expected, dtype)
    check(kv, expected, dtype)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat, flat_before = kv.view(2, -1, num_kv_heads, head_dim), expected.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[:, untouched.to(device)], flat_before[:, untouched.to(device)]), "a slot not mapped changed"
    assert torch.equal(k, k_before), "k was modified"


# --- gemv -------------------------------------------------------------------------------------

GEMV_GPU = [(n, k, dt, b) for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (1000, 777),
                                       (17, 4096)) for dt in (BF16, torch.float16) for b in (False, True)]
GEMV_INTERP = [(40, 1100, BF16, True), (17, 512, torch.float16, False)]


@pytest.mark.parametrize("device,case", backends(GEMV_GPU, GEMV_INTERP))
def test_gemv(device, case):
    num_out, k, dtype, with_bias = case
    gen = torch.Generator().manual_seed(num_out + k)
    rows = torch.randn(3, k, generator=gen).to(device, dtype)
    x = rows[1:2]                                                # a row view of a larger tensor
    weight = (torch.randn(num_out, k, generator=gen) / k ** 0.5).to(device, dtype)
    bias = torch.randn(num_out, generator=gen).to(device, dtype) if with_bias else None
    out = K.gemv(x, weight, bias)
    assert out.shape == (1, num_out) and out.dtype == dtype
    check(out, ref.gemv_ref(x, weight, bias), dtype)


GEMV_ROWS_GPU = [(m, n, k, dt, b) for m in (2, 3, 9, 16) for n, k in ((960, 576), (576, 1536), (6144, 4096), (17, 4096))
                 for dt in (BF16, torch.float16) for b in (False, True)]
GEMV_ROWS_INTERP = [(3, 40, 300, BF16, True), (16, 17, 129, torch.float16, False), (1, 33, 64, BF16, False)]


@pytest.mark.parametrize("device,case", backends(GEMV_ROWS_GPU, GEMV_ROWS_INTERP))
def test_gemv_rows(device, case):
    """Rows of a strided view (a verify step's hidden rows), every row against the fp32 reference;
    K and N not multiples of the tiles."""
    rows, num_out, k, dtype, with_bias = case
    gen = torch.Generator().manual_seed(rows * 1000 + num_out + k)
    x = torch.randn(rows, 2 * k, generator=gen).to(device, dtype)[:, :k]  # row stride 2K
    weight = (torch.randn(num_out, k, generator=gen) / k ** 0.5).to(device, dtype)
    bias = torch.randn(num_out, generator=gen).to(device, dtype) if with_bias else None
    out = K.gemv_rows(x, weight, bias)
    assert out.shape == (rows, num_out) and out.dtype == dtype
    for i in range(rows):
        check(out[i:i + 1], ref.gemv_ref(x[i:i + 1], weight, bias), dtype)


# --- silu_and_mul -----------------------------------------------------------------------------

SILU_GPU = [(t, i, dt) for t in (1, 7, 129, 8192) for i in (64, 1000, 14336) for dt in (BF16, FP32)]
SILU_INTERP = [(1, 64, BF16), (7, 1000, FP32), (33, 3000, BF16)]


@pytest.mark.parametrize("device,case", backends(SILU_GPU, SILU_INTERP))
def test_silu_and_mul(device, case):
    num_tokens, intermediate_size, dtype = case
    x = torch.randn(num_tokens, 2 * intermediate_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    check(K.silu_and_mul(x), ref.silu_and_mul_ref(x), dtype)


# --- copy_blocks ------------------------------------------------------------------------------

# (rows, blocks in src, block elements, dtype, direction): "gather" ids on the source, "scatter"
# ids on the destination, "both" on both
COPY_GPU = [(r, 300, e, dt, d) for r in (2, 64) for e in (256, 16384, 5000) for dt in (BF16, FP32)
            for d in ("gather", "scatter", "both")]
COPY_INTERP = [(2, 20, 64, BF16, "gather"), (6, 20, 5000, FP32, "scatter"), (4, 9, 100, BF16, "both")]


@pytest.mark.parametrize("device,case", backends(COPY_GPU, COPY_INTERP))
def test_copy_blocks(device, case):
    rows, num_blocks, elems, dtype, direction = case
    gen = torch.Generator().manual_seed(rows * num_blocks + elems)
    num = num_blocks // 2
    src = torch.randn(rows, num_blocks if direction != "scatter" else num, elems, generator=gen).to(device, dtype)
    dst_blocks = num_blocks if direction != "gather" else num
    dst = torch.randn(rows, dst_blocks, elems, generator=gen).to(device, dtype)
    src_ids = torch.randperm(num_blocks, generator=gen)[:num].to(device) if direction != "scatter" else None
    dst_ids = torch.randperm(num_blocks, generator=gen)[:num].int().to(device) if direction != "gather" else None
    expected = dst.clone()
    ref.copy_blocks_ref(src, expected, src_ids, dst_ids)
    K.copy_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(dst, expected)  # a copy: exact, untouched blocks kept


# --- row_argmax -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,case", backends(
    [(1, 49152, "bf16"), (9, 49152, "bf16"), (16, 128256, "bf16"), (3, 32000, "fp32"), (2, 151936, "fp16")],
    [(1, 4100, "bf16"), (3, 2049, "fp32"), (2, 5000, "fp16")]))
def test_row_argmax(device, case):
    """The first maximal column of each row, as torch.argmax: ties placed in two chunks (the left
    one wins) and at a chunk's first and last columns; bf16 logits tie often by themselves."""
    from pdserve.kernels.argmax import BLOCK, row_argmax
    rows, vocab, dtype = case
    dtype = {"bf16": BF16, "fp32": FP32, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn((rows, vocab), generator=gen).to(dtype)
    top = x.float().max() + 1
    x[0, [BLOCK - 1, BLOCK, vocab - 1]] = top.to(dtype)  # three equal maxima: the first one wins
    if rows > 1:
        x[1, [vocab - 1]] = top.to(dtype)  # the last column alone
    x = x.to(device)
    got = row_argmax(x)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), x.float().cpu().argmax(dim=-1))
    assert got[0].item() == BLOCK - 1

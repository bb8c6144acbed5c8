"""Benchmark every kernel against its torch reference, or check them, on a CUDA GPU.

    python -m pdserve.kernels.bench            # table: time, GB/s or TFLOP/s, speedup over reference
    python -m pdserve.kernels.bench --check    # PASS/FAIL per case against reference.py; exit 1 on FAIL
    python -m pdserve.kernels.bench --only row_argmax   # the cases whose name holds the text

Shapes are Llama-3-8B's: 32 query heads, 8 kv heads, head_dim 128, block_size 16, hidden 4096,
intermediate 14336, vocab 128256, bf16. The references are the obviously-right ones (per-sequence
Python loops for attention), so their times are a floor, not a tuned baseline.
Both modes finish in well under three minutes on an H100.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from pdserve.kernels import reference as ref
from pdserve.kernels.testing import make_paged_kv, query_start_loc, rel_error, tolerance

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN, INTERMEDIATE, VOCAB = 32, 8, 128, 16, 4096, 14336, 128256
DEVICE = "cuda"


@dataclass
class Case:
    name: str
    kernel: Callable[[], object]      # runs the kernel, returns its result (or None if in place)
    reference: Callable[[], object]   # same for the reference
    check: Callable[[], str | None]   # None if the kernel matches the reference, else why not
    bytes: int = 0                    # memory the kernel must move at least (for GB/s)
    flops: int = 0                    # useful floating-point operations (for TFLOP/s)


def _close(out: torch.Tensor, expected: torch.Tensor) -> str | None:
    if out.isnan().any():
        return "NaN in output"
    err = rel_error(out, expected)
    return None if err <= tolerance(out.dtype) else f"relative error {err:.2e}"


def decode_case(context_lens: list[int], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                block_size=BLOCK_SIZE, dtype=torch.bfloat16, window=None, force_dot: bool | None = None) -> Case:
    from pdserve.kernels import decode_attention

    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, DEVICE, poison=False)
    q = torch.randn(len(context_lens), num_heads, head_dim, device=DEVICE, dtype=dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim ** -0.5, window)
    num_splits = decode_attention.choose_num_splits(len(context_lens), num_kv_heads, max(context_lens), q.device)

    def kernel():
        if force_dot is None:
            return decode_attention.paged_decode_attention(*args, num_splits=num_splits)
        return decode_attention._launch(*args[:6], window, num_splits, force_dot, torch.empty_like(q))

    path = "" if force_dot is None else (" dot" if force_dot else " bcast")
    name = (f"decode B={len(context_lens)} ctx={max(context_lens)} H={num_heads}/{num_kv_heads} D={head_dim} "
            f"bs={block_size} {str(dtype)[6:]} splits={num_splits}{path}" + (f" win={window}" if window else ""))
    num_keys = sum(min(n, window or n) for n in context_lens)
    kv_bytes = 2 * num_keys * num_kv_heads * head_dim * q.element_size()
    return Case(name, kernel, lambda: ref.paged_decode_attention_ref(*args),
                lambda: _close(kernel(), ref.paged_decode_attention_ref(*args)),
                bytes=kv_bytes + 2 * q.numel() * q.element_size(),
                flops=4 * num_keys * num_heads * head_dim)


def prefill_case(query_lens: list[int], prefix_lens: list[int], num_heads=HEADS, num_kv_heads=KV_HEADS,
                 head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=torch.bfloat16, window=None) -> Case:
    from pdserve.kernels import paged_prefill_attention

    context_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, DEVICE, poison=False)
    q = torch.randn(sum(query_lens), num_heads, head_dim, device=DEVICE, dtype=dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc(query_lens, DEVICE), kv.context_lens,
            head_dim ** -0.5, window)
    pairs = 0  # visible (query, key) pairs
    for n_q, n_ctx in zip(query_lens, context_lens):
        for i in range(n_q):
            position = n_ctx - n_q + i
            pairs += min(position + 1, window or position + 1)
    name = (f"prefill {len(query_lens)}x{max(query_lens)} prefix={max(prefix_lens)} H={num_heads}/{num_kv_heads} "
            f"D={head_dim} bs={block_size} {str(dtype)[6:]}" + (f" win={window}" if window else ""))
    return Case(name, lambda: paged_prefill_attention(*args), lambda: ref.paged_prefill_attention_ref(*args),
                lambda: _close(paged_prefill_attention(*args), ref.paged_prefill_attention_ref(*args)),
                flops=4 * pairs * num_heads * head_dim)


def rms_norm_case(num_tokens: int, hidden: int = HIDDEN, residual: bool = True, dtype=torch.bfloat16) -> Case:
    from pdserve.kernels import rms_norm

    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    weight = torch.randn(hidden, device=DEVICE, dtype=dtype)
    res = torch.randn_like(x) if residual else None

    def check():
        out, expected = rms_norm(x, weight, 1e-5, res), ref.rms_norm_ref(x, weight, 1e-5, res)
        if residual:
            return _close(out[0], expected[0]) or _close(out[1], expected[1])
        return _close(out, expected)

    return Case(f"rms_norm {num_tokens}x{hidden}{' +residual' if residual else ''} {str(dtype)[6:]}",
                lambda: rms_norm(x, weight, 1e-5, res), lambda: ref.rms_norm_ref(x, weight, 1e-5, res), check,
                bytes=x.numel() * x.element_size() * (4 if residual else 2))


def rotary_case(num_tokens: int, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                dtype=torch.bfloat16) -> Case:
    from pdserve.kernels import apply_rotary

    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
    angles = torch.arange(8192, device=DEVICE).float()[:, None] * inv_freq
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)

    def check():
        q2, k2 = q.clone(), k.clone()
        expected_q, expected_k = ref.apply_rotary_ref(q2, k2, positions, cos_sin)
        apply_rotary(q2, k2, positions, cos_sin)
        return _close(q2, expected_q) or _close(k2, expected_k)

    return Case(f"rotary T={num_tokens} H={num_heads}/{num_kv_heads} D={head_dim} {str(dtype)[6:]}",
                lambda: apply_rotary(q, k, positions, cos_sin), lambda: ref.apply_rotary_ref(q, k, positions, cos_sin),
                check, bytes=2 * (q.numel() + k.numel()) * q.element_size())


def silu_case(num_tokens: int, intermediate: int = INTERMEDIATE, dtype=torch.bfloat16) -> Case:
    from pdserve.kernels import silu_and_mul

    x = torch.randn(num_tokens, 2 * intermediate, device=DEVICE, dtype=dtype)
    return Case(f"silu_and_mul {num_tokens}x{intermediate} {str(dtype)[6:]}", lambda: silu_and_mul(x),
                lambda: ref.silu_and_mul_ref(x), lambda: _close(silu_and_mul(x), ref.silu_and_mul_ref(x)),
                bytes=3 * num_tokens * intermediate * x.element_size())


def argmax_case(rows: int, vocab: int = VOCAB, dtype=torch.bfloat16) -> Case:
    from pdserve.kernels.argmax import row_argmax

    x = torch.randn(rows, vocab, device=DEVICE, dtype=dtype)
    return Case(f"row_argmax {rows}x{vocab} {str(dtype)[6:]} (ref: torch.argmax)", lambda: row_argmax(x),
                lambda: x.argmax(dim=-1),
                lambda: None if torch.equal(row_argmax(x), x.argmax(dim=-1)) else "columns differ",
                bytes=x.numel() * x.element_size())


def store_kv_case(num_tokens: int, dtype=torch.bfloat16) -> Case:
    from pdserve.kernels import store_kv

    num_blocks = num_tokens // BLOCK_SIZE + 64
    kv = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    k, v = torch.randn(2, num_tokens, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype).unbind(0)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens]

    def check():
        got, expected = kv.clone(), kv.clone()
        store_kv(k, v, got[0], got[1], slots)
        ref.store_kv_ref(k, v, expected[0], expected[1], slots)
        return None if torch.equal(got, expected) else "cache differs"

    return Case(f"store_kv T={num_tokens} KVH={KV_HEADS} D={HEAD_DIM} {str(dtype)[6:]}",
                lambda: store_kv(k, v, kv[0], kv[1], slots), lambda: ref.store_kv_ref(k, v, kv[0], kv[1], slots),
                check, bytes=4 * k.numel() * k.element_size())


def bench_cases() -> list[Callable[[], Case]]:
    return [
        *(lambda b=b, n=n: decode_case([n] * b) for n in (512, 2048) for b in (1, 64, 256)),
        lambda: decode_case([2048] * 64, force_dot=True),
        lambda: decode_case([2048] * 64, force_dot=False),
        lambda: prefill_case([512] * 8, [0] * 8),
        lambda: prefill_case([512] * 8, [1536] * 8),
        lambda: store_kv_case(8192),
        lambda: rms_norm_case(8192, residual=False),
        lambda: rms_norm_case(8192, residual=True),
        lambda: rotary_case(8192),
        lambda: silu_case(8192),
        *(lambda r=r, v=v: argmax_case(r, v) for v in (49152, VOCAB) for r in (1, 9, 64)),
    ]


def check_cases() -> list[Callable[[], Case]]:
    f32 = torch.float32
    return [
        lambda: decode_case([1, 7, 33, 129, 16, 32]),
        lambda: decode_case([1025, 3, 2048, 17, 513, 4096, 1, 64]),
        lambda: decode_case([3000, 77], num_heads=32, num_kv_heads=2),                  # tl.dot path
        lambda: decode_case([2048, 333], num_heads=8, num_kv_heads=8, head_dim=64, dtype=f32),
        lambda: decode_case([2000, 100, 5], num_kv_heads=4, block_size=32, window=256),
        lambda: prefill_case([1, 7, 33, 129], [0, 0, 16, 0]),
        lambda: prefill_case([200, 1, 513, 77], [300, 1000, 0, 1], num_kv_heads=4, block_size=32),
        lambda: prefill_case([300, 45], [100, 0], num_kv_heads=2, head_dim=64, dtype=f32),
        lambda: prefill_case([600, 33], [500, 2000], window=256),
        lambda: store_kv_case(33),
        lambda: rms_norm_case(7, 5120, residual=True),
        lambda: rms_norm_case(129, 4096, residual=False, dtype=f32),
        lambda: rotary_case(129, 32, 2, 64),
        lambda: silu_case(33, 1000),
        *bench_cases(),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare against reference.py, PASS/FAIL per case")
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the cases whose name contains TEXT")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    torch.manual_seed(0)
    failures = 0
    if not args.check:
        print(f"{'case':<72} {'kernel ms':>10} {'ref ms':>9} {'GB/s':>7} {'TFLOP/s':>8} {'speedup':>8}")
    for make_case in check_cases() if args.check else bench_cases():
        case = make_case()
        if args.only is not None and args.only not in case.name:
            continue
        if args.check:
            problem = case.check()
            failures += problem is not None
            print(f"{'PASS' if problem is None else 'FAIL'}  {case.name}" + (f": {problem}" if problem else ""))
        else:
            kernel_ms = do_bench(case.kernel, warmup=25, rep=100)
            ref_ms = do_bench(case.reference, warmup=5, rep=30)
            gbps = f"{case.bytes / kernel_ms / 1e6:7.0f}" if case.bytes else f"{'':>7}"
            tflops = f"{case.flops / kernel_ms / 1e9:8.1f}" if case.flops else f"{'':>8}"
            print(f"{case.name:<72} {kernel_ms:10.4f} {ref_ms:9.3f} {gbps} {tflops} {ref_ms / kernel_ms:7.1f}x")
        del case
        torch.cuda.empty_cache()
    if args.check:
        print(f"{failures} FAILED" if failures else "all PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

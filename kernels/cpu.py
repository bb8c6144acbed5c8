"""CPU kernels in C++ (cpu_ops.cpp), compiled for this machine on first use and cached.

    paged_decode_attention  one query per sequence, K/V read in place through the block table:
                            no gather, no [B, H, L] score tensor in memory; one work item per
                            (sequence, KV head), so each K/V row is read once for its G query heads;
                            in bf16 with AVX512-BF16 the scores are vdpbf16ps on the rows as stored,
                            V rows are converted in registers (cpu_decode_tiles.h); its loads are
                            memory-stalled, so K blocks are prefetched into L2 ahead of the K pass
                            and, during the V pass, the next work item's (1.5x less time at batch 64)
    prefill_attention       one prompt chunk against its keys (its own, or a cached prefix gathered
                            by the caller), causal: per (KV head, 16 query rows) the 16 * G query
                            vectors share each K/V row's conversion, 16 keys a time transposed into
                            vector lanes (cpu_prefill_attention.h); 0.5x torch's flash SDPA's time
                            at 200-512 tokens, 0.9x at 2048 (one core, bf16). bf16 with AVX512-BF16
                            and D 32/64/128: Q K^T and P V by vdpbf16ps on the stored values, K and V
                            packed in pairs per work item (cpu_prefill_bf16.h): another 1.7-1.9x;
                            with AMX (amx_bf16) the same packed operands go through tile products
                            (0.42x the vdpbf16ps kernel's time at 200 tokens, 0.38x at 1024; `set_amx`
                            switches it for tests and A/B). A prompt's rows get the same bits whether
                            the whole prompt runs or only its last rows after a cached prefix
    rms_norm                HF RMSNorm in one pass, the residual add fused (residual updated in place)
    silu_and_mul            gated MLP activation in one pass
    rotary_store_kv         q and k rotated in place and K/V stored at their slots, one pass
    gemv_bf16               x [1-4 rows, K] times a row-major bf16 W [N, K]: W read once, vdpbf16ps into
                            fp32, one rounding to bf16 (oneDNN's one-row kernel read SmolLM2's
                            weights at 12-21 GB/s on the AMX Xeon, this at 20-38); on an AVX2-only
                            CPU the bf16 values widened to fp32 lanes by a mask or a shift, FMA

Their semantics are the torch code they replace (common/models/cpu_ops.py's eager path and
`TorchOps`): element-wise kernels round where HF's bf16 code rounds, so in bf16 they reproduce it
bit for bit; the decode attention accumulates in fp32 like kernels/reference.py's; the prefill
attention rounds where torch's flash SDPA (the torch path's and HF's prompt attention) rounds: its
softmax weights are stored in bf16 before P V. The tests compare each kernel with that torch code
(tests/kernels/test_cpu_kernels.py).

Build: torch.utils.cpp_extension (g++ and ninja) with -march=native (PDSERVE_CPU_MARCH=haswell, say,
builds for an older CPU: the AVX2 kernels on an AVX-512 machine, which the tests use), once per
source, flags and CPU (the name carries a hash of them, the source being cpu_ops.cpp and the headers
it includes; torch caches the build under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), ~20-50 s the
first time, a dlopen after. Threads come from torch's own OpenMP pool (at::parallel_for, compiled
with -fopenmp against the libgomp torch has loaded). `load()` returns False, with the reason in
`load_error()`, when the build is impossible (no compiler): the caller logs it and runs the torch
path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "cpu_ops.cpp")
# #included by _SOURCE: part of the build's hash
_INCLUDED = [os.path.join(_HERE, name) for name in ("cpu_prefill_attention.h", "cpu_prefill_bf16.h", "cpu_decode_tiles.h")]
# -fopenmp: at::parallel_for's OpenMP body is in ATen's headers, so without it every kernel runs on
# one thread; the libgomp.so.1 this links is the one torch has loaded (same soname): one thread pool
_FLAGS = ["-O3", f"-march={os.environ.get('PDSERVE_CPU_MARCH') or 'native'}", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_state: dict[str, object] = {}


def load() -> bool:
    """Build (first time on this machine) and load the kernels; False if that is impossible."""
    if "ok" not in _state:
        try:
            _build()
            _state["ok"] = True
        except Exception as e:  # no compiler, no ninja, a build error: the torch path runs instead
            _state["ok"], _state["error"] = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    return bool(_state["ok"])


def load_error() -> str | None:
    return _state.get("error")


def _build() -> None:
    from torch.utils import cpp_extension
    source = b""
    for path in [_SOURCE, *_INCLUDED]:
        with open(path, "rb") as f:
            source += f.read()
    # the source's path too: torch rebuilds a folder whose build file names other source paths, so
    # two checkouts of the same source would take turns rebuilding one folder
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_identity().encode() + _SOURCE.encode()).hexdigest()[:12]
    name = f"pdserve_cpu_{key}"
    folder = cpp_extension._get_build_directory(name, verbose=False)
    built = os.path.join(folder, f"{name}.so")
    if not os.path.exists(built):  # say why this start takes longer (once per CPU and source)
        print(f"pdserve: compiling the CPU kernels for this CPU (first start only, ~20-50 s) into "
              f"{folder}", file=sys.stderr, flush=True)
    with _build_lock(folder):
        cpp_extension.load(name=name, sources=[_SOURCE], extra_cflags=_FLAGS, extra_ldflags=_LDFLAGS,
                           is_python_module=False, verbose=False)


@contextlib.contextmanager
def _build_lock(folder: str):
    """One builder per build folder, by an flock the kernel releases when its holder dies. torch's
    own lock is a file that a process killed mid-build leaves behind, and every later start then
    waited for it forever, saying nothing (a killed test run did that to the next ones); holding
    the flock, no builder of ours is running, so such a file is stale and goes."""
    import fcntl
    with open(os.path.join(folder, "pdserve.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cached build from another CPU
    could use instructions this one lacks)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    # q [B, H, D] (d contiguous), caches [NB, BS, KVH, D], block_table [B, M] long, context_lens [B] long -> [B, H, D]
    assert q.dim() == 3 and q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape == v_cache.shape and q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[2] == 0
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert block_table.dtype == context_lens.dtype == torch.int64 and block_table.is_contiguous()
    assert block_table.shape[0] == context_lens.shape[0] == q.shape[0]
    return torch.ops.pdserve_cpu.paged_decode_attention(q, k_cache, v_cache, block_table, context_lens, scale,
                                                        sliding_window or 0)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      sliding_window: int | None = None) -> torch.Tensor:
    """q [Lq, H, D] against k/v [Lk, KVH, D] (token rows may be strided; heads D apart), query row i at
    position Lk - Lq + i; causal (and the window) -> [Lq, H, D]."""
    for x in (q, k, v):
        assert x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.dtype == q.dtype
    assert k.shape == v.shape and q.shape[2] == k.shape[2] and q.shape[1] % k.shape[1] == 0
    assert k.shape[0] >= q.shape[0] > 0
    return torch.ops.pdserve_cpu.prefill_attention(q, k, v, scale, sliding_window or 0)


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M <= 4, K] bf16 (rows may be strided) times w [N, K] bf16 row-major (nn.Linear's layout;
    K a multiple of 32) plus bias -> [M, N]: W read once for the M rows, fp32 sums rounded to bf16
    once (cpu_ops.cpp; where oneDNN's small-row kernels read slower, common/models/cpu_ops.py)."""
    return torch.ops.pdserve_cpu.gemv_bf16(x, w, bias)


def gemv_bf16_available() -> bool:
    """The GEMV is built (AVX512-BF16 or AVX2 on this CPU)."""
    if "gemv" not in _state:
        try:
            gemv_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 32, dtype=torch.bfloat16))
            _state["gemv"] = True
        except RuntimeError:
            _state["gemv"] = False
    return bool(_state["gemv"])


def set_amx(allowed: bool) -> bool:
    """Allow (the default) or forbid the bf16 prompt attention's AMX tiles; returns whether it now
    uses them (built for a CPU with amx_bf16 and granted the tile state by Linux, and allowed)."""
    return bool(torch.ops.pdserve_cpu.set_amx(allowed))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, N] -> out; with residual [T, N]: (out, residual), residual += x in place first."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],) and weight.dtype == x.dtype
    if residual is None:
        return torch.ops.pdserve_cpu.rms_norm(x, weight.contiguous(), None, eps)
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
    return torch.ops.pdserve_cpu.rms_norm(x, weight.contiguous(), residual, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[1] % 2 == 0
    return torch.ops.pdserve_cpu.silu_and_mul(x.contiguous())


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """In place: q [T, H, D] and k [T, KVH, D] rotated; k and v [T, KVH, D] stored at slot_mapping [T]
    (< 0: not stored) of the caches [NB, BS, KVH, D]. Token rows may be strided; heads are D apart."""
    for x in (q, k, v):
        assert x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.dtype == k_cache.dtype
    assert k.shape == v.shape and k.shape[1:] == k_cache.shape[2:] and q.shape[2] == k.shape[2]
    assert cos_sin.dtype == torch.float32 and cos_sin.stride(1) == 1 and cos_sin.shape[1] == q.shape[2]
    assert positions.dtype == slot_mapping.dtype == torch.int64
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    torch.ops.pdserve_cpu.rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)

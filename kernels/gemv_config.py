"""Launch configurations of the small-batch quantized GEMVs (gemv_int.py, gemv_fp8.py), from a table.

A decode step multiplies M = 1..16 rows (the CUDA-graph buckets 1 2 4 8 16) by each weight; the
kernels read every weight byte once and are bound by memory, so the configuration that matters is
how many programs share the weight and how large a tile each loads. `choose` answers, in order:

    TUNED[(kind, K, N, bucket)]      measured on a GPU by `python -m pdserve.services.bench_gemv`
                                     (pasted below, or loaded from its JSON with `load_tuned`, or
                                     named by $PDSERVE_GEMV_TABLE: added at the first choice)
    heuristic(kind, bucket, K, N)    fallback: ~4 programs per SM through split-K

    kind    "int4" | "int8" (grouped-int codes, gemv_int.py) | "fp8" (e4m3, gemv_fp8.py)
    bucket  1 (M = 1), 4 (M = 2..4), 16 (M = 5..16)

then `fit` adapts the entry to the call (BLOCK_K dividing K and aligned to the group, split-K no
larger than the number of K tiles). A configuration:

    dot=False   FMA path (M <= 4): one accumulator per row in registers, products accumulated
                elementwise in the weight tile's layout, reduced once at the end
    dot=True    tensor cores: x^T padded to 16 columns, acc[BLOCK_N, 16] += W_tile @ x_tile^T
    split_k     programs along K; > 1 adds partial sums into an fp32 workspace, the last program
                of a column block writes the output (split_k.py)
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, replace

KINDS = ("int4", "int8", "fp8")
BUCKETS = (1, 4, 16)
GEMV_MAX_M = 16  # larger M: dequantize + cuBLAS (int), torch._scaled_mm (fp8)


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # outputs per program
    block_k: int  # inputs per loop iteration (int: a multiple of the values per word)
    split_k: int = 1  # programs along K
    dot: bool = False  # tensor-core path (BLOCK_M = 16) instead of the FMA path
    num_warps: int = 4
    num_stages: int = 3
    version: int = 1  # 2: the FMA kernels of gemv_int_v2.py (BLOCK_K within a group) / gemv_fp8_v2.py, M <= 4;
    #                   3: int4 on Hopper's tensor cores (gemv_int_v3.py: bf16 / fp16 x, M <= 16, BLOCK_K within a group)
    slices: int = 1  # int version 2: slices of BLOCK_K inputs along K per program, reduced across warps

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps", "slices"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {getattr(self, name)}")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"GemvConfig split_k and num_stages must be >= 1, got {self.split_k}, {self.num_stages}")
        if self.dot and self.block_n < 16:
            raise ValueError(f"GemvConfig.block_n must be >= 16 with dot=True, got {self.block_n}")
        if self.version not in (1, 2, 3) or (self.version > 1 and self.dot):
            raise ValueError(f"GemvConfig.version must be 1, or 2 / 3 without dot, got {self.version} (dot={self.dot})")
        if self.version == 3 and (self.num_warps % 4 or self.block_n < 16 * self.num_warps):
            raise ValueError(f"GemvConfig version 3: BLOCK_N = 16 * num_warps * 2^i, num_warps a multiple of 4; "
                             f"got {self.block_n}, {self.num_warps}")
        if self.slices > 1 and self.version != 2:
            raise ValueError(f"GemvConfig.slices > 1 needs version 2, got {self.slices} with version {self.version}")

    def short(self) -> str:
        path = f"v{self.version}" if self.version > 1 else "dot" if self.dot else "fma"
        if self.slices > 1:
            path += f" x{self.slices}"
        return f"{path} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}"


def bucket_of(m: int) -> int:
    if not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"the GEMVs take 1..{GEMV_MAX_M} rows, got M = {m}")
    return next(b for b in BUCKETS if m <= b)


FMA_MAX_M = 4  # the FMA path keeps one accumulator per row


def block_m(config: GemvConfig, m: int) -> int:
    """Rows one program holds: 16 for tl.dot (its minimum), else M rounded up to a power of two."""
    if config.version == 3:  # its own choice (8 or 16), made by gemv_int_v3.int_gemv_v3
        return 16
    if not config.dot and m > FMA_MAX_M:
        raise ValueError(f"the FMA path takes up to {FMA_MAX_M} rows, got M = {m}: use dot=True")
    return 16 if config.dot else 1 << (m - 1).bit_length()


# Measured entries, (kind, K, N, bucket) -> GemvConfig. Empty until the sweep has run on the target
# GPU: paste the lines `bench_gemv` prints under "TUNED entries" (at run time: tune / load_tuned).
# Measured on an H200 (132 SMs), commit 29e04386 (version-2 kernels): `bash tests/gpu_quant_check.sh`
# (docs/benchmarks.md, fourth 2 x H200 session); the int4 entries again with slices (fourteenth session)
# and with split-K from s/4 to 4s (nineteenth: `bench_gemv --kinds int4 --wide-splits`).
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {
    ('fp8', 4096, 4096, 1): GemvConfig(8, 2048, split_k=1, dot=False, num_warps=8, num_stages=3, version=2),
    ('fp8', 4096, 4096, 4): GemvConfig(8, 1024, split_k=1, dot=False, num_warps=4, num_stages=3, version=2),
    ('fp8', 4096, 4096, 16): GemvConfig(64, 128, split_k=4, dot=True, num_warps=4, num_stages=3),
    ('fp8', 4096, 6144, 1): GemvConfig(8, 1024, split_k=1, dot=False, num_warps=4, num_stages=3, version=2),
    ('fp8', 4096, 6144, 4): GemvConfig(8, 512, split_k=1, dot=False, num_warps=2, num_stages=3, version=2),
    ('fp8', 4096, 6144, 16): GemvConfig(64, 128, split_k=12, dot=True, num_warps=4, num_stages=3),
    ('fp8', 4096, 28672, 1): GemvConfig(16, 512, split_k=1, dot=False, num_warps=2, num_stages=3, version=2),
    ('fp8', 4096, 28672, 4): GemvConfig(64, 128, split_k=4, dot=True, num_warps=4, num_stages=3),
    ('fp8', 4096, 28672, 16): GemvConfig(64, 128, split_k=4, dot=True, num_warps=4, num_stages=3),
    ('fp8', 14336, 4096, 1): GemvConfig(8, 2048, split_k=1, dot=False, num_warps=8, num_stages=3, version=2),
    ('fp8', 14336, 4096, 4): GemvConfig(8, 1024, split_k=1, dot=False, num_warps=4, num_stages=3, version=2),
    ('fp8', 14336, 4096, 16): GemvConfig(64, 128, split_k=18, dot=True, num_warps=4, num_stages=3),
    ('int4', 4096, 4096, 1): GemvConfig(64, 64, split_k=8, dot=False, num_warps=4, num_stages=3, version=2, slices=8),
    ('int4', 4096, 4096, 4): GemvConfig(128, 128, split_k=16, dot=True, num_warps=4, num_stages=3),
    ('int4', 4096, 4096, 16): GemvConfig(128, 128, split_k=16, dot=True, num_warps=4, num_stages=3),
    ('int4', 4096, 6144, 1): GemvConfig(256, 128, split_k=32, dot=False, num_warps=2, num_stages=3, version=2),
    ('int4', 4096, 6144, 4): GemvConfig(128, 128, split_k=11, dot=True, num_warps=4, num_stages=3),
    ('int4', 4096, 6144, 16): GemvConfig(128, 128, split_k=11, dot=True, num_warps=4, num_stages=3),
    ('int4', 4096, 28672, 1): GemvConfig(512, 128, split_k=32, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 4096, 28672, 4): GemvConfig(512, 64, split_k=40, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 4096, 28672, 16): GemvConfig(128, 128, split_k=12, dot=True, num_warps=4, num_stages=3),
    ('int4', 14336, 4096, 1): GemvConfig(64, 64, split_k=28, dot=False, num_warps=4, num_stages=3, version=2, slices=8),
    ('int4', 14336, 4096, 4): GemvConfig(512, 64, split_k=132, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 14336, 4096, 16): GemvConfig(128, 128, split_k=17, dot=True, num_warps=4, num_stages=3),
    # Llama-2-70B's int4 weights (nineteenth session: `bench_gemv --shapes llama2-70b --kinds int4`)
    ('int4', 8192, 8192, 1): GemvConfig(1024, 64, split_k=128, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 8192, 8192, 4): GemvConfig(512, 64, split_k=66, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 8192, 8192, 16): GemvConfig(128, 128, split_k=9, dot=True, num_warps=4, num_stages=3),
    ('int4', 8192, 10240, 1): GemvConfig(64, 64, split_k=8, dot=False, num_warps=4, num_stages=3, version=2, slices=8),
    ('int4', 8192, 10240, 4): GemvConfig(256, 64, split_k=7, dot=False, num_warps=8, num_stages=3, version=2, slices=4),
    ('int4', 8192, 10240, 16): GemvConfig(128, 128, split_k=7, dot=True, num_warps=4, num_stages=3),
    ('int4', 8192, 57344, 1): GemvConfig(1024, 64, split_k=20, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 8192, 57344, 4): GemvConfig(128, 64, split_k=4, dot=False, num_warps=4, num_stages=3, version=2, slices=4),
    ('int4', 8192, 57344, 16): GemvConfig(128, 128, split_k=2, dot=True, num_warps=4, num_stages=3),
    ('int4', 28672, 8192, 1): GemvConfig(1024, 64, split_k=66, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 28672, 8192, 4): GemvConfig(512, 64, split_k=66, dot=False, num_warps=4, num_stages=3, version=2),
    ('int4', 28672, 8192, 16): GemvConfig(128, 128, split_k=18, dot=True, num_warps=4, num_stages=3),
}


def heuristic(kind: str, bucket: int, k: int, n: int, num_sms: int) -> GemvConfig:
    """A guess without measurements (the sweep replaces it): the version-2 FMA kernels up to M = 4
    (what the H200 sweep picked for 8B shapes), tensor cores above (M FMAs per weight would cost
    more than the dot's conversion), split-K to ~4 programs per SM."""
    if kind == "fp8":  # version 2 won every M <= 4 shape of the H200 sweep but one
        config = GemvConfig(8, 1024, num_warps=4, version=2) if bucket <= 4 else \
            GemvConfig(64, 256, dot=True, num_warps=4)
    else:  # version 2: 64 inputs per chunk (within any group of >= 64); the dot path from M = 5
        config = GemvConfig(512, 64, num_warps=4, version=2) if bucket <= 4 else \
            GemvConfig(64, 128, dot=True, num_warps=4)
    return replace(config, split_k=split_for(config, k, n, num_sms))


def split_for(config: GemvConfig, k: int, n: int, num_sms: int, programs_per_sm: int = 4) -> int:
    """Split K so that the grid has about programs_per_sm programs per SM, each >= 2 tiles long
    (version 2: >= 1 chunk; its wide column blocks leave few programs along N)."""
    column_blocks = -(-n // config.block_n)
    tiles = max(k // (config.block_k * config.slices), 1)
    wanted = -(-programs_per_sm * num_sms // column_blocks)
    return max(1, min(wanted, tiles if config.version == 2 else tiles // 2))


def fit(config: GemvConfig, kind: str, k: int, group_size: int | None) -> GemvConfig:
    """The config adapted to this weight: BLOCK_K divides K and, for int codes, is a multiple or a
    divisor of the group and holds >= 16 words on the dot path (else the FMA path); split_k no
    more than the K tiles."""
    block_k = config.block_k
    dot = config.dot
    if kind == "fp8":
        block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))  # masked along K: any K works
    else:
        per_word = 32 // int(kind[3:])
        group = group_size or k

        def misfit(bk: int) -> bool:  # v2: a chunk lies within one group
            return bool(k % bk or (group % bk and (config.version > 1 or bk % group)))
        while block_k > per_word and misfit(block_k):
            block_k //= 2
        if misfit(block_k):
            raise ValueError(f"no BLOCK_K fits K = {k} with groups of {group_size} ({kind})")
        if dot and block_k // per_word < 16:
            dot = False  # tl.dot needs 16 words along K
    slices = config.slices if kind != "fp8" else 1
    while slices > 1 and k % (slices * block_k):  # v2's chunk of slices x BLOCK_K inputs divides K (slices 1: fits)
        slices //= 2
    tiles = -(-k // (block_k * slices))
    return replace(config, block_k=block_k, dot=dot, slices=slices, split_k=max(1, min(config.split_k, tiles)))


@functools.cache
def num_sms(device_index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


TABLE_ENV = "PDSERVE_GEMV_TABLE"  # a JSON of measured entries (bench_gemv --table-out) added at the first choice
_env_table_loaded = False


def _load_env_table() -> None:
    global _env_table_loaded
    path = os.environ.get(TABLE_ENV)
    if path:
        try:
            load_tuned(path)
        except (OSError, ValueError, TypeError, KeyError) as e:  # (raised again at the next choice)
            raise ValueError(f"{TABLE_ENV}={path}: not a GEMV table ({e})") from e
    _env_table_loaded = True


def choose(kind: str, m: int, k: int, n: int, group_size: int | None, device) -> GemvConfig:
    """The configuration of one call (see the module docstring for the order); cached per shape,
    so a decode step outside CUDA graphs pays a dict lookup."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not _env_table_loaded:
        _load_env_table()
    return _choose(kind, bucket_of(m), k, n, group_size, device.type, device.index)


def untuned(kind: str, m: int, k: int, n: int, group_size: int | None, device) -> GemvConfig:
    """The heuristic's configuration fitted to this weight, whatever the table holds (for a call
    its table entry cannot serve: gemv_int, a version-3 entry with fp32 x or 8-bit codes)."""
    return _untuned(kind, bucket_of(m), k, n, group_size, device.type, device.index)


def _untuned(kind: str, bucket: int, k: int, n: int, group_size: int | None, device_type: str,
             device_index: int | None) -> GemvConfig:
    sms = num_sms(device_index or 0) if device_type == "cuda" else 8
    return fit(heuristic(kind, bucket, k, n, sms), kind, k, group_size)


@functools.lru_cache(maxsize=4096)
def _choose(kind: str, bucket: int, k: int, n: int, group_size: int | None, device_type: str,
            device_index: int | None) -> GemvConfig:
    config = TUNED.get((kind, k, n, bucket))
    if config is None:
        return _untuned(kind, bucket, k, n, group_size, device_type, device_index)
    return fit(config, kind, k, group_size)


def tune(entries: dict[tuple[str, int, int, int], GemvConfig], replace_all: bool = False) -> None:
    """Adds measured entries to TUNED (replace_all: instead of the current ones), at start-up."""
    for (kind, _, _, bucket), config in entries.items():
        if kind not in KINDS or bucket not in BUCKETS:
            raise ValueError(f"a GEMV table entry for kind {kind!r}, bucket {bucket}: expected {KINDS}, {BUCKETS}")
        block_m(config, bucket)  # the FMA path cannot serve bucket 16
        if config.version == 3 and kind != "int4":
            raise ValueError(f"a GEMV table entry for {kind!r} with version 3 (4-bit codes only)")
    if replace_all:
        TUNED.clear()
    TUNED.update(entries)
    _choose.cache_clear()


def candidates(kind: str, bucket: int) -> list[GemvConfig]:
    """The configurations the sweep times for one bucket (split_k filled per shape by the sweep).
    Few distinct (block sizes, warps, path) so that compiling them all stays within ~30 s; FMA
    tiles hold <= 64 fp32 accumulators per thread (BLOCK_M * BLOCK_N * BLOCK_K / threads for fp8)."""
    v2 = []
    if kind == "fp8":
        fma = {1: [(16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8), (16, 1024, 8)],
               4: [(16, 128, 4), (16, 256, 8), (32, 128, 8)], 16: []}[bucket]
        dots = [(64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 256, 8)]
        # version 2: BLOCK_K = 256 * warps puts x and the weight tile in one layout (8 inputs per
        # thread); BLOCK_N rows per thread
        v2 = {1: [(8, 1024, 4), (16, 1024, 4), (32, 1024, 4), (8, 2048, 8), (16, 512, 2), (4, 1024, 4)],
              4: [(4, 1024, 4), (8, 1024, 4), (8, 512, 2)], 16: []}[bucket]
    else:
        fma = {1: [(64, 128, 4), (128, 128, 4), (128, 256, 8), (256, 128, 8), (64, 256, 4)],
               4: [(64, 128, 4), (64, 256, 8), (128, 128, 8)], 16: []}[bucket]
        dots = [(64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 256, 8)]
        # version 2: a thread holds BLOCK_N / (32 * warps) columns (4: one 16-byte load per word
        # row, 8: two) for BLOCK_K / 8 unrolled word rows; <= 128 words per thread (no spills)
        # (BLOCK_K 64: twice the split-K programs, for the small weights' occupancy)
        v2 = {1: [(256, 128, 2), (512, 128, 4), (512, 256, 4), (512, 128, 2), (1024, 128, 4), (1024, 64, 4),
                  (256, 128, 1), (512, 64, 4), (256, 64, 2)],
              4: [(256, 128, 2), (512, 64, 4), (512, 128, 4), (256, 64, 1)], 16: []}[bucket]
        # ... with slices along K (n, k, warps, slices): a warp per slice of 128 columns, fewer
        # split-K programs (and workspace atomics) for the same parallelism
        v2 += [(n, k, w, sl) for n, k, w, sl in {1: [(128, 64, 8, 8), (128, 128, 4, 4), (128, 64, 4, 4),
                                                     (256, 64, 8, 4), (64, 64, 4, 8), (128, 32, 8, 8)],
                                                 4: [(128, 64, 4, 4), (128, 64, 8, 8), (256, 64, 8, 4)],
                                                 16: []}[bucket]]
    v2.sort(key=len, reverse=True)  # the sliced ones first (the sweep's time budget may cut the tail)
    return ([GemvConfig(c[0], c[1], num_warps=c[2], version=2, slices=c[3] if len(c) > 3 else 1) for c in v2]
            + [GemvConfig(n, k, num_warps=w) for n, k, w in fma]
            + [GemvConfig(n, k, dot=True, num_warps=w) for n, k, w in dots])


def tuned_to_json(entries: dict[tuple[str, int, int, int], GemvConfig]) -> str:
    return json.dumps([{"kind": kind, "k": k, "n": n, "bucket": b, **asdict(c)}
                       for (kind, k, n, b), c in sorted(entries.items())], indent=1)


def load_tuned(path: str) -> int:
    """Adds the entries of a JSON written by the sweep to TUNED; returns how many."""
    with open(path) as f:
        rows = json.load(f)
    entries = {}
    for row in rows:
        key = (row.pop("kind"), row.pop("k"), row.pop("n"), row.pop("bucket"))
        entries[key] = GemvConfig(**row)
    tune(entries)
    return len(entries)


def tuned_as_python(entries: dict[tuple[str, int, int, int], GemvConfig]) -> list[str]:
    """Lines to paste into TUNED above."""
    return [f"    {key!r}: GemvConfig({c.block_n}, {c.block_k}, split_k={c.split_k}, dot={c.dot}, "
            f"num_warps={c.num_warps}, num_stages={c.num_stages}{f', version={c.version}' if c.version > 1 else ''}"
            f"{f', slices={c.slices}' if c.slices > 1 else ''}),"
            for key, c in sorted(entries.items())]

"""Sweep of the small-batch quantized GEMVs' launch configurations on the GPU at hand (issue 13).

    python -m pdserve.services.bench_gemv [--budget-s 150] [--json-out FILE] [--table-out FILE] [--workers 8]
                                          [--shapes llama3-8b|llama2-70b|all|KxN,...] [--kinds int4,fp8]
                                          [--wide-splits]

For each Llama-3-8B weight (K x N: qkv 4096 x 6144, o 4096 x 4096, gate_up 4096 x 28672,
down 14336 x 4096) and M in 1, 4, 16 (the buckets of gemv_config), times in CUDA graphs:

    bf16       F.linear on a bf16 [N, K] weight (cuBLAS, what the unquantized model runs)
    int4       every gemv_config.candidates config (x a few split-K counts) of gemv_int.int_gemv,
               AWQ-like weights (G = 128, fp16 scales, integer zeros); "default" = the config the
               engine would use now (TUNED or the heuristic); "v1" / "v2" / "v2s" = the best of each
               kernel version (gemv_int.py's paths / gemv_int_v2.py, M <= 4 / the same with
               slices along K); M > 1 also the old
               dequantize + cuBLAS; a last line sums one layer's four GEMVs at M = 1
    fp8        the same for gemv_fp8.fp8_gemv (W8A16; v2 = gemv_fp8_v2.py); M > 1 also quantize +
               torch._scaled_mm (W8A8)

Each timed call reads another copy of the weights (>= 256 MB per rotation), so the L2 cache (50 MB)
never holds them: the figures are HBM-bound like a decode step. Every config's output is checked
against the fp32 reference first; a wrong one is dropped and counted. It prints, per shape and M,
the best config next to bf16 (us, ratio, GB/s of weight bytes), then the TUNED lines to paste into
kernels/gemv_config.py; --table-out writes them as JSON (gemv_config.load_tuned; bench_quant
--gemv-table). Compiling the ~55 kernel variants would dominate the time, so --workers processes
compile them first into Triton's on-disk cache; --budget-s (counted after that, shared equally by
the four shapes) stops trying new configs (and says how many were skipped). About 1 min of
compiling plus the budget on an H200.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # 8B (K, N): qkv, o, gate_up, down
MODEL_SHAPES = {"llama3-8b": SHAPES,
                "llama2-70b": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]}  # --shapes
ROWS = (1, 4, 16)
GROUP = 128
ROTATION_BYTES = 256 << 20
MAX_REL_ERR = 2e-2


@dataclass(frozen=True)
class Settings:
    """What the sweep runs on: the GPU, or (smoke) the CPU under the Triton interpreter with a
    small shape, two calls per timing and the first configs only (a test of this script)."""
    device: str = "cuda"
    shapes: tuple = tuple(SHAPES)
    kinds: tuple = ("int4", "fp8")
    calls: int = 24  # calls per timing (graph)
    max_configs: int | None = None  # per kind and M
    num_sms: int | None = None  # None: the GPU's
    rotation_bytes: int = ROTATION_BYTES
    wide_splits: bool = False  # split-K counts s/4 .. 4s around split_for's s (default s/2 .. 2s)


SMOKE = Settings(device="cpu", shapes=((256, 128),), calls=2, max_configs=3, num_sms=8, rotation_bytes=0)


def graph_us(calls: list, reps: int = 3, device: str = "cuda") -> float:
    """Microseconds per call: `calls` captured once into a CUDA graph, replayed `reps` times
    (on CPU: run once, wall time)."""
    import torch

    from pdserve.kernels.timing import event_ms
    if device != "cuda":
        t0 = time.perf_counter()
        for call in calls:
            call()
        return 1e6 * (time.perf_counter() - t0) / len(calls)
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return 1000 * event_ms(graph.replay, reps) / len(calls)


def _rotation(make, nbytes: int, rotation_bytes: int) -> list:
    """Copies of one weight, >= rotation_bytes in all (2..24): calls cycling through them miss L2."""
    return [make(i) for i in range(max(2, min(24, -(-rotation_bytes // nbytes))))]


def _calls(fn, weights: list, length: int) -> list:
    return [(lambda w=weights[i % len(weights)]: fn(w)) for i in range(max(length, len(weights)))]


class _Shape:
    """Rotated weights of one K x N in bf16 and each swept format, and the fp32 references."""

    def __init__(self, k: int, n: int, dev: str, rotation_bytes: int, kinds=("int4", "fp8")):
        import torch

        from pdserve.kernels.reference import dequantize_int_ref
        self.k, self.n = k, n
        gen = torch.Generator(device=dev).manual_seed(k + n)
        self.bf16 = _rotation(lambda i: torch.randn(n, k, dtype=torch.bfloat16, device=dev, generator=gen) * 0.02,
                              2 * k * n, rotation_bytes)

        def int4(i):
            qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev, generator=gen)
            scales = (0.01 + 0.02 * torch.rand(k // GROUP, n, device=dev, generator=gen)).half()
            zeros = torch.randint(0, 16, (k // GROUP, n), device=dev, generator=gen).half()
            return qweight, scales, zeros
        if "int4" in kinds:
            self.int4 = _rotation(int4, k * n // 2, rotation_bytes)
            self.int4_ref = dequantize_int_ref(*self.int4[0], 4, GROUP)  # [K, N] fp32

        def fp8(i):
            w = (torch.randn(n, k, device=dev, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            return w, torch.full((n,), 0.02 / 64, device=dev)
        if "fp8" in kinds:
            self.fp8 = _rotation(fp8, k * n, rotation_bytes)
            self.fp8_ref = self.fp8[0][0].float() * self.fp8[0][1][:, None]  # [N, K]

    def bytes(self, kind: str) -> int:
        return {"bf16": 2 * self.k * self.n, "int4": self.k * self.n // 2 + 2 * 2 * self.k * self.n // GROUP,
                "fp8": self.k * self.n + 4 * self.n}[kind]


def _time_configs(kind: str, shape: _Shape, x, expected, configs, deadline: float, report: dict,
                  settings: Settings) -> list[dict]:
    from pdserve.kernels.gemv_fp8 import fp8_gemv
    from pdserve.kernels.gemv_int import int_gemv
    from pdserve.kernels.testing import rel_error
    if kind == "int4":
        def fn(config):
            return lambda w: int_gemv(x, w[0], w[1], w[2], 4, GROUP, config=config)
        weights = shape.int4
    else:
        def fn(config):
            return lambda w: fp8_gemv(x, w[0], w[1], config=config)
        weights = shape.fp8
    out = []
    for i, config in enumerate(configs):
        if i and time.perf_counter() > deadline:  # the first (the engine's default) always runs
            report["skipped"] += 1
            continue
        try:
            err = rel_error(fn(config)(weights[0]), expected)
        except Exception as e:  # a config this GPU cannot compile (registers, shared memory)
            report["failed"].append(f"{kind} {config.short()}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if not err <= MAX_REL_ERR:
            report["wrong"].append(f"{kind} K={shape.k} N={shape.n} M={x.shape[0]} {config.short()}: rel err {err:.1e}")
            continue
        us = graph_us(_calls(fn(config), weights, settings.calls), device=settings.device)
        out.append({"config": config, "us": us, "rel_err": err})
    return out


def _configs(kind: str, bucket: int, k: int, n: int, settings: Settings) -> list:
    from pdserve.kernels import gemv_config as gc
    sms = settings.num_sms or gc.num_sms(0)
    seen, out = set(), []
    for base in gc.candidates(kind, bucket):
        s = gc.split_for(base, k, n, sms)
        splits = {1, max(1, s // 2), s, 2 * s} | ({max(1, s // 4), 4 * s} if settings.wide_splits else set())
        for split in sorted(splits):
            config = gc.fit(replace(base, split_k=split), kind, k, GROUP if kind == "int4" else None)
            if config not in seen:
                seen.add(config)
                out.append(config)
    return out[:settings.max_configs]


def _variants() -> list[tuple[str, int, object]]:
    """(kind, M, config) for each distinct compiled kernel the sweep runs on the 8B shapes (the
    split count is a runtime argument; BLOCK_M follows M on the FMA path)."""
    from pdserve.kernels import gemv_config as gc
    seen, out = set(), []
    for kind in ("int4", "fp8"):
        for m in ROWS:
            bucket = gc.bucket_of(m)
            for config in [gc.heuristic(kind, bucket, 4096, 4096, 132)] + gc.candidates(kind, bucket):
                key = (kind, gc.block_m(config, m), replace(config, split_k=1))
                if key not in seen:
                    seen.add(key)
                    out.append((kind, m, key[2]))
    return out


def _compile_slice(index: int, count: int) -> None:
    """Runs this process's share of _variants once each: Triton compiles them into its on-disk
    cache, from which the sweeping process then loads them."""
    import torch

    from pdserve.kernels.gemv_fp8 import fp8_gemv
    from pdserve.kernels.gemv_int import int_gemv
    k, n = 4096, 4096  # the 8B shapes share their specialization (dims divisible by 16, N by BLOCK_N)
    qweight = torch.zeros(k // 8, n, dtype=torch.int32, device="cuda")
    scales = torch.ones(k // GROUP, n, dtype=torch.float16, device="cuda")
    w8, s8 = torch.zeros(n, k, dtype=torch.float8_e4m3fn, device="cuda"), torch.ones(n, device="cuda")
    for kind, m, config in _variants()[index::count]:
        x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
        if kind == "int4":
            int_gemv(x, qweight, scales, scales, 4, GROUP, config=config)
        else:
            fp8_gemv(x, w8, s8, config=config)
    torch.cuda.synchronize()


def precompile(workers: int, timeout_s: float = 150.0) -> str:
    """Compiles the sweep's kernels in `workers` processes at once (compiling one after another
    would take most of the budget). A failure here only costs time: the sweep compiles what is
    missing itself."""
    import subprocess
    import sys
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pdserve.services.bench_gemv", "--compile-slice"]
    procs = [subprocess.Popen(cmd + [f"{i}/{workers}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    failed = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed.append("timeout")
            continue
        if proc.returncode:
            failed.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
    took = f"{time.perf_counter() - t0:.0f} s"
    if failed:
        return f"precompiling {len(_variants())} kernels: {len(failed)} of {workers} processes failed ({took}): {failed[:2]}"
    return f"{len(_variants())} kernels compiled by {workers} processes in {took}"


def sweep(budget_s: float = 150.0, workers: int = 8, settings: Settings = Settings(),
          total_s: float | None = None) -> tuple[list[dict], dict, dict]:
    """-> (rows of the table, best config per (kind, K, N, bucket), report of dropped configs).
    The budget starts after the parallel compilation (`workers` processes; 0: none); total_s,
    if given, caps compilation + budget (keeping ~25 s for building the weights and timing the
    baselines), so that a caller's hard time limit still sees the table."""
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    from pdserve.kernels import gemv_config as gc
    from pdserve.kernels.fp8_linear import quantize_fp8_per_token
    from pdserve.kernels.int_gemm import int_dequantize
    if workers:
        print(f"gemv sweep: {precompile(workers)}", flush=True)
    if total_s is not None:
        budget_s = max(5.0, min(budget_s, total_s - 25.0 - (time.perf_counter() - t_start)))
    dev, calls = settings.device, settings.calls
    start = time.perf_counter()
    report = {"skipped": 0, "failed": [], "wrong": []}
    table, best = [], {}
    for index, (k, n) in enumerate(settings.shapes):
        deadline = start + budget_s * (index + 1) / len(settings.shapes)  # a share per shape
        shape = _Shape(k, n, dev, settings.rotation_bytes, settings.kinds)
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev) * 0.5
            row = {"k": k, "n": n, "m": m, "bf16_us": graph_us(_calls(lambda w: F.linear(x, w), shape.bf16, calls),
                                                               device=dev)}
            if m > 1 and "int4" in settings.kinds:  # the paths these sizes took before the GEMVs
                row["int4_dequant_us"] = graph_us(_calls(
                    lambda w: x @ int_dequantize(w[0], w[1], w[2], 4, GROUP, x.dtype), shape.int4, calls), device=dev)
            if m > 1 and "fp8" in settings.kinds:
                def scaled_mm(w):
                    xq, xs = quantize_fp8_per_token(x)
                    return torch._scaled_mm(xq, w[0].t(), scale_a=xs, scale_b=w[1][None, :], out_dtype=x.dtype)
                row["fp8_scaled_mm_us"] = graph_us(_calls(scaled_mm, shape.fp8, calls), device=dev)
            for kind in [kind for kind in ("int4", "fp8") if kind in settings.kinds]:
                expected = x.float() @ (shape.int4_ref if kind == "int4" else shape.fp8_ref.t())
                bucket = gc.bucket_of(m)
                default = gc.choose(kind, m, k, n, GROUP if kind == "int4" else None, x.device)
                configs = [default] + [c for c in _configs(kind, bucket, k, n, settings) if c != default]
                timed = _time_configs(kind, shape, x, expected, configs, deadline, report, settings)
                by_config = {t["config"]: t for t in timed}
                if default in by_config:
                    row[f"{kind}_default_us"] = by_config[default]["us"]
                if timed:
                    top = min(timed, key=lambda t: t["us"])
                    row[f"{kind}_us"], row[f"{kind}_config"] = top["us"], top["config"]
                    row[f"{kind}_rel_err"] = top["rel_err"]
                    row[f"{kind}_gbs"] = shape.bytes(kind) / top["us"] / 1e3
                    best[(kind, k, n, bucket)] = top["config"]
                for label in LABELS[kind]:  # old kernels, version 2 (int: also with slices): each at its best
                    of_label = [t for t in timed if _label(t["config"]) == label]
                    if of_label:
                        top = min(of_label, key=lambda t: t["us"])
                        row[f"{kind}_{label}_us"], row[f"{kind}_{label}_config"] = top["us"], top["config"]
                row[f"{kind}_tried"] = len(timed)
            table.append(row)
            print(f"gemv K={k} N={n} M={m}: " + json.dumps(_jsonable(row)), flush=True)
        del shape
        if dev == "cuda":
            torch.cuda.empty_cache()
    return table, best, report


LABELS = {"int4": ("v1", "v2", "v2s"), "fp8": ("v1", "v2")}  # the kernel versions compared (int: slices apart)


def _label(config) -> str:
    return "v1" if config.version == 1 else "v2s" if config.slices > 1 else "v2"


def _jsonable(row: dict) -> dict:
    return {key: (value.short() if hasattr(value, "short") else round(value, 4 if "err" in key else 1)
                  if isinstance(value, float) else value) for key, value in row.items()}


def print_table(table: list[dict], best: dict, report: dict) -> None:
    from pdserve.kernels.gemv_config import tuned_as_python

    def us(row, key):
        return f"{row[key]:.1f}" if key in row else "-"

    print("\nsmall-batch GEMVs vs bf16 cuBLAS, us per call (CUDA graph; weights rotated past L2)")
    print(f"{'K x N':>12} {'M':>3} {'bf16':>7} | {'int4':>6} {'/bf16':>6} {'GB/s':>5} {'default':>7} {'v1':>6} {'v2':>6} {'v2s':>6} "
          f"{'dequant':>7} {'config':<31} | {'fp8':>6} {'/bf16':>6} {'GB/s':>5} {'default':>7} {'v1':>6} {'v2':>6} "
          f"{'scaledmm':>8} config")
    for r in table:
        cells = []
        for kind, other in (("int4", "int4_dequant_us"), ("fp8", "fp8_scaled_mm_us")):
            if f"{kind}_us" not in r:
                cells.append(f"{'none':>6}")
                continue
            versions = "".join(f"{us(r, f'{kind}_{label}_us'):>6} " for label in LABELS[kind])
            cells.append(f"{r[kind + '_us']:>6.1f} {r[kind + '_us'] / r['bf16_us']:>6.2f} {r[kind + '_gbs']:>5.0f} "
                         f"{us(r, kind + '_default_us'):>7} {versions}{us(r, other):>{7 if kind == 'int4' else 8}} "
                         f"{r[kind + '_config'].short():<31}")
        print(f"{r['k']:>5} x {r['n']:<5} {r['m']:>3} {r['bf16_us']:>7.1f} | {cells[0]} | {cells[1]}")
    for kind in ("int4", "fp8"):  # a decode step's GEMVs (one of each weight) at M = 1
        m1 = [r for r in table if r["m"] == 1 and f"{kind}_us" in r]
        if len(m1) == len({(r["k"], r["n"]) for r in table}):
            total = sum(r[f"{kind}_us"] for r in m1)
            print(f"M = 1, one layer's {len(m1)} GEMVs: {kind} {total:.1f} us vs bf16 {sum(r['bf16_us'] for r in m1):.1f} us "
                  f"({total / sum(r['bf16_us'] for r in m1):.2f}x)"
                  + (f"; version 1 alone {sum(r[kind + '_v1_us'] for r in m1):.1f} us"
                     if all(kind + "_v1_us" in r for r in m1) else ""))
    print(f"configs skipped (time budget): {report['skipped']}; failed to run: {len(report['failed'])}; "
          f"wrong results (dropped): {len(report['wrong'])}")
    for line in report["failed"][:5] + report["wrong"][:5]:
        print(f"  {line}")
    print("TUNED entries (kernels/gemv_config.py):")
    for line in tuned_as_python(best):
        print(line)


def summary(table: list[dict], best: dict, report: dict) -> dict:
    return {"rows": [_jsonable(r) for r in table],
            "best": {"/".join(map(str, key)): asdict(c) for key, c in best.items()},
            "skipped": report["skipped"], "failed": report["failed"], "wrong": report["wrong"]}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes: a model's name, "all", or comma-separated KxN pairs (K, N multiples of 128) -> [(K, N)]; [] if invalid."""
    if text in MODEL_SHAPES or text == "all":
        return [s for name, group in MODEL_SHAPES.items() if text in (name, "all") for s in group]
    shapes = []
    for item in text.split(","):
        k, _, n = item.strip().lower().partition("x")
        if not (k.isdigit() and n.isdigit()) or int(k) % GROUP or int(n) % 8 or not int(n):
            return []
        shapes.append((int(k), int(n)))
    return shapes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.bench_gemv", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="no new config is tried after this many seconds (a share per shape)")
    p.add_argument("--total-s", type=float, default=None,
                   help="cap on compiling + the budget (for a hard time limit around this command)")
    p.add_argument("--json-out", default=None, help="the table and report as JSON")
    p.add_argument("--table-out", default=None, help="the best configs as a gemv_config.load_tuned JSON")
    p.add_argument("--workers", type=int, default=8, help="processes compiling the kernels first (0: none)")
    p.add_argument("--compile-slice", default=None, help=argparse.SUPPRESS)  # "i/n": a precompile worker
    p.add_argument("--shapes", default="llama3-8b",
                   help=f"weights swept: {', '.join(MODEL_SHAPES)} or all, or K x N pairs as 4096x6144,14336x4096 "
                        "(default: Llama-3-8B's four)")
    p.add_argument("--kinds", default="int4,fp8", help="comma-separated: int4, fp8")
    p.add_argument("--wide-splits", action="store_true",
                   help="also try split-K at a quarter and 4x the heuristic's count (more configs: a larger budget)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU test of this script (TRITON_INTERPRET=1): a small shape, 3 configs per kind and M")
    args = p.parse_args(argv)
    if args.compile_slice:
        index, count = map(int, args.compile_slice.split("/"))
        _compile_slice(index, count)
        return
    from pdserve.kernels.gemv_config import tuned_to_json
    t0 = time.perf_counter()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - {"int4", "fp8"}:
        p.error(f"--kinds takes int4 and / or fp8, got {args.kinds!r}")
    shapes = parse_shapes(args.shapes)
    if not shapes:
        p.error(f"--shapes takes {', '.join(MODEL_SHAPES)}, all, or K x N pairs such as 4096x6144; got {args.shapes!r}")
    settings = replace(SMOKE if args.smoke else Settings(shapes=tuple(shapes)), kinds=kinds, wide_splits=args.wide_splits)
    table, best, report = sweep(args.budget_s, workers=0 if args.smoke else args.workers,
                                settings=settings, total_s=args.total_s)
    print_table(table, best, report)
    print(f"sweep took {time.perf_counter() - t0:.0f} s")
    if args.table_out:
        with open(args.table_out, "w") as f:
            f.write(tuned_to_json(best))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary(table, best, report), f, indent=1)


if __name__ == "__main__":
    main()

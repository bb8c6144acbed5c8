"""Quantization on one GPU (issue 13): one command, a table at the end, within ~9 minutes on an H200.

    python -m pdserve.services.bench_quant [--budget-s 500] [--w2-requests 400] [--skip-kernel-tests]
        [--gemv-budget-s 60] [--gemv-table FILE] [--gemv-table-out FILE] [--no-apply-sweep] [--only LABELS]

Runs, one engine at a time in this process (each freed before the next), through bench_gpu's
measurements (dummy weights, greedy, ignore_eos; W1 = 256 x 512 prompt / 128 output tokens,
W2 = --w2-requests with prompt U[64, 2048] / output U[32, 512], batch 1 = 512 prompt + 256 output):

    8B   bf16              W1, batch-1, W2        the reference row
    8B   fp8 weights       W1, batch-1            (issue targets: W1 >= 1.4x, batch-1 <= 0.6x of bf16)
    8B   AWQ int4          W1, batch-1            (target: batch-1 <= 0.35x of bf16)
    8B   bf16 + fp8 KV     W2, KV capacity        (vs bf16 KV: ~2x the tokens)
    70B  AWQ int4          batch-1, W1            on ONE GPU: weights / KV / peak memory

first the GPU kernel tests of the quantized kernels (pytest -m gpu, tests/kernels/test_quant_{kernels,gemv}.py),
then the sweep of the small-batch GEMVs' launch configs (`bench_gemv`: best per 8B weight and M vs
bf16 cuBLAS; the engines below then run the best ones unless --no-apply-sweep).
A configuration that would start after --budget-s is skipped (and says so), so the table always prints.
Columns: startup s, weights GiB (parameters and buffers), KV tokens (pool capacity), W1 / W2 output
tok/s, batch-1 ms per output token and TTFT, peak GiB (torch's max allocated), and ratios to 8B bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time

CONFIGS = [  # label, shape, --quantization, --kv-cache-dtype, workloads
    ("8B bf16", "llama3-8b", None, "auto", ("w1", "latency", "w2")),
    ("8B fp8", "llama3-8b", "fp8", "auto", ("w1", "latency")),
    ("8B awq-int4", "llama3-8b", "awq", "auto", ("latency", "w1")),
    ("8B bf16 fp8-KV", "llama3-8b", None, "fp8", ("w2",)),
    ("70B awq-int4", "llama2-70b", "awq", "auto", ("latency", "w1")),
]


def engine_args(shape: str, quantization: str | None, kv: str, base: argparse.Namespace) -> argparse.Namespace:
    from pdserve.services import bench_gpu
    parser = argparse.ArgumentParser()
    bench_gpu.add_args(parser)
    argv = ["all", "--shape", shape, "--kv-cache-dtype", kv, "--max-model-len", "4096", "--no-profile",
            "--gpu-memory-utilization", str(base.gpu_memory_utilization)]
    if base.tiny:
        argv += ["--device", "cpu", "--max-model-len", "1024", "--max-num-batched-tokens", "2048"]
    return parser.parse_args(argv + (["--quantization", quantization] if quantization else []))


def run_config(label, shape, quantization, kv, loads, base) -> dict:
    import torch

    from pdserve.services import bench_gpu
    args = engine_args(shape, quantization, kv, base)
    spec = bench_gpu.TINY if base.tiny else bench_gpu.SHAPES[shape]
    vocab = spec["vocab_size"]
    cuda = not base.tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = bench_gpu.build_engine(args, bench_gpu.write_shape(spec))
    row = {"label": label, "startup_s": round(time.perf_counter() - t0, 1)}
    model = engine.runner.model
    row["weights_gib"] = round(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
                               / 2**30, 2)
    row["kv_tokens"] = engine.runner.num_blocks * engine.runner.block_size
    row["kv_gib"] = round(engine.runner.num_blocks * engine.runner.bytes_per_block() / 2**30, 1)
    rng = random.Random(7)
    warm = [([rng.randrange(100, vocab) for _ in range(rng.randint(64, 2048))], 8) for _ in range(2 if base.tiny else 16)]
    bench_gpu.run_pdserve(engine, warm, "warm")
    bench_gpu.run_latency_pdserve(engine, warm[0][0], 8)
    loads_by_name = bench_gpu.workloads("all", base.w2_requests, vocab, 0)
    if base.tiny:  # a smoke test of this script: a few short requests
        loads_by_name = {k: [(p[:64], 4) for p, _ in v[:3]] for k, v in loads_by_name.items()}
    for name in loads:
        if name == "latency":
            prompt, n = loads_by_name["latency"][0]
            row["latency"] = bench_gpu.run_latency_pdserve(engine, prompt, n)
        else:
            row[name] = bench_gpu.run_pdserve(engine, loads_by_name[name], name)
        print(f"{label} {name}: {json.dumps(row.get(name))}", flush=True)
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0.0
    free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
    row["gpu_used_gib"] = round((total - free) / 2**30, 1)
    bench_gpu.release_kv(engine)
    del engine, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def kernel_tests(timeout_s: float) -> str:
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the repo (the package may be symlinks)
    tests = [os.path.join(root, "tests", "kernels", name) for name in ("test_quant_kernels.py", "test_quant_gemv.py")]
    if not all(os.path.isfile(test) for test in tests):
        return f"not run: {tests} not found"
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, timeout=timeout_s, cwd=root)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith("FAILED")]
    return "; ".join(failures[:5] + lines[-1:])


def print_table(rows: list[dict], kernels: str, card: str) -> None:
    base = next((r for r in rows if r["label"] == "8B bf16" and "skipped" not in r), None)

    def tok_s(r, name):
        return r.get(name, {}).get("output_tok_per_s") if isinstance(r.get(name), dict) else None

    def ratio(value, ref, digits=2):
        return f"{value / ref:.{digits}f}x" if value and ref else ""

    print(f"\n== quantization on {card} (dummy weights; ratios vs 8B bf16) ==")
    print(f"{'config':<16} {'start s':>7} {'weights GiB':>11} {'KV tokens':>10} {'W1 tok/s':>9} {'ratio':>6} "
          f"{'b1 ms/tok':>9} {'ratio':>6} {'W2 tok/s':>9} {'ratio':>6} {'peak GiB':>8} {'GPU used':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['label']:<16} skipped: {r['skipped']}")
            continue
        w1, w2 = tok_s(r, "w1"), tok_s(r, "w2")
        b1 = r.get("latency", {}).get("ms_per_output_token")
        print(f"{r['label']:<16} {r['startup_s']:>7} {r['weights_gib']:>11} {r['kv_tokens']:>10} {w1 or '':>9} "
              f"{ratio(w1, base and tok_s(base, 'w1')):>6} {b1 or '':>9} "
              f"{ratio(b1, base and base.get('latency', {}).get('ms_per_output_token')):>6} {w2 or '':>9} "
              f"{ratio(w2, base and tok_s(base, 'w2')):>6} {r['peak_gib']:>8} {r['gpu_used_gib']:>8}")
    kv = next((r for r in rows if r["label"] == "8B bf16 fp8-KV" and "skipped" not in r), None)
    if kv and base:
        print(f"fp8 KV capacity: {kv['kv_tokens']} vs {base['kv_tokens']} tokens ({kv['kv_tokens'] / base['kv_tokens']:.2f}x)")
    for r in rows:
        if "latency" in r:
            print(f"{r['label']}: batch-1 TTFT {r['latency']['ttft_ms']} ms")
    print(f"GPU kernel tests (test_quant_{{kernels,gemv}}.py -m gpu): {kernels}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.bench_quant", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=500.0, help="no configuration starts after this many seconds")
    p.add_argument("--w2-requests", type=int, default=400)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--skip-kernel-tests", action="store_true")
    p.add_argument("--skip-kernel-timing", action="store_true", help="no GEMV config sweep (bench_gemv)")
    p.add_argument("--gemv-budget-s", type=float, default=60.0, help="time cap of the GEMV config sweep")
    p.add_argument("--gemv-table", default=None, help="gemv_config JSON (bench_gemv --table-out) for the engines")
    p.add_argument("--gemv-table-out", default=None, help="write the sweep's best configs here (JSON)")
    p.add_argument("--no-apply-sweep", action="store_true",
                   help="engines keep the built-in GEMV configs instead of the sweep's best")
    p.add_argument("--only", default=None, help="comma-separated config labels to run (default: all)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test of this script: 2-layer shapes, few requests")
    args = p.parse_args(argv)
    import torch
    t_start = time.perf_counter()
    card = "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name()
    kernels = "skipped" if args.skip_kernel_tests or args.tiny else kernel_tests(240.0)
    print(f"kernel tests: {kernels}", flush=True)
    from pdserve.kernels import gemv_config
    if args.gemv_table:
        print(f"gemv configs: {gemv_config.load_tuned(args.gemv_table)} entries from {args.gemv_table}", flush=True)
    timing = None
    if not (args.skip_kernel_timing or args.tiny):
        from pdserve.services import bench_gemv
        try:
            timing = bench_gemv.sweep(args.gemv_budget_s)
        except Exception as e:  # the engine configurations below still run
            print(f"GEMV sweep failed: {type(e).__name__}: {e}", flush=True)
        else:
            bench_gemv.print_table(*timing)
            if args.gemv_table_out:
                with open(args.gemv_table_out, "w") as f:
                    f.write(gemv_config.tuned_to_json(timing[1]))
            if not args.no_apply_sweep:
                gemv_config.tune(timing[1])
                print(f"engines below run the sweep's best GEMV configs ({len(timing[1])} entries)", flush=True)
    rows = []
    wanted = None if args.only is None else set(args.only.split(","))
    for label, shape, quantization, kv, loads in CONFIGS:
        if wanted is not None and label not in wanted:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            rows.append({"label": label, "skipped": f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"})
            continue
        try:
            rows.append(run_config(label, shape, quantization, kv, loads, args))
        except Exception as e:  # one failing configuration must not hide the others' numbers
            rows.append({"label": label, "skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            gc.collect()
            if not args.tiny:
                torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - t_start:.0f} s] {label} done", flush=True)
    print_table(rows, kernels, card)
    if timing:
        from pdserve.services import bench_gemv
        bench_gemv.print_table(*timing)
    summary = {"card": card, "total_s": round(time.perf_counter() - t_start, 1), "kernel_tests": kernels, "rows": rows,
               "gemv_sweep": timing and bench_gemv.summary(*timing)}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

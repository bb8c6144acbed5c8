"""Prefill and decode on separate GPUs (issue 11): KV handoff bandwidth, greedy equality, goodput.

    compose/gpu/run_stack.sh --run python3 -m pdserve.services.bench_pd_gpu --out-dir $OUT \\
        [--parts handoff,greedy,plan,goodput,load]

    handoff   256 MiB KV handoff, prefill process on GPU 0 -> decode process on GPU 1, over each
              --handoff-backends (ucx, nccl, ipc), against a plain GPU0->GPU1 copy_ in the same run
              (common/kv_transfer/bench.py); GB/s and the ratio to the copy
    greedy    token ids of greedy outputs through 1P1D (prefill GPU 0, decode GPU 1, --greedy-transport)
              == `pdserve generate` on GPU 0 alone, for a few prompts
    plan      `pdserve plan` for the goodput workload (what it recommends, next to what is measured)
    goodput   Poisson rates, prompts 1024-2048 tokens, outputs 128-256: 1P1D vs two aggregated
              engines (one per GPU, no prefill worker: the router sends each request to one of
              them) behind the same router, each --agg-chunks size tried; goodput under SLO A
              (TTFT p90 <= 1 s, TPOT p90 <= 25 ms) and B (TPOT <= 50 ms)
    load      --load-rate req/s for --load-seconds, 256-token prompts, 128 outputs: 1P1D through
              the router, then one `pdserve serve` on GPU 0
    tp        prefill TP=p -> decode TP=d for each of --tp-layouts (p:d) that fits on the visible
              GPUs (services/bench_pd_tp.py): each rank on its own GPU and KV over nccl, or with
              --tp-share-gpus decode's ranks beside prefill's and KV over ucx; a small model with
              seeded random weights (TINY shape: 8 heads / 2 KV heads): the greedy prompts through
              the router vs `pdserve generate` at TP=1, the handoffs and the prompt tokens decode
              had to recompute (0: every pull worked). A progress line per layout and prompt, the
              JSON rewritten after each layout, every wait bounded (--tp-ready-timeout,
              --tp-request-timeout, --tp-budget-s). bf16 at TP=2 sums in another order, so its
              tokens may differ from TP=1's after a while (the count says how many agree).

Model: the Llama-3-8B shape (bench_gpu.LLAMA3_8B) with dummy weights and a word-level
tokenizer whose token i is the word "t<i>", so text and token ids map one to one (the
completions API returns text; the greedy check reads the ids back from it). Stacks are
`pdserve up` processes (services/bench_stack.py), started and stopped in turn (each takes its
GPUs' memory); SIGTERM (a time limit) stops the running one. The main process never touches
CUDA. Prints one table per part and writes bench_pd_gpu.json (after every part, and in the tp
part after every layout), handoff.json and plan.json to --out-dir (stack logs stay in a temp
folder; a stack that fails to start puts its log's tail into the error). `--device cpu --tiny`
runs every part on CPU as a smoke test (the tp part as on --cpu-gpus GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from pdserve.services import loadgen
from pdserve.services.bench_gpu import LLAMA3_8B, TINY
from pdserve.services.bench_pd_model import greedy_summary, ids_of, write_model
from pdserve.services.bench_stack import Stack
from pdserve.services.local_stack import free_port

SLOS = {"A": {"ttft": 1.0, "tpot": 0.025}, "B": {"ttft": 1.0, "tpot": 0.050}}
PARTS = ("handoff", "greedy", "plan", "goodput", "load", "tp")


class Bench:
    def __init__(self, args):
        self.args = args
        self.gpu = args.device == "cuda"
        self.folder = write_model(tempfile.mkdtemp(prefix="pdserve-pd-model-"), tiny=args.tiny)
        self.vocab = (TINY if args.tiny else LLAMA3_8B)["vocab_size"]
        self.work_dir = tempfile.mkdtemp(prefix="pdserve-pd-")  # logs, prompts: not sent back
        self.out_dir = args.out_dir or self.work_dir  # a few JSON files (the device returns <= 8)
        os.makedirs(self.out_dir, exist_ok=True)
        self.sizing_args = ["--max-model-len", str(args.max_model_len)]
        if not self.gpu:  # float32 on CPU (auto would be bf16 where the CPU has it): outputs are compared
            self.sizing_args += ["--num-gpu-blocks-override", "2048", "--dtype", "float32"]
        self.engine_args = ["--load-format", "dummy", *self.sizing_args]
        self.report: dict = {"args": vars(args)}
        self._references: dict = {}  # model folder -> (greedy prompts, generate's token ids)

    # ---- stacks -----------------------------------------------------------------------------
    def stack(self, name: str, num_prefill: int, num_decode: int, transport: str = "nccl",
              decode_args: str = "", prefill_args: str = "", pin_gpus: bool = True,
              folder: str | None = None, engine_args: list[str] | None = None, router_args: str = "") -> Stack:
        """pin_gpus: one GPU per worker (CUDA_VISIBLE_DEVICES); else the args place them (--device).
        folder / engine_args: another model than the bench's (and its flags)."""
        port = free_port()
        argv = ["up", "--prefill", str(num_prefill), "--decode", str(num_decode), "--port", str(port),
                "--model", folder or self.folder, "--kv-transport", transport,
                "--worker-args", " ".join(self.engine_args if engine_args is None else engine_args),
                "--router-args", f"--disagg-min-prompt-tokens 0 --served-model-name bench {router_args}".strip()]
        if decode_args:
            argv += ["--decode-args", decode_args]
        if prefill_args:
            argv += ["--prefill-args", prefill_args]
        if self.gpu and pin_gpus:
            a = self.args
            gpus = [a.prefill_gpu, a.decode_gpu]
            if num_prefill:
                argv += ["--prefill-devices", a.prefill_gpu, "--decode-devices", a.decode_gpu]
            else:
                argv += ["--decode-devices", ",".join(gpus[:num_decode])]
        stack = Stack(name, argv, f"http://127.0.0.1:{port}", num_prefill + num_decode, self.work_dir)
        stack.wait_ready()
        return stack

    def run_load(self, url: str, requests, rate: float) -> tuple[list, float]:
        return loadgen.run_load_processes(url, "bench", requests, rate, None, self.args.seed,
                                          self.args.client_processes)

    # ---- parts ------------------------------------------------------------------------------
    def handoff(self) -> None:
        a = self.args
        out = os.path.join(self.out_dir, "handoff.json")
        argv = [sys.executable, "-m", "pdserve.common.kv_transfer.bench", "--device", a.device,
                "--size-mb", str(a.handoff_mb), "--backends", a.handoff_backends, "--json-out", out]
        if self.gpu:
            argv += ["--server-gpu", a.prefill_gpu, "--client-gpu", a.decode_gpu]
            if a.handoff_unmasked:
                argv.append("--unmasked")
        subprocess.run(argv, check=True, timeout=600)
        rows = json.load(open(out))["results"]
        largest = max(r["num_blocks"] for r in rows)
        big = {r["backend"]: r for r in rows if r["num_blocks"] == largest}
        base = big.get("p2p-copy") or big.get("raw-socket")
        self.report["handoff"] = {"mib": base["mib"], "baseline": base["backend"], "baseline_gb_s": base["gb_per_s"],
                                  "backends": {b: {"gb_s": r["gb_per_s"], "ms": r["latency_ms"],
                                                   "ratio_to_baseline": r["gb_per_s"] / base["gb_per_s"]}
                                               for b, r in big.items() if b != base["backend"]}}

    def greedy(self) -> None:
        prompts, reference = self.greedy_reference(self.folder, self.vocab, self.engine_args)
        transport = self.args.greedy_transport
        stack = self.stack("greedy-1p1d", 1, 1, transport=transport)
        try:
            got, stats = self.greedy_through(stack, prompts)
        finally:
            stack.stop()
        self.report["greedy"] = {**greedy_summary(reference, got, stats), "kv_transport": transport}

    def tp(self) -> None:
        from pdserve.services.bench_pd_tp import run_tp
        run_tp(self)

    def save(self) -> None:
        """bench_pd_gpu.json as the report stands (after each part, and each tp layout)."""
        with open(os.path.join(self.out_dir, "bench_pd_gpu.json"), "w") as f:
            json.dump(self.report, f, indent=2)

    def greedy_reference(self, folder: str, vocab: int, engine_args: list[str],
                         timeout_s: float = 600) -> tuple[list[str], list[list[int]]]:
        """Greedy prompts and their token ids from `pdserve generate` (TP=1, GPU 0), once per model."""
        if folder not in self._references:
            self._references[folder] = self._generate_reference(folder, vocab, engine_args, timeout_s)
        return self._references[folder]

    def _generate_reference(self, folder: str, vocab: int, engine_args: list[str],
                            timeout_s: float) -> tuple[list[str], list[list[int]]]:
        a = self.args
        rng = random.Random(a.seed)
        prompts = [" ".join(f"t{rng.randrange(100, vocab)}" for _ in range(rng.randint(100, 600)))
                   for _ in range(a.greedy_prompts)]
        prompt_file = os.path.join(self.work_dir, "greedy_prompts.txt")
        with open(prompt_file, "w") as f:
            f.write("\n".join(prompts) + "\n")
        ref_file = os.path.join(self.work_dir, "greedy_reference.jsonl")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": a.prefill_gpu} if self.gpu else None
        subprocess.run([sys.executable, "-m", "pdserve.services.cli", "generate", "--model", folder,
                        "--input", prompt_file, "--output", ref_file, "--temperature", "0", "--max-tokens",
                        str(a.greedy_tokens), "--ignore-eos", "--device", a.device, *engine_args,
                        "--max-num-seqs", "1"],  # one at a time, as the stack gets them: the same GEMM shapes
                       check=True, timeout=timeout_s, env=env)
        return prompts, [json.loads(line)["token_ids"] for line in open(ref_file)]

    def greedy_through(self, stack: Stack, prompts: list[str]) -> tuple[list[list[int]], dict]:
        """Each prompt's greedy token ids through the stack's router, and the router's stats."""
        import httpx
        got = []
        for prompt in prompts:  # one at a time, as generate ran them through the same kernels
            body = {"model": "bench", "prompt": prompt, "max_tokens": self.args.greedy_tokens, "temperature": 0,
                    "ignore_eos": True}
            got.append(ids_of(httpx.post(stack.url + "/v1/completions", json=body, timeout=300)
                              .json()["choices"][0]["text"]))
        return got, httpx.get(stack.url + "/admin/stats", timeout=10).json()

    def plan(self) -> None:
        a = self.args
        out = os.path.join(self.out_dir, "plan.json")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": a.prefill_gpu} if self.gpu else None
        rate = max(a.rates)
        proc = subprocess.run([sys.executable, "-m", "pdserve.services.cli", "plan", "--prompt-len",
                               str(a.input_len), "--output-len", str(a.output_len), "--rate", str(rate),
                               "--ttft", "1.0", "--tpot", "0.025", "--model", self.folder, "--device", a.device,
                               "--json-out", out, *self.engine_args], capture_output=True, text=True,
                              timeout=600, env=env)
        print(proc.stdout)
        self.report["plan"] = ({"rate": rate, **json.load(open(out))["plan"]} if proc.returncode == 0
                               else {"error": proc.stderr[-2000:]})

    def goodput(self) -> None:
        a = self.args
        # Fresh prompts for every rate (the same ones for every config): replaying one list found
        # every prompt in the prefix cache after the first rate, so prefill cost nothing there
        def workload(i: int, num: int) -> list:
            return loadgen.random_requests(num, a.input_len, a.output_len, a.range_ratio, self.vocab,
                                           a.seed + 1000 * (i + 1))
        per_rate = [workload(i, a.requests_per_rate if a.goodput_seconds is None
                             else max(a.requests_per_rate, math.ceil(rate * a.goodput_seconds)))
                    for i, rate in enumerate(a.rates)]
        warm_up = workload(len(a.rates), 4)
        configs = [("1p1d", 1, 1, "")] + [(f"agg-chunk{c}", 0, 2, f"--max-num-batched-tokens {c}")
                                              for c in a.agg_chunks]
        results = {}
        for name, num_prefill, num_decode, decode_args in configs:
            stack = self.stack(name, num_prefill, num_decode, decode_args=decode_args)
            try:
                self.run_load(stack.url, warm_up, math.inf)  # warm-up: compiles, graphs, pairs
                runs = []
                for rate, requests in zip(a.rates, per_rate):
                    res, wall = self.run_load(stack.url, requests, rate)
                    run = {slo: loadgen.summarize(res, wall, s, rate, None) for slo, s in SLOS.items()}
                    runs.append(run)
                    r = run["A"]
                    print(f"{name} rate {rate}: TTFT p90 {r['p90_ttft_ms']:.0f} ms, TPOT p90 {r['p90_tpot_ms']:.1f} ms,"
                          f" goodput A {r['goodput']:.2f} / B {run['B']['goodput']:.2f} req/s, failed {r['failed']}",
                          flush=True)
            finally:
                stack.stop()
            results[name] = runs
        self.report["goodput"] = {"workload": {"input_len": a.input_len, "output_len": a.output_len,
                                               "range_ratio": a.range_ratio,
                                               "requests_per_rate": [len(r) for r in per_rate]},
                                  "configs": results, "max_rate_at_90pct": {
                                      name: {slo: max((r[slo]["request_rate"] for r in runs
                                                       if r[slo]["slo_attainment"] >= 0.9), default=0.0)
                                             for slo in SLOS} for name, runs in results.items()}}

    def load(self) -> None:
        a = self.args
        num = int(a.load_rate * a.load_seconds)
        requests = loadgen.random_requests(num, 256, 128, 0.0, self.vocab, a.seed + 1)
        targets = a.load_targets.split(",")

        def measure(url: str) -> dict:  # a warm-up of 4 requests, then the load at its rate
            self.run_load(url, requests[:4], math.inf)
            return loadgen.summarize(*self.run_load(url, requests, a.load_rate), {}, a.load_rate, None)
        out = {}
        if "1p1d" in targets:
            stack = self.stack("load-1p1d", 1, 1, transport=a.load_transport, decode_args=a.load_decode_args,
                               router_args=a.load_router_args)
            try:
                out["1p1d"] = measure(stack.url)
            finally:
                stack.stop()
        if "serve" in targets:
            port = free_port()
            env = {"CUDA_VISIBLE_DEVICES": a.prefill_gpu} if self.gpu else None
            serve = Stack("load-serve", ["serve", self.folder, "--port", str(port), "--served-model-name", "bench",
                                         "--device", a.device, *self.engine_args], f"http://127.0.0.1:{port}", 0,
                          self.work_dir, env)
            try:
                serve.wait_ready()
                out["serve"] = measure(serve.url)
            finally:
                serve.stop()
        self.report["load"] = out


def print_report(report: dict) -> None:
    if "handoff" in report:
        h = report["handoff"]
        print(f"\nKV handoff {h['mib']:.0f} MiB: {h['baseline']} {h['baseline_gb_s']:.1f} GB/s")
        for b, r in h["backends"].items():
            print(f"  {b:<16} {r['gb_s']:8.1f} GB/s  {r['ms']:8.2f} ms  {100 * r['ratio_to_baseline']:6.1f} % of it")
    if "greedy" in report:
        g = report["greedy"]
        print(f"\ngreedy 1P1D ({g.get('kv_transport', 'nccl')}) == generate: {g['equal']}/{g['prompts']} prompts "
              f"(handoffs {g['handoffs']})")
    if "plan" in report:
        p = report["plan"]
        print(f"\npdserve plan: " + (f"{p.get('num_prefill')} prefill : {p.get('num_decode')} decode at "
                                      f"{p.get('rate')} req/s" if "error" not in p else "failed"))
    if "goodput" in report:
        g = report["goodput"]
        print(f"\ngoodput (req/s meeting the SLO; attainment %) — A: TTFT<=1s TPOT<=25ms, B: TTFT<=1s TPOT<=50ms")
        print(f"{'config':<16} {'rate':>6} {'A':>7} {'A %':>6} {'B':>7} {'B %':>6} {'TTFT p90':>9} {'TPOT p90':>9} "
              f"{'failed':>6}")
        for name, runs in g["configs"].items():
            for run in runs:
                a, b = run["A"], run["B"]
                print(f"{name:<16} {a['request_rate']:>6} {a['goodput']:7.2f} {100 * a['slo_attainment']:6.1f} "
                      f"{b['goodput']:7.2f} {100 * b['slo_attainment']:6.1f} {a['p90_ttft_ms']:9.0f} "
                      f"{a['p90_tpot_ms']:9.1f} {a['failed']:>6}")
        print("highest rate with >= 90 % attainment: " + "; ".join(
            f"{n} A {v['A']} B {v['B']}" for n, v in g["max_rate_at_90pct"].items()))
    if "tp" in report:
        from pdserve.services.bench_pd_tp import print_tp_report
        print_tp_report(report["tp"])
    if "load" in report:
        for name, s in report["load"].items():
            print(f"\nload {name}: {s['request_rate']} req/s x {s['num_requests']} requests: TTFT p90 "
                  f"{s['p90_ttft_ms']:.0f} ms, failed {s['failed']}, {s['request_throughput']:.1f} req/s done")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.bench_pd_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="handoff,greedy,plan,goodput", help=f"comma-separated of {PARTS}")
    p.add_argument("--out-dir", default=None, help="where the JSON and the logs go (the device's $OUT)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a small model (smoke test of the script)")
    p.add_argument("--prefill-gpu", default="0")
    p.add_argument("--decode-gpu", default="1")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--handoff-mb", type=int, default=256)
    p.add_argument("--handoff-backends", default="ucx,nccl")
    p.add_argument("--handoff-unmasked", action="store_true",
                   help="both handoff processes see both GPUs (default: one each, as the stack runs)")
    p.add_argument("--greedy-transport", default="nccl", choices=["tcp", "ucx", "nccl", "ipc"],
                   help="--kv-transport of the greedy part's 1P1D stack")
    p.add_argument("--greedy-prompts", type=int, default=4)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--tp-layouts", default="1:1,2:1,1:2,2:2",
                   help="tp part: prefill:decode tensor-parallel sizes, comma-separated")
    p.add_argument("--tp-share-gpus", action="store_true",
                   help="tp: run layouts that need more GPUs than visible with decode's ranks on the last GPUs, "
                        "beside prefill's (KV over ucx)")
    p.add_argument("--cpu-gpus", type=int, default=2,
                   help="tp with --device cpu: place the layouts as on this many GPUs (every rank runs on the cpu)")
    p.add_argument("--tp-ready-timeout", type=float, default=240.0,
                   help="tp: seconds the reference generate, and each stack's start, may take")
    p.add_argument("--tp-request-timeout", type=float, default=120.0, help="tp: seconds one greedy prompt may take")
    p.add_argument("--tp-budget-s", type=float, default=None,
                   help="tp: seconds for the whole part; a layout that would start after it is reported as not run "
                        "(set it below the call's time limit)")
    p.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 12, 16])
    p.add_argument("--requests-per-rate", type=int, default=40)
    p.add_argument("--goodput-seconds", type=float, default=None,
                   help="goodput: at least rate x this many requests per rate (a run long enough for queues to form)")
    p.add_argument("--input-len", type=int, default=1536, help="prompts 1024-2048 with --range-ratio 1/3")
    p.add_argument("--output-len", type=int, default=192, help="outputs 128-256 with --range-ratio 1/3")
    p.add_argument("--range-ratio", type=float, default=1 / 3)
    p.add_argument("--agg-chunks", type=int, nargs="+", default=[2048, 8192],
                   help="--max-num-batched-tokens of the aggregated engines, each a run")
    p.add_argument("--load-rate", type=float, default=100.0)
    p.add_argument("--client-processes", type=int, default=4,
                   help="goodput / load: client processes sending the requests (loadgen.run_load_processes)")
    p.add_argument("--load-seconds", type=float, default=20.0)
    p.add_argument("--load-transport", default="nccl", choices=["tcp", "ucx", "nccl", "ipc"],
                   help="load: the 1P1D stack's KV transport")
    p.add_argument("--load-targets", default="1p1d,serve", help="load: comma-separated of 1p1d, serve")
    p.add_argument("--load-decode-args", default="",
                   help="load: extra flags of the 1P1D stack's decode worker, e.g. \"--stream-interval-ms 20\"")
    p.add_argument("--load-router-args", default="",
                   help="load: extra flags of the 1P1D stack's router, e.g. \"--decode-streams per-request\"")
    p.add_argument("--write-model", default=None, metavar="FOLDER",
                   help="only write the dummy model folder and print its path (compose/gpu/run_stack.sh)")
    args = p.parse_args(argv)
    if args.write_model:
        print(write_model(args.write_model, args.tiny))
        return None
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    unknown = set(args.load_targets.split(",")) - {"1p1d", "serve"}
    if unknown:
        p.error(f"--load-targets: unknown {sorted(unknown)}; choose from 1p1d, serve")
    # a time limit's SIGTERM unwinds the part, whose `finally` stops the running stack (its own session)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    bench = Bench(args)
    start = time.perf_counter()
    for part in PARTS:
        if part in parts:
            t0 = time.perf_counter()
            print(f"==== {part} ====", flush=True)
            try:
                getattr(bench, part)()
            except Exception as e:  # one broken part must not lose the others' figures
                bench.report[part] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{part} failed: {e}", flush=True)
            except SystemExit:
                bench.report.setdefault("interrupted", part)
                bench.save()
                raise
            bench.report.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
            bench.save()
    print_report({k: v for k, v in bench.report.items() if not (isinstance(v, dict) and "error" in v)})
    for part in parts:
        if isinstance(bench.report.get(part), dict) and "error" in bench.report[part]:
            print(f"\n{part}: FAILED: {bench.report[part]['error'][:2000]}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; JSON in {bench.out_dir}/bench_pd_gpu.json")
    return bench.report


if __name__ == "__main__":
    main()

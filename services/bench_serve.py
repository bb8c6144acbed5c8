"""Serving benchmark of routing policies on one local disaggregated fleet, same run, same load.

    python -m pdserve.services.bench_serve --model M --prefill 2 --decode 2 --rate 1.0 \\
        --modes prefix round_robin --num-requests 48 --json-out result.json

Starts redis-server, the prefill and decode workers (real processes, as `pdserve up` does) and one
router per routing mode (`pdserve router --routing MODE`), all over the same workers. Then, for
`--rounds` rounds, each mode in turn (order alternating by round) sends the same shared-prefix
workload with Poisson arrivals at `--rate`:

    request i = system prompt p(i) (one of --num-prefixes, --prefix-len tokens each)
                + a fresh question (--question-len tokens), --max-tokens output, streamed

Requests are sent and timed by `pdserve bench serve`'s send_request (loadgen.py). Each pass gets
its own system prompts (same lengths and the same arrival times and prefix choices,
different tokens), so one pass cannot warm the caches for the next. Per mode: TTFT and
end-to-end latency percentiles measured by the client, and the prefix hit rate = prompt tokens
the computing instance had cached / prompt tokens (the router's /admin/stats counters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from pdserve.services.local_stack import free_port, redis_server_binary
from pdserve.services.loadgen import WorkloadRequest, percentile, send_request


class LocalFleet:
    """redis-server + workers + one router per mode, as subprocesses; `close()` stops them all."""

    def __init__(self, model: str | None, num_prefill: int, num_decode: int, worker_args: list[str]):
        self.tmp = tempfile.mkdtemp(prefix="pdserve-bench-serve-")
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._spawn("redis", [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"])
        self.model_args = ["--model", model] if model else []
        ready = []
        for role, count in (("prefill", num_prefill), ("decode", num_decode)):
            for i in range(count):
                rf = os.path.join(self.tmp, f"{role}-{i}.ready")
                ready.append(rf)
                self._spawn(f"{role}-{i}", [sys.executable, "-m", "pdserve.services.cli", role, "--redis-url",
                                            self.redis_url, "--instance-id", f"{role}-{i}", "--ready-file", rf,
                                            *self.model_args, *worker_args])
        deadline = time.time() + 600
        for rf in ready:
            while not os.path.exists(rf):
                if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                    self.close()
                    raise RuntimeError(f"a worker did not start; logs in {self.tmp}")
                time.sleep(0.2)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.tmp, name + ".log"), "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def start_router(self, mode: str, router_args: list[str]) -> str:
        port = free_port()
        self._spawn(f"router-{mode}", [sys.executable, "-m", "pdserve.services.cli", "router", "--redis-url",
                                       self.redis_url, "--port", str(port), "--routing", mode,
                                       "--served-model-name", "bench", *self.model_args, *router_args])
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"router {mode} did not start; logs in {self.tmp}")
            time.sleep(0.2)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def make_workload(args, pass_index: int) -> list[tuple[float, list[int]]]:
    """(arrival offset s, prompt token ids). Arrivals and prefix choices depend only on --seed;
    the prefix tokens also on the pass, so no pass runs on caches another one warmed."""
    shape = random.Random(args.seed)
    tokens = random.Random(args.seed * 1000 + pass_index + 1)
    prefixes = [[tokens.randrange(1000, 40000) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    workload, t = [], 0.0
    for _ in range(args.num_requests):
        t += shape.expovariate(args.rate)
        prefix = prefixes[shape.randrange(args.num_prefixes)]
        workload.append((t, prefix + [tokens.randrange(1000, 40000) for _ in range(args.question_len)]))
    return workload


async def run_mode(url: str, workload, max_tokens: int) -> dict:
    """One pass of a workload through one router: raw latencies and the router's counter deltas."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        before = (await client.get("/admin/stats")).json()
        start = time.perf_counter()

        async def one(offset: float, prompt: list[int]) -> tuple[float, float]:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            result = await send_request(client, "bench", WorkloadRequest(prompt, max_tokens, len(prompt)))
            if not result.ok:
                raise RuntimeError(f"request failed: {result.error}")
            return result.ttft_s, result.e2e_s
        results = await asyncio.gather(*(one(offset, prompt) for offset, prompt in workload))
        wall = time.perf_counter() - start
        after = (await client.get("/admin/stats")).json()
    delta = lambda key: {k: v - before[key].get(k, 0) for k, v in after[key].items()}  # noqa: E731
    return {"ttft": [r[0] for r in results], "e2e": [r[1] for r in results], "wall_s": wall,
            "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
            "cached_tokens": after["cached_prompt_tokens"] - before["cached_prompt_tokens"],
            "routes": delta("routes"), "requests_by_instance": delta("requests_by_instance")}


def summarize(passes: list[dict]) -> dict:
    ttfts = [t for p in passes for t in p["ttft"]]
    e2es = [t for p in passes for t in p["e2e"]]
    prompt_tokens = sum(p["prompt_tokens"] for p in passes)
    by_instance: dict[str, int] = {}
    for p in passes:
        for k, v in p["requests_by_instance"].items():
            by_instance[k] = by_instance.get(k, 0) + v
    return {"num_requests": len(ttfts), "passes": len(passes), "ttft_p50_s": _pct(ttfts, 50),
            "ttft_p90_s": _pct(ttfts, 90), "ttft_mean_s": round(statistics.fmean(ttfts), 4),
            "e2e_p50_s": _pct(e2es, 50), "e2e_p90_s": _pct(e2es, 90),
            "prefix_hit_rate": round(sum(p["cached_tokens"] for p in passes) / prompt_tokens, 4),
            "requests_by_instance": dict(sorted(by_instance.items())),
            "pass_ttft_p50_s": [_pct(p["ttft"], 50) for p in passes]}


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 4)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.bench_serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["prefix", "round_robin"], choices=["prefix", "load", "round_robin"])
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=200)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="passes per mode, alternating the order of modes")
    p.add_argument("--router-args", default="--disagg-min-prompt-tokens 0",
                   help="extra flags for every router (default: always disaggregate, so only routing differs)")
    p.add_argument("--worker-args", default="", help="extra flags for every worker")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    fleet = LocalFleet(args.model, args.prefill, args.decode, args.worker_args.split())
    try:
        urls = {mode: fleet.start_router(mode, args.router_args.split()) for mode in args.modes}
        passes: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        n = 0
        for r in range(args.rounds):  # modes alternate, so a drifting background load hits all alike
            for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
                passes[mode].append(asyncio.run(run_mode(urls[mode], make_workload(args, n), args.max_tokens)))
                n += 1
                print(f"round {r} {mode}: TTFT p50 {_pct(passes[mode][-1]['ttft'], 50)} s", flush=True)
    finally:
        fleet.close()
    results = {mode: summarize(runs) for mode, runs in passes.items()}
    for mode, result in results.items():
        print(f"{mode}: {json.dumps(result)}", flush=True)
    report = {"config": vars(args), "cpu_count": os.cpu_count(), "results": results}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""`pdserve bench serve`: drive any OpenAI completions endpoint and measure what users feel.

    pdserve bench serve --base-url http://127.0.0.1:8000 [--model NAME]
        --random-input-len 1024 --random-output-len 128 --random-range-ratio 0.5   (token-id prompts)
        | --dataset-path prompts.jsonl                                             (text prompts)
        --num-prompts 200 --request-rate 4 | --request-rates 1 2 4 8 [--max-concurrency 64]
        --goodput ttft:1000 tpot:25 [--output-json out.json]

    workload (seeded) --> arrivals: Poisson at the rate (inf: all at once), at most
    max_concurrency in flight --> POST /v1/completions, stream=true, ignore_eos, usage in the
    last chunk --> per request: TTFT, inter-token gaps, E2E, tokens --> summary per rate

Metrics follow vLLM's benchmark_serving: TTFT = first streamed chunk; ITL = gaps between
chunks; TPOT = (E2E - TTFT) / (output tokens - 1); E2E = request sent -> stream closed; each
as mean and p50/p90/p99 in ms. Throughput counts completed requests and their output tokens
over the run's wall time. Goodput (vLLM's `--goodput ttft:MS tpot:MS e2el:MS`) counts the
requests per second that met every given SLO; `slo_attainment` is their share, so "SLO p90 <=
X" holds at a rate where the attainment is >= 90 %. A request that fails (HTTP error, broken
stream, fewer tokens than asked with ignore_eos) counts as failed, never as a latency.

Random prompts are token-id lists (the completions API takes them: no tokenizer here); input and
output lengths are uniform in [L * (1 - ratio), L * (1 + ratio)]. A JSONL dataset has one object
per line: {"prompt": "...", "output_len": N} (output_len optional: --random-output-len).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str | list[int]
    output_len: int
    prompt_len: int | None = None  # known for token-id prompts; text prompts get it from usage


@dataclass
class RequestResult:
    ok: bool = False
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> list[WorkloadRequest]:
    """Token-id prompts of lengths uniform in input_len * [1 - ratio, 1 + ratio] (same for outputs)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(center: int) -> int:
        return rng.randint(max(1, math.floor(center * (1 - range_ratio))), max(1, math.ceil(center * (1 + range_ratio))))
    out = []
    for _ in range(num):
        n = length(input_len)
        out.append(WorkloadRequest([rng.randrange(100, vocab_size) for _ in range(n)], length(output_len), n))
    return out


def jsonl_requests(path: str, num: int, output_len: int) -> list[WorkloadRequest]:
    """The first num lines of a JSONL file of {"prompt": str, "output_len": int (optional)}."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{line_no}: expected {{\"prompt\": str, \"output_len\": int}}")
            out.append(WorkloadRequest(row["prompt"], int(row.get("output_len", output_len))))
            if len(out) == num:
                break
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson arrivals (inf: all at 0)."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def send_request(client, model: str, req: WorkloadRequest, ignore_eos: bool = True,
                       extra_body: dict | None = None) -> RequestResult:
    """One streamed /v1/completions request, timed from the send to the end of the stream."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
            **(extra_body or {})}
    result = RequestResult(prompt_tokens=req.prompt_len or 0)
    sent = time.perf_counter()
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
                if not data.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now
                chunks += 1
        result.e2e_s = time.perf_counter() - sent
    except Exception as e:  # a broken stream or connection is a failed request, not a crash
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
    if last is None:
        result.error = "the stream carried no token"
    elif ignore_eos and result.output_tokens < req.output_len:
        result.error = f"{result.output_tokens} tokens of the {req.output_len} asked with ignore_eos"
    result.ok = not result.error
    return result


async def run_load(base_url: str, model: str, requests: list[WorkloadRequest], rate: float,
                   max_concurrency: int | None, seed: int, ignore_eos: bool = True,
                   timeout_s: float = 600.0, api_key: str | None = None) -> tuple[list[RequestResult], float]:
    """Sends the requests at their Poisson arrival times (at most max_concurrency in flight);
    returns the results in request order and the wall time from the first send to the last end."""
    offsets = arrival_offsets(len(requests), rate, seed)
    return await _drive(base_url, model, list(zip(offsets, requests)), time.time(), max_concurrency, ignore_eos,
                        timeout_s, api_key)


async def _drive(base_url: str, model: str, scheduled: list[tuple[float, WorkloadRequest]], start_wall: float,
                 max_concurrency: int | None, ignore_eos: bool, timeout_s: float,
                 api_key: str | None) -> tuple[list[RequestResult], float]:
    """Each (offset, request) sent at start_wall + offset (time.time() seconds)."""
    import httpx

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limits = httpx.Limits(max_connections=max_concurrency or 10_000, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, headers=headers) as client:
        start = time.perf_counter() + (start_wall - time.time())

        async def one(offset: float, req: WorkloadRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if slots is None:
                return await send_request(client, model, req, ignore_eos)
            async with slots:
                return await send_request(client, model, req, ignore_eos)
        results = await asyncio.gather(*(one(o, r) for o, r in scheduled))
        return list(results), time.perf_counter() - start


def run_load_processes(base_url: str, model: str, requests: list[WorkloadRequest], rate: float,
                       max_concurrency: int | None, seed: int, processes: int = 1, ignore_eos: bool = True,
                       timeout_s: float = 600.0, api_key: str | None = None) -> tuple[list[RequestResult], float]:
    """run_load from `processes` client processes: the same arrival times, request i sent by
    process i % processes (each with max_concurrency / processes slots). One Python process
    parsing ~10,000 SSE events per second is itself a ceiling of the load it can drive."""
    if processes <= 1:
        return asyncio.run(run_load(base_url, model, requests, rate, max_concurrency, seed, ignore_eos,
                                    timeout_s, api_key))
    import concurrent.futures
    import multiprocessing

    offsets = arrival_offsets(len(requests), rate, seed)
    share = None if max_concurrency is None else max(1, math.ceil(max_concurrency / processes))
    start_wall = time.time() + 2.0  # the processes start (spawn, import httpx) before the first send
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        parts = [pool.submit(_drive_process, base_url, model, list(zip(offsets[i::processes], requests[i::processes])),
                             start_wall, share, ignore_eos, timeout_s, api_key) for i in range(processes)]
        outcomes = [part.result() for part in parts]
    results: list[RequestResult] = [None] * len(requests)  # type: ignore[list-item]
    for i, (part_results, _) in enumerate(outcomes):
        results[i::processes] = part_results
    return results, max(wall for _, wall in outcomes)


def _drive_process(*args) -> tuple[list[RequestResult], float]:
    return asyncio.run(_drive(*args))


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:1000", "tpot:25"] -> {"ttft": 1.0, "tpot": 0.025} (SLOs in seconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or ms <= 0:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC in {SLO_METRICS} and MS > 0, got {item!r}")
        slos[name] = ms / 1e3
    return slos


def meets(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2e_s}
    return r.ok and all(values[k] <= v for k, v in slos.items())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation as numpy's default; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall_s: float, slos: dict[str, float], rate: float,
              max_concurrency: int | None) -> dict:
    done = [r for r in results if r.ok]
    out = {"request_rate": "inf" if math.isinf(rate) else rate, "max_concurrency": max_concurrency,
           "num_requests": len(results), "completed": len(done), "failed": len(results) - len(done),
           "duration_s": round(wall_s, 3),
           "request_throughput": round(len(done) / wall_s, 4) if wall_s else 0.0,
           "input_throughput": round(sum(r.prompt_tokens for r in done) / wall_s, 2) if wall_s else 0.0,
           "output_throughput": round(sum(r.output_tokens for r in done) / wall_s, 2) if wall_s else 0.0,
           "total_input_tokens": sum(r.prompt_tokens for r in done),
           "total_output_tokens": sum(r.output_tokens for r in done)}
    series = {"ttft": [r.ttft_s for r in done], "tpot": [r.tpot_s for r in done if r.output_tokens > 1],
              "itl": [gap for r in done for gap in r.itl_s], "e2el": [r.e2e_s for r in done]}
    for name, values in series.items():
        out[f"mean_{name}_ms"] = round(1e3 * statistics.fmean(values), 3) if values else 0.0
        for q in (50, 90, 99):
            out[f"p{q}_{name}_ms"] = round(1e3 * percentile(values, q), 3)
    if slos:
        good = sum(meets(r, slos) for r in results)
        out["slos_ms"] = {k: v * 1e3 for k, v in slos.items()}
        out["goodput"] = round(good / wall_s, 4) if wall_s else 0.0
        out["slo_attainment"] = round(good / len(results), 4) if results else 0.0
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["errors"] = sorted(set(errors))[:5]
    return out


def print_summary(s: dict) -> None:
    print(f"---- rate {s['request_rate']} req/s, max concurrency {s['max_concurrency']} ----")
    print(f"requests {s['completed']} ok / {s['failed']} failed in {s['duration_s']:.2f} s: "
          f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
          f"{s['input_throughput']:.1f} input tok/s")
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(f"  {name.upper():<5} ms  mean {s[f'mean_{name}_ms']:9.2f}  p50 {s[f'p50_{name}_ms']:9.2f}  "
              f"p90 {s[f'p90_{name}_ms']:9.2f}  p99 {s[f'p99_{name}_ms']:9.2f}")
    if "goodput" in s:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in s["slos_ms"].items())
        print(f"  goodput {s['goodput']:.2f} req/s ({100 * s['slo_attainment']:.1f} % of requests met {slos})")
    for error in s.get("errors", []):
        print(f"  error: {error}")


def resolve_model(base_url: str, model: str | None, api_key: str | None = None) -> str:
    """--model, or the first model the endpoint lists."""
    if model:
        return model
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.get(base_url + "/v1/models", timeout=30, headers=headers).json()["data"][0]["id"]


def build_requests(args) -> list[WorkloadRequest]:
    if args.dataset_path:
        return jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len)
    return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, args.random_vocab_size, args.seed)


def add_parser(bsub) -> None:
    p = bsub.add_parser("serve", help="load an OpenAI endpoint: TTFT/TPOT/ITL/E2E, throughput, goodput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--request-rates", type=float, nargs="+", default=None,
                   help="a sweep: one run per rate, same workload (goodput vs rate)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--dataset-path", default=None, help="JSONL of {\"prompt\": text, \"output_len\": n}")
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens of a random request (mean)")
    p.add_argument("--random-output-len", type=int, default=128, help="output tokens of a random request (mean)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--random-vocab-size", type=int, default=32000, help="token ids of random prompts are below this")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS", help="SLOs, e.g. ttft:1000 tpot:25")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore_eos, so outputs have the asked length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--client-processes", type=int, default=1,
                   help="client processes sharing the arrivals (one Python client tops out near 100 streamed req/s)")
    p.add_argument("--output-json", default=None, help="write the report here")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> dict:
    from pdserve.common.config import ConfigError
    try:
        slos = parse_goodput(args.goodput)
        requests = build_requests(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise ConfigError("--num-prompts and --max-concurrency must be at least 1")
    if args.client_processes < 1:
        raise ConfigError(f"--client-processes must be at least 1, got {args.client_processes}")
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    model = resolve_model(base_url, args.model, args.api_key)
    rates = args.request_rates or [args.request_rate]
    runs = []
    for rate in rates:
        results, wall = run_load_processes(base_url, model, requests, rate, args.max_concurrency, args.seed,
                                           args.client_processes, args.ignore_eos, args.timeout, args.api_key)
        runs.append(summarize(results, wall, slos, rate, args.max_concurrency))
        print_summary(runs[-1])
    report = {"base_url": base_url, "model": model, "num_prompts": len(requests), "seed": args.seed,
              "dataset": args.dataset_path or {"random_input_len": args.random_input_len,
                                               "random_output_len": args.random_output_len,
                                               "random_range_ratio": args.random_range_ratio},
              "runs": runs}
    if len(runs) > 1 and slos:
        print("rate -> goodput: " + ", ".join(f"{r['request_rate']} -> {r['goodput']:.2f}" for r in runs))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


"""`pdserve bench`: measured numbers, never assertions; a progress bar, JSON and a PNG plot.

    pdserve bench throughput   offline: pdserve vs HF transformers static-batch `generate`
                               on the same prompts, in the same process, printed as a ratio;
                               plot: a bar per engine.
    pdserve bench latency      one batch of fixed-length prompts (fresh tokens per iteration, so
                               no prefix-cache hits) run to a fixed output length: end-to-end
                               latency percentiles, time to first token, time per output token;
                               plot: CDFs of end-to-end latency and TTFT over the iterations.
    pdserve bench gpu          the H100 workloads of bench_gpu.py (Llama-3-8B shape, vs HF).
    pdserve bench serve        any OpenAI endpoint at a request rate / concurrency: TTFT, TPOT,
                               ITL, E2E percentiles, throughput, goodput under SLOs (loadgen.py).
    pdserve bench structured   output tok/s with a JSON-schema grammar vs none (bench_structured.py).
    pdserve bench accuracy     perplexity and greedy agreement of quantized variants (accuracy.py).

Throughput workload (defaults, about a minute on a 2-core CPU with the packaged SmolLM2): 16
prompts of random lengths 16..256 tokens, each asking for a random 16..64 output tokens with
ignore_eos. A static batch must run every row to the longest request; only requested tokens
count as output for both engines.

Ctrl-C stops the run where it is: what was measured so far is printed, written to
--output-json and plotted, marked "interrupted": true (exit status 130).
Plots (services/bench_plots.py, the `bench` extra) go to --plot, by default next to
--output-json (x.json -> x.png).
"""

from __future__ import annotations

import json
import random
import time


def add_output_args(p) -> None:
    p.add_argument("--output-json", "--json-out", dest="output_json", default=None,
                   help="write the report here as JSON (--json-out: the older spelling)")
    p.add_argument("--plot", default=None, help="PNG plot path (default: --output-json with .png, if given)")


def check_output_args(args) -> None:
    """add_output_args' files: their folders exist before the run (common/config.check_output_path)."""
    from pdserve.common.config import check_output_path
    check_output_path(args.output_json, "--output-json")
    check_output_path(args.plot, "--plot")


def add_parser(sub, add_engine_args):
    """`pdserve bench throughput|latency|serve`; returns the subparsers for the other bench commands."""
    p = sub.add_parser("bench", help="benchmarks (throughput, latency, serve, gpu, structured, spec)")
    bsub = p.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("throughput", help="offline output tok/s: pdserve vs HF transformers")
    t.add_argument("--num-prompts", type=int, default=16, help="requests in the workload")
    t.add_argument("--input-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                   help="prompt length range in tokens (uniform)")
    t.add_argument("--output-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"),
                   help="output length range in tokens (uniform, ignore_eos)")
    t.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: all prompts)")
    t.add_argument("--skip-hf", action="store_true", help="measure pdserve only")
    t.add_argument("--workload-seed", type=int, default=0, help="seed of the prompt tokens and lengths")
    add_output_args(t)
    add_engine_args(t)
    t.set_defaults(func=cmd_throughput)
    lat = bsub.add_parser("latency", help="batch latency: end to end, time to first token, per output token")
    lat.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    lat.add_argument("--output-len", type=int, default=32, help="output tokens per request (ignore_eos)")
    lat.add_argument("--batch-size", type=int, default=1, help="requests run together per iteration")
    lat.add_argument("--num-iters-warmup", type=int, default=3, help="iterations run first and not counted")
    lat.add_argument("--num-iters", type=int, default=20, help="measured iterations")
    lat.add_argument("--workload-seed", type=int, default=0, help="seed of the prompt tokens")
    add_output_args(lat)
    add_engine_args(lat)
    lat.set_defaults(func=cmd_latency)
    from pdserve.services import loadgen; loadgen.add_parser(bsub)  # `pdserve bench serve` (any OpenAI endpoint)
    from pdserve.services import accuracy; accuracy.add_parser(bsub)  # `pdserve bench accuracy` (quantization)
    return bsub


def make_workload(num: int, input_len, output_len, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(num)]


class _Run:
    """One engine's tokens and seconds as they come: a tqdm bar, and a result even when Ctrl-C
    cut the run short (the time is counted up to the last measured progress)."""

    def __init__(self, engine: str, num_requests: int):
        from tqdm import tqdm
        self.engine = engine
        self.bar = tqdm(total=num_requests, desc=engine, unit="req", dynamic_ncols=True)
        self.t0 = self.t_last = time.perf_counter()
        self.tokens = self.done = 0
        self.interrupted = False

    def add(self, tokens: int, requests: int = 0) -> None:
        self.t_last = time.perf_counter()
        self.tokens += tokens
        self.done += requests
        self.bar.update(requests)
        self.bar.set_postfix_str(f"{self.tokens / max(self.t_last - self.t0, 1e-9):.1f} out tok/s", refresh=False)

    def result(self, **extra) -> dict:
        self.bar.close()
        wall = self.t_last - self.t0
        r = {"engine": self.engine, **extra, "wall_s": round(wall, 2), "output_tokens": self.tokens,
             "output_tok_per_s": round(self.tokens / wall, 1) if self.tokens else None,
             "requests_done": self.done}
        if self.interrupted:
            r["interrupted"] = True
        return r


def run_pdserve(llm, workload) -> dict:
    from pdserve.common.sampling_params import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in workload]
    llm.generate([{"prompt_token_ids": p} for p, _ in workload[:2]], params[:2], use_tqdm=False)  # warm-up
    run = _Run("pdserve", len(workload))
    for i, ((prompt, _), p) in enumerate(zip(workload, params)):
        llm.add_request(f"bench-{i}", prompt, p)
    seen: dict[str, int] = {}
    try:
        while llm.engine.has_unfinished():
            new = finished = 0
            for out in llm.step():
                num = len(out.outputs[0].token_ids)
                new, seen[out.request_id] = new + num - seen.get(out.request_id, 0), num
                finished += out.finished
            run.add(new, finished)
    except KeyboardInterrupt:
        run.interrupted = True
    return run.result()


def run_hf(llm, workload, batch_size: int | None) -> dict:
    """HF transformers static batches with left padding, greedy, no EOS stop, on the same weights
    (the engine's file loaded again on the CPU by the reference path: the engine's own may be
    packed for the CPU's GEMM library or live on a GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdserve.common.models.loader import load_model
    eng = llm.engine
    a = eng.arch
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings,
                      attention_bias=a.attention_bias)
    dtype = eng.runner.dtype
    hf = LlamaForCausalLM(cfg).to(dtype).eval()
    ref = load_model(eng.config.model, eng.model_path, a, eng.runner.block_size, eng.runner.max_model_len + 1, dtype,
                     torch.device("cpu"))
    hf.load_state_dict(_hf_state_dict(ref), strict=False)
    del ref
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    bs = batch_size or len(workload)
    run = _Run("hf-transformers", len(workload))
    try:
        with torch.inference_mode():
            for i in range(0, len(workload), bs):
                batch = workload[i:i + bs]
                width = max(len(p) for p, _ in batch)
                ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
                longest = max(m for _, m in batch)
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                            do_sample=False)
                run.add(sum(m for _, m in batch), len(batch))
    except KeyboardInterrupt:  # the batch that was running counts for nothing
        run.interrupted = True
    return run.result(batch_size=bs)


def _hf_state_dict(model) -> dict:
    """Our fused weights split back into HF names."""
    cfg = model.cfg
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, p in model.state_dict().items():
        if ".qkv_proj." in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), p.split([q, kv, kv])):
                out["model." + name.replace("qkv_proj", part)] = t
        elif ".gate_up_proj." in name:
            for part, t in zip(("gate_proj", "up_proj"), p.chunk(2)):
                out["model." + name.replace("gate_up_proj", part)] = t
        elif name.startswith("lm_head"):
            out[name] = p
        else:
            out["model." + name] = p
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def cmd_throughput(args) -> None:
    from pdserve.common.engine.llm import LLM
    from pdserve.common.config import ConfigError, engine_config
    if (args.tensor_parallel_size or 1) > 1 and not args.skip_hf:
        raise ConfigError("--tensor-parallel-size > 1 needs --skip-hf (the HF baseline runs one unsharded model)")
    if args.num_prompts < 1:
        raise ConfigError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    for flag, (low, high) in (("--input-len", args.input_len), ("--output-len", args.output_len)):
        if not 1 <= low <= high:
            raise ConfigError(f"{flag} MIN MAX needs 1 <= MIN <= MAX, got {low} {high}")
    check_output_args(args)
    llm = LLM.from_config(engine_config(args))
    workload = make_workload(args.num_prompts, args.input_len, args.output_len, llm.engine.arch.vocab_size,
                             args.workload_seed)
    results = []
    try:
        results.append(run_pdserve(llm, workload))
        if not args.skip_hf and not results[0].get("interrupted"):
            results.append(run_hf(llm, workload, args.hf_batch_size))
        interrupted = any(r.get("interrupted") for r in results)
    except KeyboardInterrupt:  # while warming up or building the HF model
        interrupted = True
    summary = {"model": llm.engine.model_name, "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
               "device": str(llm.engine.runner.device), "num_prompts": args.num_prompts,
               "input_len": args.input_len, "output_len": args.output_len, "results": results}
    rates = [r["output_tok_per_s"] for r in results]
    if len(rates) == 2 and all(rates):
        summary["speedup_vs_hf"] = round(rates[0] / rates[1], 2)
    for r in results:
        rate = "-" if r["output_tok_per_s"] is None else f"{r['output_tok_per_s']:8.1f}"
        print(f"{r['engine']:>16}: {rate} output tok/s  ({r['output_tokens']} tokens, {r['wall_s']} s"
              f"{', interrupted' if r.get('interrupted') else ''})")
    if "speedup_vs_hf" in summary:
        print(f"{'ratio':>16}: {summary['speedup_vs_hf']}x")

    def plot(path: str) -> str:
        from pdserve.services.bench_plots import bars
        return bars({r["engine"]: r["output_tok_per_s"] for r in results if r["output_tok_per_s"]}, path,
                    title=f"{summary['model']}: {args.num_prompts} prompts, output tok/s")
    report(summary, args, plot if any(rates) else None, interrupted)


def report(summary: dict, args, plot, interrupted: bool) -> None:
    """Print the summary as one JSON line, write --output-json and the plot; Ctrl-C'd runs are
    marked and end with KeyboardInterrupt (exit status 130) after everything is written."""
    if interrupted:
        summary["interrupted"] = True
        print("pdserve bench: interrupted; the report holds what was measured so far")
    print(json.dumps(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.output_json}")
    path = args.plot or (args.output_json.removesuffix(".json") + ".png" if args.output_json else None)
    if path and plot is not None:
        from pdserve.services.bench_plots import PlotUnavailable
        try:
            print(f"wrote {plot(path)}")
        except PlotUnavailable as e:
            print(f"pdserve bench: {e}")
    if interrupted:
        raise KeyboardInterrupt


def latency_iteration(engine, prompts: list[list[int]], output_len: int, tag: str) -> dict:
    """Run one batch to completion on the engine: (seconds end to end, to the first token, per
    output token after the first)."""
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    first, num_tokens = None, 0
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.new_token_ids for o in outs):
            first = time.perf_counter()
        num_tokens += sum(len(o.new_token_ids) for o in outs)
    end = time.perf_counter()
    steps = num_tokens // len(prompts) - 1  # tokens after the first, per request
    per_token = (end - first) / steps if steps > 0 else 0.0
    return {"latency_s": end - t0, "ttft_s": first - t0, "tpot_s": per_token}


def cmd_latency(args) -> None:
    from tqdm import tqdm

    from pdserve.common.config import ConfigError, engine_config
    from pdserve.common.engine.llm import LLM
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_output_args(args)
    llm = LLM.from_config(engine_config(args))
    engine = llm.engine
    if args.input_len + args.output_len > engine.max_model_len:  # every iteration would stop short
        raise ConfigError(f"--input-len + --output-len ({args.input_len + args.output_len}) exceed the model's "
                          f"context of {engine.max_model_len} tokens")
    rng = random.Random(args.workload_seed)
    vocab = engine.arch.vocab_size
    runs, interrupted = [], False
    bar = tqdm(total=args.num_iters_warmup + args.num_iters, desc="latency", unit="iter", dynamic_ncols=True)
    try:
        for it in range(args.num_iters_warmup + args.num_iters):
            prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.batch_size)]
            run = latency_iteration(engine, prompts, args.output_len, f"lat{it}")
            if it >= args.num_iters_warmup:
                runs.append(run)
            bar.set_postfix_str(("" if runs else "warm-up, ") + f"last {run['latency_s']:.2f} s", refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    summary = {"model": engine.model_name, "dtype": str(engine.runner.dtype).removeprefix("torch."),
               "device": str(engine.runner.device), "batch_size": args.batch_size, "input_len": args.input_len,
               "output_len": args.output_len, "iterations": len(runs), **latency_summary(runs)}
    if runs:
        print(f"batch {args.batch_size} x {args.input_len} prompt -> {args.output_len} tokens, {len(runs)} iterations: "
              f"avg {summary['avg_latency_s']} s (p50 {summary['p50_latency_s']}, p90 {summary['p90_latency_s']}), "
              f"TTFT {summary['avg_ttft_ms']} ms, {summary['avg_ms_per_output_token']} ms per output token")

    def plot(path: str) -> str:
        from pdserve.services.bench_plots import latency_cdf
        return latency_cdf({"end to end": summary["latencies_s"], "time to first token": summary["ttfts_s"]}, path,
                           title=f"{summary['model']}: batch {args.batch_size}, {args.input_len} -> "
                                 f"{args.output_len} tokens")
    report(summary, args, plot if runs else None, interrupted)


def latency_summary(runs: list[dict]) -> dict:
    """Percentiles and means of latency_iteration results, and the raw values (for plots)."""
    if not runs:
        return {"latencies_s": [], "ttfts_s": []}
    lat = sorted(r["latency_s"] for r in runs)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {"avg_latency_s": round(sum(lat) / len(lat), 4), "p50_latency_s": round(pct(0.5), 4),
            "p90_latency_s": round(pct(0.9), 4), "p99_latency_s": round(pct(0.99), 4),
            "avg_ttft_ms": round(1000 * sum(r["ttft_s"] for r in runs) / len(runs), 2),
            "avg_ms_per_output_token": round(1000 * sum(r["tpot_s"] for r in runs) / len(runs), 3),
            "latencies_s": [round(r["latency_s"], 5) for r in runs], "ttfts_s": [round(r["ttft_s"], 5) for r in runs]}

"""`pdserve plan`: measured advice on the prefill:decode instance ratio for a workload and an SLO.

    pdserve plan --model M --prompt-len 512 --output-len 128 --rate 4 --ttft 1.0 --tpot 0.05

1. Measure this model on this hardware with the offline engine (one instance's worth):
     prefill  a batch of distinct random prompts, max_tokens=1           -> prefill tokens/s
              one prompt alone (median of 3)                             -> its service time S
     decode   B sequences sharing one prompt (prefix cache: cheap prefill), then only decode
              steps are timed (median step), for B = 1, 2, 4, ...        -> step time t(B), B/t(B) tok/s
2. Size each pool (printed with the arithmetic):
     prefill  demand = rate * prompt_len * (1 - prefix_hit_rate)                     [tokens/s]
              utilisation u = min(max_utilization, 1 - S / TTFT)   (queueing: TTFT ~ S / (1 - u))
              prefill instances = ceil(demand / (prefill tok/s * u))
     decode   B* = the largest measured batch with t(B*) <= TPOT
              concurrency = rate * output_len * t(B*)          (Little's law: sequences in flight)
              decode instances = ceil(concurrency / (B* * max_utilization))

The model is deliberately simple (one number per pool, the same hardware for both, no KV-transfer
cost): a starting point to check with `pdserve bench serve`, not a guarantee.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("plan", help="measure prefill/decode speed here and recommend a P:D ratio for a workload")
    p.add_argument("--prompt-len", type=int, required=True, help="mean prompt tokens")
    p.add_argument("--output-len", type=int, required=True, help="mean output tokens")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--ttft", type=float, required=True, help="SLO: time to first token, seconds")
    p.add_argument("--tpot", type=float, required=True, help="SLO: time per output token, seconds")
    p.add_argument("--prefix-hit-rate", type=float, default=0.0, help="fraction of prompt tokens served from cache")
    p.add_argument("--max-utilization", type=float, default=0.8, help="busiest fraction a pool is planned at")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="prompt tokens in the measured prefill batch")
    p.add_argument("--decode-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="decode batch sizes to measure")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--json-out", default=None, help="also write the measurements and the plan as JSON here")
    add_engine_args(p)
    p.set_defaults(func=cmd_plan)


def measure_prefill(core, prompt_len: int, total_tokens: int, rng: random.Random) -> dict:
    """Prefill throughput (a batch of distinct prompts, first token only) and one prompt's latency."""
    from pdserve.common.sampling_params import SamplingParams
    vocab = core.arch.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompt = lambda: [rng.randrange(100, vocab) for _ in range(prompt_len)]  # noqa: E731

    def run(prompts: list[list[int]], tag: str) -> float:
        for i, ids in enumerate(prompts):
            core.add_request(f"plan-{tag}-{i}", ids, params)
        start = time.perf_counter()
        while core.has_unfinished():
            core.step()
        return time.perf_counter() - start

    run([prompt()], "warmup")
    alone_s = statistics.median(run([prompt()], f"alone{i}") for i in range(3))  # robust to a noisy neighbour
    num_prompts = max(2, total_tokens // prompt_len)
    batch_s = run([prompt() for _ in range(num_prompts)], "batch")
    return {"num_prompts": num_prompts, "tokens": num_prompts * prompt_len, "seconds": batch_s,
            "tok_s": num_prompts * prompt_len / batch_s, "alone_s": alone_s}


def measure_decode(core, context_len: int, batch_sizes: list[int], num_steps: int, rng: random.Random) -> list[dict]:
    """Step time of decode-only steps at each batch size (sequences share one prompt of context_len)."""
    from pdserve.common.sampling_params import SamplingParams
    prompt = [rng.randrange(100, core.arch.vocab_size) for _ in range(context_len)]
    block_size = core.kv.block_size
    params = SamplingParams(max_tokens=num_steps + 2, temperature=0, ignore_eos=True)
    rows = []
    for batch in sorted(set(batch_sizes)):
        own_blocks = math.ceil((context_len + num_steps + 2) / block_size) - context_len // block_size
        if batch > core.config.scheduler.max_num_seqs or \
                context_len // block_size + batch * own_blocks > core.kv.num_free_blocks:
            break  # the engine could not run this batch at once
        ids = [f"plan-decode-{batch}-{i}" for i in range(batch)]
        for rid in ids:
            core.add_request(rid, prompt, params)
        requests = [core.scheduler.requests[rid] for rid in ids]
        while core.has_unfinished() and not all(r.num_output_tokens >= 1 for r in requests):
            core.step()  # the (shared) prefill, not timed
        step_times = []
        for _ in range(num_steps):
            start = time.perf_counter()
            core.step()
            step_times.append(time.perf_counter() - start)
        step_s = statistics.median(step_times)  # robust to a noisy neighbour
        core.abort(ids)
        rows.append({"batch": batch, "step_s": step_s, "tok_s": batch / step_s})
    return rows


def recommend(prefill: dict, decode: list[dict], prompt_len: int, output_len: int, rate: float, ttft: float,
              tpot: float, prefix_hit_rate: float = 0.0, max_utilization: float = 0.8) -> dict:
    """The plan from measured numbers (pure: the test recomputes it). Returns counts, the steps
    as printable lines, and warnings when an SLO cannot be met on this hardware."""
    lines, warnings = [], []
    demand = rate * prompt_len * (1 - prefix_hit_rate)
    slo_util = 1 - prefill["alone_s"] / ttft
    util = min(max_utilization, slo_util)
    if util <= 0:
        warnings.append(f"TTFT {ttft} s is below one prompt's prefill time alone ({prefill['alone_s']:.4f} s): "
                        f"no number of instances meets it; planned at {max_utilization:.2f} utilisation")
        util = max_utilization
    num_prefill = max(1, math.ceil(demand / (prefill["tok_s"] * util)))
    lines += [f"prefill: demand = rate * prompt_len * (1 - hit) = {rate:g} * {prompt_len} * {1 - prefix_hit_rate:.2f}"
              f" = {demand:.1f} tok/s",
              f"         utilisation = min(max {max_utilization:.2f}, "
              f"1 - S/TTFT = 1 - {prefill['alone_s']:.4f}/{ttft:g} = {slo_util:.3f}) = {util:.3f}",
              f"         instances = ceil({demand:.1f} / ({prefill['tok_s']:.1f} * {util:.3f})) = {num_prefill}"]
    fitting = [row for row in decode if row["step_s"] <= tpot]
    if fitting:
        chosen = max(fitting, key=lambda row: row["batch"])
    else:
        chosen = min(decode, key=lambda row: row["batch"])
        warnings.append(f"TPOT {tpot} s is below the decode step time even at batch {chosen['batch']} "
                        f"({chosen['step_s']:.4f} s): no number of instances meets it; "
                        f"planned at batch {chosen['batch']}")
    concurrency = rate * output_len * chosen["step_s"]
    num_decode = max(1, math.ceil(concurrency / (chosen["batch"] * max_utilization)))
    lines += [f"decode:  largest measured batch with step time <= TPOT {tpot:g}: B* = {chosen['batch']} "
              f"({chosen['step_s'] * 1000:.2f} ms/step)",
              f"         concurrency = rate * output_len * step = {rate:g} * {output_len} * {chosen['step_s']:.5f}"
              f" = {concurrency:.2f} sequences",
              f"         instances = ceil({concurrency:.2f} / ({chosen['batch']} * {max_utilization:.2f}))"
              f" = {num_decode}"]
    return {"num_prefill": num_prefill, "num_decode": num_decode, "prefill_utilization": util,
            "decode_batch": chosen["batch"], "decode_step_s": chosen["step_s"], "concurrency": concurrency,
            "prefill_demand_tok_s": demand, "lines": lines, "warnings": warnings}


def cmd_plan(args) -> None:
    from pdserve.common.config import ConfigError
    from pdserve.common.engine.llm import LLM
    from pdserve.common.config import engine_config
    for name in ("prompt_len", "output_len", "rate", "ttft", "tpot"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.prefix_hit_rate < 1 or not 0 < args.max_utilization <= 1:
        raise ConfigError("--prefix-hit-rate must be in [0, 1) and --max-utilization in (0, 1]")
    core = LLM.from_config(engine_config(args)).engine
    if args.prompt_len + args.output_len > core.max_model_len:
        raise ConfigError(f"--prompt-len + --output-len ({args.prompt_len + args.output_len}) exceeds the "
                          f"model's context length {core.max_model_len}")
    rng = random.Random(0)
    prefill = measure_prefill(core, args.prompt_len, args.prefill_tokens, rng)
    decode = measure_decode(core, args.prompt_len, args.decode_batch_sizes, args.decode_steps, rng)
    if not decode:
        raise ConfigError("the KV cache cannot hold even one decode sequence of this length")
    plan = recommend(prefill, decode, args.prompt_len, args.output_len, args.rate, args.ttft, args.tpot,
                     args.prefix_hit_rate, args.max_utilization)
    print(f"measured ({args.device}, {core.model_name}, block size {core.kv.block_size}):")
    print(f"  prefill: {prefill['tokens']} tokens in {prefill['seconds']:.3f} s -> {prefill['tok_s']:.1f} tok/s; "
          f"one {args.prompt_len}-token prompt alone: S = {prefill['alone_s']:.4f} s")
    for row in decode:
        print(f"  decode batch {row['batch']:>3} (context {args.prompt_len}): {row['step_s'] * 1000:.2f} ms/step, "
              f"{row['tok_s']:.1f} tok/s")
    print(f"workload: {args.rate:g} req/s, prompt {args.prompt_len} tokens ({100 * args.prefix_hit_rate:.0f}% cached), "
          f"output {args.output_len} tokens; SLO: TTFT {args.ttft:g} s, TPOT {args.tpot:g} s")
    for line in plan["lines"]:
        print(line)
    for warning in plan["warnings"]:
        print(f"warning: {warning}")
    print(f"recommendation: {plan['num_prefill']} prefill : {plan['num_decode']} decode")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"prefill": prefill, "decode": decode, "plan": plan, "workload": {
                "prompt_len": args.prompt_len, "output_len": args.output_len, "rate": args.rate, "ttft": args.ttft,
                "tpot": args.tpot, "prefix_hit_rate": args.prefix_hit_rate,
                "max_utilization": args.max_utilization}}, f, indent=2)

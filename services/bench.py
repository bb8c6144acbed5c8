"""`pdserve bench`: measured numbers, never assertions.

    pdserve bench throughput   offline: pdserve vs HF transformers static-batch `generate`
                               on the same prompts, in the same process, printed as a ratio.
    pdserve bench latency      one batch of fixed-length prompts (fresh tokens per iteration, so
                               no prefix-cache hits) run to a fixed output length: end-to-end
                               latency percentiles, time to first token, time per output token.
    pdserve bench gpu          the H100 workloads of bench_gpu.py (Llama-3-8B shape, vs HF).

Workload (defaults): 64 prompts of random lengths 16..512 tokens, each asking for a random
16..128 output tokens with ignore_eos. A static batch must run every row to the longest request;
only requested tokens count as output for both engines.
"""

from __future__ import annotations

import json
import random
import time


def add_parser(sub, add_engine_args):
    """`pdserve bench throughput|latency`; returns the subparsers for the other bench commands."""
    p = sub.add_parser("bench", help="benchmarks (throughput, latency, gpu, spec)")
    bsub = p.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("throughput", help="offline output tok/s: pdserve vs HF transformers")
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    t.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    t.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: all prompts)")
    t.add_argument("--skip-hf", action="store_true")
    t.add_argument("--workload-seed", type=int, default=0)
    t.add_argument("--json-out", default=None)
    add_engine_args(t)
    t.set_defaults(func=cmd_throughput)
    lat = bsub.add_parser("latency", help="batch latency: end to end, time to first token, per output token")
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--num-iters-warmup", type=int, default=2)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--workload-seed", type=int, default=0)
    lat.add_argument("--json-out", default=None)
    add_engine_args(lat)
    lat.set_defaults(func=cmd_latency)
    return bsub


def make_workload(num: int, input_len, output_len, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(num)]


def run_pdserve(llm, workload) -> dict:
    from pdserve.common.sampling_params import SamplingParams
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "pdserve", "wall_s": round(wall, 2), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / wall, 1)}


def run_hf(llm, workload, batch_size: int | None) -> dict:
    """HF transformers static batches with left padding, greedy, no EOS stop, on the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    eng = llm.engine
    a = eng.arch
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings,
                      attention_bias=a.attention_bias)
    dtype = eng.runner.dtype
    hf = LlamaForCausalLM(cfg).to(dtype).eval()
    hf.load_state_dict(_hf_state_dict(eng.runner.model), strict=False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    bs = batch_size or len(workload)
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(workload), bs):
            batch = workload[i:i + bs]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            longest = max(m for _, m in batch)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False)
            tokens += sum(m for _, m in batch)
    wall = time.perf_counter() - t0
    return {"engine": "hf-transformers", "batch_size": bs, "wall_s": round(wall, 2), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / wall, 1)}


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
    from pdserve.common.config import engine_config
    llm = LLM.from_config(engine_config(args))
    workload = make_workload(args.num_prompts, args.input_len, args.output_len, llm.engine.arch.vocab_size,
                             args.workload_seed)
    results = [run_pdserve(llm, workload)]
    if not args.skip_hf:
        results.append(run_hf(llm, workload, args.hf_batch_size))
    summary = {"model": llm.engine.model_name, "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
               "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
               "results": results}
    if len(results) == 2:
        summary["speedup_vs_hf"] = round(results[0]["output_tok_per_s"] / results[1]["output_tok_per_s"], 2)
    for r in results:
        print(f"{r['engine']:>16}: {r['output_tok_per_s']:8.1f} output tok/s  ({r['output_tokens']} tokens, {r['wall_s']} s)")
    if "speedup_vs_hf" in summary:
        print(f"{'ratio':>16}: {summary['speedup_vs_hf']}x")
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)


def latency_iteration(engine, prompts: list[list[int]], output_len: int, tag: str) -> dict:
    """Run one batch to completion on the engine: (seconds end to end, to the first token, per
    output token after the first)."""
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.new_token_ids for o in outs):
            first = time.perf_counter()
    end = time.perf_counter()
    per_token = (end - first) / (output_len - 1) if output_len > 1 else 0.0
    return {"latency_s": end - t0, "ttft_s": first - t0, "tpot_s": per_token}


def cmd_latency(args) -> None:
    from pdserve.common.engine.llm import LLM
    from pdserve.common.config import engine_config
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pdserve bench latency: --{name.replace('_', '-')} must be at least 1")
    llm = LLM.from_config(engine_config(args))
    engine = llm.engine
    rng = random.Random(args.workload_seed)
    vocab = engine.arch.vocab_size
    runs = []
    for it in range(args.num_iters_warmup + args.num_iters):
        prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.batch_size)]
        run = latency_iteration(engine, prompts, args.output_len, f"lat{it}")
        if it >= args.num_iters_warmup:
            runs.append(run)
    lat = sorted(r["latency_s"] for r in runs)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    summary = {"model": engine.model_name, "dtype": str(engine.runner.dtype).removeprefix("torch."),
               "device": str(engine.runner.device), "batch_size": args.batch_size, "input_len": args.input_len,
               "output_len": args.output_len, "iterations": len(runs),
               "avg_latency_s": round(sum(lat) / len(lat), 4), "p50_latency_s": round(pct(0.5), 4),
               "p90_latency_s": round(pct(0.9), 4), "p99_latency_s": round(pct(0.99), 4),
               "avg_ttft_ms": round(1000 * sum(r["ttft_s"] for r in runs) / len(runs), 2),
               "avg_ms_per_output_token": round(1000 * sum(r["tpot_s"] for r in runs) / len(runs), 3)}
    print(f"batch {args.batch_size} x {args.input_len} prompt -> {args.output_len} tokens, {len(runs)} iterations: "
          f"avg {summary['avg_latency_s']} s (p50 {summary['p50_latency_s']}, p90 {summary['p90_latency_s']}), "
          f"TTFT {summary['avg_ttft_ms']} ms, {summary['avg_ms_per_output_token']} ms per output token")
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)


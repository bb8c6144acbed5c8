"""Tensor-parallel benchmarks on 2 GPUs (issue 12), one command that prints a table at the end:

    python -m pdserve.services.bench_tp [--phases 8b-tp1,8b-tp2,...] [--json-out FILE]
    python -m pdserve.services.bench_tp --cpu-smoke      # the same code on CPU, tiny shapes (CI-sized)
    python -m pdserve.services.bench_tp --phases 8b-tp1,8b-tp2-fused --graph-sampler-ab
        # each phase twice: greedy tail graphs on (as served) and off (`NAME+eager-sampler`)

Each phase runs in its own process (a clean GPU and torch.distributed group), in this order:

    8b-tp1 / 8b-tp2   Llama-3-8B shape (bench_gpu.LLAMA3_8B), bf16 dummy weights, TP=1 / TP=2:
                      batch-1 ms per output token (512 in, 256 out; bench_gpu's latency run) and
                      W1 (256 x 512 in / 128 out) output tok/s
    8b-tp2-symm       the same at TP=2 with ParallelConfig.all_reduce="symm_mem" (one-shot
                      all-reduce over NVLink peer memory for decode-sized tensors); its greedy
                      tokens are compared with 8b-tp2's (with 2 ranks a sum is exact either way)
    8b-tp2-fused      the same with all_reduce="fused" (all-reduce + residual add + RMSNorm in one
                      kernel over peer memory, kernels/allreduce_norm.py); tokens compared too
    70b-tp2           Llama-2-70B shape, bf16 dummy, TP=2: loads, batch-1 ms/token, W1 tok/s
    smollm2-tp1/-tp2  the packaged SmolLM2-135M GGUF (fp32; 9 heads / 3 KV heads: TP=2 splits
                      them 6 + 3): 32 prompts x 64 greedy tokens; agreement and first divergence

Floors (H100 / H200 figures; "-" on other cards): the batch-1 weight-read floor is the bytes of one
GPU's weight shard read once per token at the card's HBM bandwidth; the W1 floor is the prefill's
matmul FLOPs split over the GPUs at dense bf16 peak plus 127 decode steps each reading the shard
and the batch's KV at full bandwidth (no overlap, no other cost: a bound, not a prediction).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from pdserve.services.bench_gpu import LLAMA2_70B, LLAMA3_8B

PHASES = {  # name -> (model, tensor_parallel_size, all_reduce, timeout s)
    "8b-tp1": ("8b", 1, "nccl", 150), "8b-tp2": ("8b", 2, "nccl", 150), "8b-tp2-symm": ("8b", 2, "symm_mem", 150),
    "8b-tp2-fused": ("8b", 2, "fused", 150), "70b-tp2-fused": ("70b", 2, "fused", 270),
    "70b-tp2": ("70b", 2, "nccl", 270), "smollm2-tp1": ("smollm2", 1, "nccl", 90),
    "smollm2-tp2": ("smollm2", 2, "nccl", 90),
}
EAGER_SAMPLER = "+eager-sampler"  # a result name's suffix: run with --no-graph-sampler
CARDS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}  # HBM bytes/s, dense bf16 FLOP/s
TOPICS = ["the ocean", "a small village", "the history of Rome", "machine learning", "the moon landing",
          "a cup of coffee", "mountain climbing", "the stock market", "a rainy afternoon", "ancient Egypt",
          "the human heart", "electric cars", "a chess game", "the northern lights", "bread baking", "volcanoes"]
TEMPLATES = ["Write a short story about {}.", "Explain to a child what you know about {}."]


# ---- one phase (its own process) --------------------------------------------------------------------
def run_phase(name: str, cpu_smoke: bool = False, pdl: bool = True, graph_sampler: bool = True) -> dict:
    model, tp, all_reduce, _ = PHASES[name]
    if model == "smollm2":
        return _smollm2_phase(tp, cpu_smoke)
    from pdserve.services import bench_gpu
    shape = LLAMA3_8B if model == "8b" else LLAMA2_70B
    if cpu_smoke:
        shape = bench_gpu.TINY
    folder = tempfile.mkdtemp(prefix=f"pdserve-{model}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape, f)
    p = argparse.ArgumentParser()
    bench_gpu.add_args(p)
    args = p.parse_args(["all", "--tensor-parallel-size", str(tp), "--tp-all-reduce", all_reduce,
                         "--max-model-len", "4096"] + (["--device", "cpu", "--max-num-seqs", "8"] if cpu_smoke else [])
                         + ([] if pdl else ["--no-pdl"]) + ([] if graph_sampler else ["--no-graph-sampler"]))
    t0 = time.perf_counter()
    engine = bench_gpu.build_engine(args, folder)
    out = {"startup_s": round(time.perf_counter() - t0, 1),
           "kv_tokens": engine.runner.num_blocks * engine.runner.block_size,
           "cuda_graphs": engine.runner.graphs is not None}
    vocab = shape["vocab_size"]
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    w1 = bench_gpu.workloads("w1", 0, vocab, 0)["w1"]
    num_warm, latency_out = 24, 256
    if cpu_smoke:
        num_warm, latency_out, w1 = 2, 8, [(p[:64], 8) for p, _ in w1[:4]]
    bench_gpu.run_pdserve(engine, [(prompt(rng.randint(64, 1024)), 8) for _ in range(num_warm)], "warm")
    bench_gpu.run_latency_pdserve(engine, prompt(512), 8)
    out["latency"] = bench_gpu.run_latency_pdserve(engine, prompt(512), latency_out)
    out["w1"] = bench_gpu.run_pdserve(engine, w1, "w1")
    check = [prompt(n) for n in (7, 100, 300, 900)]
    out["greedy_tokens"] = _greedy(engine, check, 32)
    if cpu_smoke:
        engine.shutdown()
    return out  # on the GPU the phase process reports and exits at once (main): no teardown to wait for


def _greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"check-{i}", p, params)
    tokens: dict[str, list[int]] = {f"check-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():  # deltas
            tokens[o.request_id] += o.new_token_ids
    return list(tokens.values())


def _smollm2_phase(tp: int, cpu_smoke: bool) -> dict:
    from pdserve.common.engine.llm import LLM
    from pdserve.common.sampling_params import SamplingParams
    t0 = time.perf_counter()
    llm = LLM(device="cpu" if cpu_smoke else "cuda", tensor_parallel_size=tp, max_model_len=1024,
              gpu_memory_utilization=0.3, kv_cache_memory_gb=0.1)
    startup = round(time.perf_counter() - t0, 1)
    prompts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    params = SamplingParams(temperature=0, max_tokens=4 if cpu_smoke else 64, ignore_eos=True, logprobs=2)
    prompts = prompts[:2] if cpu_smoke else prompts
    outs = llm.generate(prompts, params, use_tqdm=False)
    if cpu_smoke:
        llm.shutdown()  # on the GPU the phase process exits right after reporting (main)
    return {"startup_s": startup, "tokens": [o.outputs[0].token_ids for o in outs],
            "top2": [[sorted((lp.logprob for lp in e.values()), reverse=True)[:2] for e in o.outputs[0].logprobs]
                     for o in outs]}


# ---- floors -------------------------------------------------------------------------------------------
def shard_weight_bytes(c: dict, tp: int, itemsize: int = 2) -> float:
    """Bytes of the weights one GPU reads per decode step (its shard of every matrix and the LM head)."""
    h, d, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    return (c["num_hidden_layers"] * per_layer + c["vocab_size"] * h) * itemsize / tp


def w1_floor_s(c: dict, tp: int, bandwidth: float, flops: float) -> float:
    h, d, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    matmul_params = shard_weight_bytes(c, 1) / 2
    num_seqs, prompt_len, out_len = 256, 512, 128
    attention = 2 * layers * c["num_attention_heads"] * d * prompt_len * prompt_len  # causal QK^T and PV
    prefill = (2 * matmul_params * prompt_len + attention) * num_seqs / tp / flops
    kv_per_token = 2 * layers * c["num_key_value_heads"] * d * 2 / tp
    decode = sum((shard_weight_bytes(c, tp) + num_seqs * (prompt_len + i) * kv_per_token) / bandwidth
                 for i in range(1, out_len))
    return prefill + decode


# ---- the orchestrator ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdserve.services.bench_tp", description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--no-pdl", action="store_true", help="every phase without programmatic dependent launch")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks this script, not speed")
    parser.add_argument("--no-graph-sampler", action="store_true",
                        help="every phase with the eager Sampler instead of the greedy tail graphs")
    parser.add_argument("--graph-sampler-ab", action="store_true",
                        help="each phase twice: greedy tail graphs on, then off (reported as NAME+eager-sampler)")
    args = parser.parse_args(argv)
    if args.phase:
        print("PHASE-RESULT " + json.dumps(run_phase(args.phase, args.cpu_smoke, not args.no_pdl,
                                                     not args.no_graph_sampler)), flush=True)
        os._exit(0)  # the rank processes notice the closed pipe and exit
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    results: dict = {}
    t_start = time.perf_counter()
    runs = [(name, args.no_graph_sampler) for name in args.phases.split(",")]
    if args.graph_sampler_ab:
        runs = [(name, off) for name in args.phases.split(",") for off in (False, True)]
    for phase, eager_sampler in runs:
        name = phase + (EAGER_SAMPLER if eager_sampler else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pdserve.services.bench_tp", "--phase", phase]
                                  + (["--cpu-smoke"] if args.cpu_smoke else []) + (["--no-pdl"] if args.no_pdl else [])
                                  + (["--no-graph-sampler"] if eager_sampler else []),
                                  capture_output=True, text=True, timeout=PHASES[phase][3] * (4 if args.cpu_smoke else 1))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PHASE-RESULT ")), None)
            results[name] = (json.loads(line.split(" ", 1)[1]) if line else
                             {"error": f"exit {proc.returncode}: " + proc.stderr.strip()[-1500:]})
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {PHASES[phase][3]} s"}
        results[name]["phase_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k not in ('tokens', 'top2', 'greedy_tokens')})}",
              flush=True)
    summary = {"card": card, "torch": torch.__version__, "cpu_smoke": args.cpu_smoke, "results": results,
               "total_s": round(time.perf_counter() - t_start, 1)}
    print_report(summary)
    print(json.dumps({**summary, "results": {k: {kk: vv for kk, vv in v.items()
                                                 if kk not in ("tokens", "top2", "greedy_tokens")}
                                             for k, v in results.items()}}))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)


def print_report(summary: dict) -> None:
    res = summary["results"]
    bandwidth, flops = next((v for k, v in CARDS.items() if k in summary["card"]), (None, None))
    print(f"\n== Tensor parallelism: {summary['card']}, torch {summary['torch']} ==")
    print(f"{'phase':<22} {'TP':>2} {'all-reduce':<10} {'start s':>7} {'KV tokens':>10} {'b1 ms/tok':>9} "
          f"{'floor ms':>8} {'% floor':>7} {'W1 tok/s':>9} {'W1 floor':>9}")
    for name, r in res.items():
        model, tp, all_reduce, _ = PHASES[name.removesuffix(EAGER_SAMPLER)]
        if "error" in r:
            print(f"{name:<22} {tp:>2} {all_reduce:<10} ERROR: {r['error'][-400:]}")
            continue
        if model == "smollm2":
            continue
        shape = LLAMA3_8B if model == "8b" else LLAMA2_70B
        if summary.get("cpu_smoke"):
            from pdserve.services.bench_gpu import TINY as shape
        ms = r["latency"]["ms_per_output_token"]
        floor = f"{1000 * shard_weight_bytes(shape, tp) / bandwidth:.2f}" if bandwidth else "-"
        pct = f"{100 * float(floor) / ms:.0f}%" if bandwidth else "-"
        w1_floor = f"{32768 / w1_floor_s(shape, tp, bandwidth, flops):.0f}" if bandwidth else "-"
        print(f"{name:<22} {tp:>2} {all_reduce if tp > 1 else '-':<10} {r['startup_s']:>7} {r['kv_tokens']:>10} "
              f"{ms:>9} {floor:>8} {pct:>7} {r['w1']['output_tok_per_s']:>9} {w1_floor:>9}")
    two = res.get("8b-tp2", {})
    for variant in ("symm", "fused"):
        other = res.get(f"8b-tp2-{variant}", {})
        if "greedy_tokens" in other and "greedy_tokens" in two:
            same = other["greedy_tokens"] == two["greedy_tokens"]
            print(f"8B TP=2 greedy tokens, {variant} vs nccl all-reduce (4 prompts x 32): "
                  f"{'identical' if same else 'DIFFER'}")
    for suffix in ("", EAGER_SAMPLER):  # every 8B TP=2 phase against TP=1 of the same sampler
        one = res.get("8b-tp1" + suffix, {})
        for name, r in res.items():
            if (name.endswith(suffix) if suffix else EAGER_SAMPLER not in name) and "latency" in one and \
                    "latency" in r and PHASES[name.removesuffix(EAGER_SAMPLER)][:2] == ("8b", 2):
                print(f"{name} vs 8b-tp1{suffix}: batch-1 ms/token "
                      f"x{r['latency']['ms_per_output_token'] / one['latency']['ms_per_output_token']:.2f} (target <= 0.60), "
                      f"W1 tok/s x{r['w1']['output_tok_per_s'] / one['w1']['output_tok_per_s']:.2f} (target >= 1.60)")
    for name, r in res.items():  # the tail must not change a greedy token
        other = res.get(name + EAGER_SAMPLER, {})
        if "greedy_tokens" in r and "greedy_tokens" in other:
            print(f"{name} greedy tokens, tail graphs vs eager Sampler (4 prompts x 32): "
                  f"{'identical' if r['greedy_tokens'] == other['greedy_tokens'] else 'DIFFER'}")
    s1, s2 = res.get("smollm2-tp1", {}), res.get("smollm2-tp2", {})
    if "tokens" in s1 and "tokens" in s2:
        print(smollm2_agreement(s1, s2))
    print(f"total {summary['total_s']} s")


def smollm2_agreement(one: dict, two: dict) -> str:
    """Sequences equal, tokens equal before each sequence's first divergence, and the first
    divergence with TP=1's top-2 logprob gap there (a near tie explains a flip from rounding)."""
    pairs = list(zip(one["tokens"], two["tokens"]))
    equal = sum(a == b for a, b in pairs)
    agree = total = 0
    first = None
    for i, (a, b) in enumerate(pairs):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree, total = agree + k, total + len(a)
        if k < len(a) and first is None:
            gap = one["top2"][i][k][0] - one["top2"][i][k][1] if len(one["top2"][i][k]) == 2 else None
            first = f"prompt {i} token {k}: TP=1 top-2 logprob gap {gap:.4f}" if gap is not None else f"prompt {i} token {k}"
    return (f"SmolLM2 GGUF TP=2 vs TP=1 ({len(pairs)} prompts x {len(pairs[0][0])} greedy tokens): "
            f"{equal}/{len(pairs)} sequences identical, "
            f"{agree}/{total} tokens agree before the first divergence" + (f"; first divergence {first}" if first else ""))


if __name__ == "__main__":
    main()

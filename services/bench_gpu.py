"""GPU benchmarks (issue 3): pdserve vs HF transformers on a Llama-3-8B-shaped model, dummy weights.

    python -m pdserve.services.bench_gpu {w1,w2,latency,all} [--hf] [--hf-max-seconds 120] [--w2-requests 1000]
                                         [--quantization fp8|awq|gptq] [--kv-cache-dtype fp8] [--shape llama2-70b]
    pdserve bench gpu {w1,w2,latency,all} ...                  (the same, through the CLI)

--quantization awq|gptq draws random int4 weights directly in that format (group 128) on the GPU;
fp8 quantizes the random bf16 weights at load. `bench_quant.py` runs the quantization table.

Workloads (random token-id prompts, greedy, ignore_eos, seed 0):
    W1       256 requests x 512 prompt tokens x 128 output tokens
    W2       --w2-requests requests, prompt ~ U[64, 2048], output ~ U[32, 512]
    latency  one request of 512 prompt tokens and 256 output tokens (--latency-tokens): TTFT and ms per output token

The model is a config.json written to a temp folder (hidden 4096, 32 layers, 32/8 heads,
intermediate 14336, vocab 128256, rope theta 500000, bf16), loaded with `--load-format dummy`
and no tokenizer. HF transformers runs the *same* weights (its parameters are zero-copy views
of pdserve's fused tensors, after pdserve's KV cache is freed) as static batches: left padding,
every row runs to the batch's longest request, only requested tokens count. W1 runs as one batch
of 256; W2 tries a few batch sizes in arrival order within --hf-max-seconds and keeps the best;
when the cap stops it early, its tok/s is measured on the batches it ran (printed as such).

Printed: a results table, a breakdown (decode-only / mixed / prefill-only step time, tokens per
step, CUDA-graph steps, host time outside the forward pass; GPU kernel time by category from
torch.profiler on a prefill window and a decode window), then one JSON line.
Imports of torch / transformers stay inside functions (the CLI imports this module).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False, "dtype": "bfloat16",
    "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
}
LLAMA2_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}
TINY = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096}
SHAPES = {"llama3-8b": LLAMA3_8B, "llama2-70b": LLAMA2_70B}
KERNEL_CATEGORIES = (  # (category, substrings of kernel names), first match wins
    ("attention", ("_decode_split_kernel", "_merge_splits_kernel", "_prefill_kernel", "_store_kv_kernel")),
    ("norm/rope/silu", ("_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel")),
    ("quantized gemm", ("_int_gemv_kernel", "_fp8_gemv_kernel", "_int_gemm_kernel", "_int_dequant_kernel",
                        "_quantize_per_token_kernel")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "splitk")),
)


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("gpu", help="H100: W1 / W2 / latency on a Llama-3-8B-shaped dummy model vs HF")
    add_args(p)
    p.set_defaults(func=main_args)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["w1", "w2", "latency", "all"], help="workload to run (all: each in turn)")
    p.add_argument("--hf", action="store_true", help="also run HF transformers on the same weights")
    p.add_argument("--hf-max-seconds", type=float, default=120.0, help="time cap of HF on W2 (measured subset)")
    p.add_argument("--hf-w2-batch-sizes", default="64,128", help="HF static batch sizes tried on W2")
    p.add_argument("--w2-requests", type=int, default=1000, help="requests of the mixed workload W2")
    p.add_argument("--latency-tokens", type=int, default=256,
                   help="output tokens of the latency request (longer: time to attach a sampling profiler)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests in a batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step at most")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlapped steps (default: on CUDA)")
    p.add_argument("--compare-sync", action="store_true",
                   help="also run W1 and latency with steps one at a time (same engine, same run)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler kernel breakdown")
    p.add_argument("--seed", type=int, default=0, help="seed of the dummy weights and the workloads")
    p.add_argument("--json-out", default=None, help="also write the report to this JSON file")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (smoke test)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs the model is split over")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch of the decode kernels (kernels/pdl.py); --no-pdl for an A/B")
    p.add_argument("--graph-sampler", action=argparse.BooleanOptionalAction, default=True,
                   help="plain-greedy steps sampled in a tail CUDA graph (engine/greedy_tail.py); "
                        "--no-graph-sampler: the eager Sampler, for an A/B")
    p.add_argument("--tp-all-reduce", default="nccl", choices=["nccl", "symm_mem", "fused", "auto"],
                   help="tensor-parallel all-reduce (ParallelConfig.all_reduce)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="model shape of the dummy weights")
    p.add_argument("--quantization", default=None, choices=["fp8", "awq", "gptq"],
                   help="weights: fp8 (quantized at load) or random int4 drawn in the awq / gptq format")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: e4m3 KV cache")
    p.add_argument("--quantized-lm-head", action="store_true",
                   help="with --quantization gptq: the LM head int4 too (a GPTQ config with lm_head: true)")


def write_shape(shape: dict) -> str:
    """A folder holding only config.json (dummy weights need no more)."""
    folder = tempfile.mkdtemp(prefix="pdserve-shape-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape, f, indent=2)
    return folder


# ---- workloads ----------------------------------------------------------------------------------
def workloads(which: str, num_w2: int, vocab: int, seed: int,
              latency_tokens: int = 256) -> dict[str, list[tuple[list[int], int]]]:
    rng = random.Random(seed)
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    out = {}
    if which in ("w1", "all"):
        out["w1"] = [(prompt(512), 128) for _ in range(256)]
    if which in ("w2", "all"):
        out["w2"] = [(prompt(rng.randint(64, 2048)), rng.randint(32, 512)) for _ in range(num_w2)]
    if which in ("latency", "all"):
        out["latency"] = [(prompt(512), latency_tokens)]
    return out


# ---- pdserve ------------------------------------------------------------------------------------
def build_engine(args, folder: str):
    from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from pdserve.common.engine.engine_core import EngineCore
    config = EngineConfig(
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, all_reduce=args.tp_all_reduce),
        model=ModelConfig(model=folder, dtype="bfloat16", max_model_len=args.max_model_len, load_format="dummy",
                          device=args.device, seed=args.seed, quantization=getattr(args, "quantization", None),
                          pdl=getattr(args, "pdl", True), graph_sampler=getattr(args, "graph_sampler", True)),
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto")),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    return EngineCore(config, load_tokenizer_=False)


class StepRecorder:
    """Wraps runner.launch: per step (tokens, decode tokens, requests) and when the device ran it.

    Events are recorded on the stream before and after each launch. With overlapped steps the
    device starts step k at max(its launch event, the end of step k-1), so a step's busy time is
    end_k - that start, and the device's idle time (host-bound gaps) is wall - sum(busy). On CPU
    host clocks stand in for events (a CPU step runs inside its launch)."""

    def __init__(self, runner):
        import torch
        self._cuda = runner.device.type == "cuda"
        self._event_cls = torch.cuda.Event if self._cuda else None
        self._sync = device_sync(runner.device)
        self._launch = runner.launch
        runner.launch = self
        self.steps: list[tuple] = []

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = self._event_cls(enable_timing=True)
        event.record()
        return event

    def __call__(self, sched, *args):
        start = self._mark()
        pending = self._launch(sched, *args)  # (sched, structured outputs) as the engine calls it
        end = self._mark()
        num_decodes = sum(1 for s in sched.scheduled if s.num_tokens == 1)
        self.steps.append((sched.num_batched_tokens, num_decodes, len(sched.scheduled), start, end))
        return pending

    def busy(self) -> list[tuple[int, int, int, float]]:
        """(tokens, decode tokens, requests, device-busy seconds) per step."""
        self._sync()
        if not self.steps:
            return []
        origin = self.steps[0][3]
        at = ((lambda m: 1e-3 * origin.elapsed_time(m)) if self._cuda else (lambda m: m - origin))
        out, prev_end = [], float("-inf")
        for num_tokens, num_decodes, num_reqs, start, end in self.steps:
            begin, finish = max(at(start), prev_end), at(end)
            out.append((num_tokens, num_decodes, num_reqs, finish - begin))
            prev_end = finish
        return out


def run_pdserve(engine, workload, tag: str, recorder: StepRecorder | None = None) -> dict:
    from pdserve.common.sampling_params import SamplingParams
    if recorder is not None:
        recorder.steps.clear()
    graphs = engine.runner.graphs
    replays0 = graphs.num_replays if graphs is not None else 0
    overlapped0 = engine.num_overlapped_steps
    t0 = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(workload):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
    wall = time.perf_counter() - t0
    result = {"requests": len(workload), "output_tokens": tokens, "wall_s": round(wall, 2),
              "output_tok_per_s": round(tokens / wall, 1)}
    if recorder is not None:
        result["steps"] = summarize_steps(recorder.busy(), wall)
        result["steps"]["cuda_graph_steps"] = (graphs.num_replays if graphs is not None else 0) - replays0
        result["steps"]["overlapped_steps"] = engine.num_overlapped_steps - overlapped0
    return result


def summarize_steps(steps, wall: float) -> dict:
    kinds = {"decode_only": [], "mixed": [], "prefill_only": []}
    for num_tokens, num_decodes, num_reqs, secs in steps:
        kind = "decode_only" if num_decodes == num_reqs else ("prefill_only" if num_decodes == 0 else "mixed")
        kinds[kind].append((num_tokens, num_reqs, secs))
    out = {"num_steps": len(steps), "device_busy_s": round(sum(s[3] for s in steps), 2)}
    out["device_idle_s"] = round(wall - out["device_busy_s"], 2)
    for kind, rows in kinds.items():
        secs = sum(r[2] for r in rows)
        out[kind] = {"steps": len(rows), "seconds": round(secs, 2),
                     "tokens_per_step": round(sum(r[0] for r in rows) / len(rows), 1) if rows else 0,
                     "ms_per_step": round(1000 * secs / len(rows), 2) if rows else 0}
    return out


def run_latency_pdserve(engine, prompt: list[int], max_tokens: int) -> dict:
    from pdserve.services.bench import latency_iteration  # `pdserve bench latency`'s measurement
    run = latency_iteration(engine, [prompt], max_tokens, "latency")
    return {"ttft_ms": round(1000 * run["ttft_s"], 2), "ms_per_output_token": round(1000 * run["tpot_s"], 3),
            "total_s": round(run["latency_s"], 3)}


def device_sync(device):
    import torch
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def kernel_breakdown(engine, vocab: int, seed: int) -> dict:
    """GPU kernel time by category in a prefill window (16 x 2048-token prompts) and a decode
    window (32 steps of 128 sequences at ~1,000 tokens of context), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from pdserve.common.sampling_params import SamplingParams
    rng = random.Random(seed + 1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    result = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(16):
            engine.add_request(f"prof-p{i}", [rng.randrange(100, vocab) for _ in range(2048)],
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        device_sync(engine.runner.device)()
    result["prefill_window"] = _categorize(prof)
    for i in range(128):
        engine.add_request(f"prof-d{i}", [rng.randrange(100, vocab) for _ in range(1000)], params)
    while engine.scheduler.num_waiting() or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(32):
            engine.step()
        device_sync(engine.runner.device)()
    result["decode_window"] = _categorize(prof)
    while engine.has_unfinished():
        engine.step()
    engine.add_request("prof-b1", [rng.randrange(100, vocab) for _ in range(512)], params)
    for _ in range(4):
        engine.step()
    steps = 32
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        device_sync(engine.runner.device)()
    result["batch1_window"] = _categorize(prof, steps)
    while engine.has_unfinished():
        engine.step()
    return result


def _categorize(prof, steps: int | None = None) -> dict:
    """GPU time by category and the top kernels (name, total ms, calls, mean us); with `steps`,
    also the GPU time and kernel count per step."""
    from torch.autograd import DeviceType
    totals: dict[str, float] = {}
    by_kernel: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        us = evt.device_time_total
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in evt.name for k in keys)), "other")
        totals[cat] = totals.get(cat, 0.0) + us
        entry = by_kernel.setdefault(evt.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total = sum(totals.values()) or 1.0
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:12 if steps else 6]
    out = {"gpu_ms": round(total / 1000, 1),
           "share": {c: round(v / total, 3) for c, v in sorted(totals.items(), key=lambda kv: -kv[1])},
           "top_kernels": [(name[:60], round(us / 1000, 2), n, round(us / n, 1)) for name, (us, n) in top]}
    if steps:
        out["gpu_ms_per_step"] = round(total / 1000 / steps, 3)
        out["kernels_per_step"] = round(sum(n for _, n in by_kernel.values()) / steps, 1)
    return out


def release_kv(engine) -> None:
    """Free pdserve's KV cache and CUDA graphs; the weights stay for HF to share."""
    import gc

    import torch
    engine.runner.graphs = None
    engine.runner.kv_cache, engine.runner.kv_caches = None, []
    gc.collect()
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- HF transformers ------------------------------------------------------------------------------
def hf_sharing_weights(model):
    """An HF LlamaForCausalLM whose parameters are views of pdserve's (fused) ones: zero copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdserve.services.bench import _hf_state_dict
    a = model.cfg
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                      num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
                      rope_theta=a.rope_theta, max_position_embeddings=a.max_position_embeddings,
                      tie_word_embeddings=a.tie_word_embeddings, attention_bias=a.attention_bias,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(_hf_state_dict(model), strict=True, assign=True)
    device = next(model.parameters()).device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(device)
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    assert not meta, f"HF tensors left on meta: {meta[:3]}"
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def hf_generate_batch(hf, batch) -> float:
    """One static batch (left padded) to its longest request; returns seconds."""
    import torch
    device = hf.device
    sync = device_sync(device)
    width = max(len(p) for p, _ in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
    longest = max(m for _, m in batch)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        # no EOS token (generation_config), so every row runs to `longest`
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, do_sample=False)
    sync()
    return time.perf_counter() - t0


def run_hf(hf, workload, batch_sizes: list[int], max_seconds: float | None) -> dict:
    """Best static batch size; each size runs batches in order until its share of the cap is spent."""
    import torch
    best, tried = None, []
    for bs in batch_sizes:
        num_batches = -(-len(workload) // bs)
        spent, tokens, done = 0.0, 0, 0
        try:
            for i in range(0, len(workload), bs):
                batch = workload[i:i + bs]
                spent += hf_generate_batch(hf, batch)
                tokens += sum(m for _, m in batch)
                done += 1
                if max_seconds is not None and spent > max_seconds / len(batch_sizes):
                    break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            tried.append({"batch_size": bs, "error": "CUDA out of memory"})
            continue
        r = {"batch_size": bs, "batches_run": done, "batches_total": num_batches, "output_tokens": tokens,
             "wall_s": round(spent, 2), "output_tok_per_s": round(tokens / spent, 1)}
        tried.append(r)
        if best is None or r["output_tok_per_s"] > best["output_tok_per_s"]:
            best = r
    return {**(best or {"output_tok_per_s": 0.0}), "tried": tried}


def run_latency_hf(hf, prompt: list[int], max_tokens: int) -> dict:
    one = hf_generate_batch(hf, [(prompt, 1)])
    full = hf_generate_batch(hf, [(prompt, max_tokens)])
    return {"ttft_ms": round(1000 * one, 2), "ms_per_output_token": round(1000 * (full - one) / (max_tokens - 1), 3),
            "total_s": round(full, 3)}


# ---- main ---------------------------------------------------------------------------------------
def main_args(args) -> dict:
    import torch
    import transformers
    import triton
    t_start = time.perf_counter()
    if args.hf and args.tensor_parallel_size > 1:
        raise SystemExit("bench gpu: --hf compares one GPU's weights; it does not run with --tensor-parallel-size")
    shape = TINY if args.tiny else SHAPES[args.shape]
    if getattr(args, "quantized_lm_head", False):
        if args.quantization != "gptq":
            raise SystemExit("bench gpu: --quantized-lm-head goes with --quantization gptq")
        shape = {**shape, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False,
                                                  "desc_act": False, "checkpoint_format": "gptq", "lm_head": True}}
    folder = write_shape(shape)
    vocab = shape["vocab_size"]
    loads = workloads(args.which, args.w2_requests, vocab, args.seed, args.latency_tokens)
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    summary: dict = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "shape": "tiny" if args.tiny else args.shape,
                     "weights": (args.quantization or "bf16") + (" + int4 head" if getattr(
                         args, "quantized_lm_head", False) else ""),
                     "kv_cache": "fp8" if args.kv_cache_dtype == "fp8" else "bf16"}

    t0 = time.perf_counter()
    engine = build_engine(args, folder)
    summary["startup_s"] = round(time.perf_counter() - t0, 1)
    summary["cuda_graphs"] = engine.runner.graphs is not None
    summary["kv_blocks"] = engine.runner.num_blocks
    summary["kv_tokens"] = engine.runner.num_blocks * engine.runner.block_size
    summary["gemv_choice"] = engine.runner.gemv_choice
    print(f"engine up in {summary['startup_s']} s: {summary['kv_tokens']} KV tokens", flush=True)
    recorder = StepRecorder(engine.runner)
    t0 = time.perf_counter()
    warm_rng = random.Random(args.seed + 7)  # compiles the kernel variants of mixed / chunked steps
    warm = [([warm_rng.randrange(100, vocab) for _ in range(warm_rng.randint(64, 2048))], 8) for _ in range(24)]
    run_pdserve(engine, warm, "warm")
    run_latency_pdserve(engine, warm[0][0], 8)
    summary["warmup_s"] = round(time.perf_counter() - t0, 1)

    results: dict = {}
    for name in ("w1", "w2"):
        if name in loads:
            results[name] = {"pdserve": run_pdserve(engine, loads[name], name, recorder)}
            _progress(f"{name} pdserve", results[name]["pdserve"])
    if "latency" in loads:
        prompt, n = loads["latency"][0]
        results["latency"] = {"pdserve": run_latency_pdserve(engine, prompt, n)}
        _progress("latency pdserve", results["latency"]["pdserve"])
    if args.compare_sync and engine.async_scheduling:
        engine.async_scheduling = False  # the same engine and weights, steps one at a time
        if "w1" in loads:
            results["w1"]["pdserve_one_step_at_a_time"] = run_pdserve(engine, loads["w1"], "w1s", recorder)
            _progress("w1 pdserve one step at a time", results["w1"]["pdserve_one_step_at_a_time"])
        if "latency" in loads:
            prompt, n = loads["latency"][0]
            results["latency"]["pdserve_one_step_at_a_time"] = run_latency_pdserve(engine, prompt, n)
            _progress("latency pdserve one step at a time", results["latency"]["pdserve_one_step_at_a_time"])
        engine.async_scheduling = True
    if not args.no_profile:
        try:
            summary["kernel_breakdown"] = kernel_breakdown(engine, vocab, args.seed)
        except Exception as e:  # the breakdown is informative; never lose the run for it
            summary["kernel_breakdown"] = {"error": f"{type(e).__name__}: {e}"}

    if args.hf:
        release_kv(engine)
        hf = hf_sharing_weights(engine.runner.model)
        hf_generate_batch(hf, [(loads.get("latency", [([5] * 64, 4)])[0][0][:64], 4)] * 2)  # warm-up
        if "w1" in loads:
            results["w1"]["hf"] = run_hf(hf, loads["w1"], [256], None)
            if "batch_size" not in results["w1"]["hf"]:  # out of memory: two batches of 128
                results["w1"]["hf"] = run_hf(hf, loads["w1"], [128], None)
            _progress("w1 hf", results["w1"]["hf"])
        if "w2" in loads:
            sizes = [int(s) for s in args.hf_w2_batch_sizes.split(",")]
            results["w2"]["hf"] = run_hf(hf, loads["w2"], sizes, args.hf_max_seconds)
            _progress("w2 hf", results["w2"]["hf"])
        if "latency" in loads:
            prompt, n = loads["latency"][0]
            results["latency"]["hf"] = run_latency_hf(hf, prompt, n)
            _progress("latency hf", results["latency"]["hf"])
    engine.shutdown()
    summary["results"] = results
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    print_report(summary)
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _progress(label: str, result: dict) -> None:
    print(f"{label}: {json.dumps(result)}", flush=True)


def print_report(summary: dict) -> None:
    res = summary["results"]
    print(f"\n== pdserve vs HF transformers: {summary.get('shape', 'llama3-8b')} shape, "
          f"{summary.get('weights', 'bf16')} weights, {summary.get('kv_cache', 'bf16')} KV, dummy, {summary['card']} ==")
    print(f"{'workload':<9} {'engine':<18} {'out tokens':>10} {'wall s':>8} {'out tok/s':>10} {'vs HF':>7}")
    for name in ("w1", "w2"):
        if name not in res:
            continue
        ours, hf = res[name]["pdserve"], res[name].get("hf")
        ratio = f"{ours['output_tok_per_s'] / hf['output_tok_per_s']:.2f}x" if hf and hf["output_tok_per_s"] else ""
        print(f"{name:<9} {'pdserve':<18} {ours['output_tokens']:>10} {ours['wall_s']:>8} "
              f"{ours['output_tok_per_s']:>10} {ratio:>7}")
        one = res[name].get("pdserve_one_step_at_a_time")
        if one:
            print(f"{'':<9} {'pdserve 1-at-a-time':<18} {one['output_tokens']:>10} {one['wall_s']:>8} "
                  f"{one['output_tok_per_s']:>10}")
        if hf and "batch_size" in hf:
            label = f"hf bs={hf['batch_size']}" + ("" if hf["batches_run"] == hf["batches_total"]
                                                  else f" ({hf['batches_run']}/{hf['batches_total']} b.)")
            print(f"{'':<9} {label:<18} {hf['output_tokens']:>10} {hf['wall_s']:>8} {hf['output_tok_per_s']:>10}")
    if "latency" in res:
        for eng, r in res["latency"].items():
            print(f"{'latency':<9} {eng:<18} TTFT {r['ttft_ms']} ms, {r['ms_per_output_token']} ms per output token")
    print("\n-- breakdown --")
    for name, eng in (("w1", "pdserve"), ("w1", "pdserve_one_step_at_a_time"), ("w2", "pdserve")):
        st = res.get(name, {}).get(eng, {}).get("steps")
        if not st:
            continue
        print(f"{name} {eng}: {st['num_steps']} steps, device busy {st['device_busy_s']} s, device idle "
              f"{st['device_idle_s']} s, CUDA-graph steps {st['cuda_graph_steps']}, "
              f"overlapped steps {st['overlapped_steps']}")
        for kind in ("decode_only", "mixed", "prefill_only"):
            k = st[kind]
            print(f"    {kind:<13} {k['steps']:>5} steps {k['seconds']:>7} s  {k['tokens_per_step']:>7} tok/step "
                  f"{k['ms_per_step']:>7} ms/step")
    for window, kb in (summary.get("kernel_breakdown") or {}).items():
        if isinstance(kb, dict):
            shares = ", ".join(f"{c} {100 * v:.1f}%" for c, v in kb["share"].items())
            per_step = (f" ({kb['gpu_ms_per_step']} ms and {kb['kernels_per_step']} kernels per step)"
                        if "gpu_ms_per_step" in kb else "")
            print(f"{window}: GPU {kb['gpu_ms']} ms{per_step}: {shares}")
            for name, ms, calls, mean_us in kb["top_kernels"]:
                print(f"    {name:<60} {ms:>9} ms {calls:>6} calls {mean_us:>8} us")
        else:
            print(f"{window}: {kb}")
    if summary.get("gemv_choice"):
        print("batch-1 GEMMs (cuBLAS us, gemv us, gemv chosen):", summary["gemv_choice"])
    print(f"startup {summary['startup_s']} s, warm-up {summary['warmup_s']} s, total {summary['total_s']} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdserve.services.bench_gpu", description=__doc__.splitlines()[0])
    add_args(parser)
    main_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()

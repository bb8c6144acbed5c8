"""`pdserve bench accuracy`: what quantization costs, measured through the engine's public API.

    scoring     prompt_logprobs=1 on windows of a fixed text: the log-probability of every next
                token (-> perplexity) and the top-1 token at each position (-> teacher-forced
                agreement with the reference model, position by position)
    generation  greedy answers of the quantized and the reference model to the same prompts:
                token agreement (positions equal, up to the first difference counted as such) and
                exact-match rate of whole answers

    pdserve bench accuracy [--model M.gguf|HF] [--text FILE] [--prompts FILE] [--variants ...]

Variants: fp32 (the reference: the packaged GGUF dequantized to an HF folder in fp32), bf16, fp8
(online), fp8-kv (--kv-cache-dtype fp8, scales calibrated at start-up), fp8-kv-ckpt (the same with
the static scales `pdserve quantize --kv-cache-scales` finds on its calibration text, read from the
checkpoint), awq / gptq / gptq-act (written by `pdserve quantize`,
calibrated; the -rtn ones rounded to nearest), gguf (the GGUF file run through its quantized kernels). Prints a table and one JSON line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass
class Scores:
    logprobs: list[float]  # log p(token_i | tokens_<i) for every scored token
    top1: list[int]  # argmax token at each scored position

    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def score_tokens(llm, token_ids: list[int], window: int) -> Scores:
    """Scores of token_ids in consecutive windows of `window` tokens (each window restarts the
    context; the first token of a window is not scored). Prefix caching must be off (cached
    positions carry no prompt logprobs)."""
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    chunks = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    logprobs, top1 = [], []
    for chunk, out in zip(chunks, outs):
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(chunk), "prompt logprobs missing: prefix caching on?"
        for token, entry in zip(chunk[1:], entries[1:]):
            logprobs.append(entry[token].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return Scores(logprobs, top1)


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """token: share of reference positions with the same token (a sequence stops agreeing at its
    first difference: later tokens continue a different text); exact: share of identical answers;
    first: share of equal first tokens."""
    same = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
               for g, w in zip(got, want))
    total = sum(len(w) for w in want)
    return {"token": round(same / max(total, 1), 4),
            "exact": round(sum(g == w for g, w in zip(got, want)) / len(want), 4),
            "first": round(sum(bool(g and w and g[0] == w[0]) for g, w in zip(got, want)) / len(want), 4)}


def top1_agreement(a: Scores, b: Scores) -> float:
    return sum(x == y for x, y in zip(a.top1, b.top1)) / max(len(b.top1), 1)


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
VARIANTS = ("fp32", "bf16", "fp8", "fp8-kv", "fp8-kv-ckpt", "awq", "gptq", "gptq-act", "awq-rtn", "gptq-rtn", "gptq-act-rtn", "gguf")
# name -> (method, options, calibrated): gptq is pdserve quantize's default (sym, act-order when
# calibrated), gptq-rtn --rtn's (sym, no act-order)
INT4 = {"awq": ("awq", {}, True), "gptq": ("gptq", {"sym": True, "act_order": True}, True),
        "gptq-act": ("gptq", {"sym": False, "act_order": True}, True),
        "awq-rtn": ("awq", {}, False), "gptq-rtn": ("gptq", {"sym": True}, False),
        "gptq-act-rtn": ("gptq", {"sym": False, "act_order": True}, False)}


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("accuracy", help="perplexity and greedy agreement of quantized variants vs fp32")
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--text", default=os.path.join(DATA, "accuracy_text.txt"), help="text whose perplexity is measured")
    p.add_argument("--prompts", default=os.path.join(DATA, "accuracy_prompts.txt"), help="prompts of the greedy agreement, one per line")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy answer length")
    p.add_argument("--window", type=int, default=512, help="scoring window (tokens)")
    p.add_argument("--group-size", type=int, default=64, help="awq/gptq group (SmolLM2's 576 inputs: 64 or 32)")
    p.add_argument("--calibration-data", default=None, metavar="FILE",
                   help="text the awq/gptq variants are calibrated on (default: pdserve quantize's own)")
    p.add_argument("--work-dir", default=None, help="where the fp32 export and quantized checkpoints go (default: temp)")
    p.add_argument("--json-out", default=None, help="write the results here")
    p.set_defaults(func=cmd_accuracy)


def _variant_llm(name: str, folders: dict, gguf_path: str | None, group_size: int, work: str,
                 calibration_data: str | None = None):
    from pdserve.common.engine.llm import LLM
    from pdserve.common.models.quantization.writer import quantize_checkpoint
    common = dict(enable_prefix_caching=False, max_model_len=2048)
    ref = folders["fp32"]
    if name == "fp32":
        return LLM(ref, dtype="float32", **common)
    if name == "bf16":
        return LLM(ref, dtype="bfloat16", **common)
    if name == "fp8":  # CUDA's fp8 GEMMs take bf16 activations (torch._scaled_mm): the variant runs in bf16 there
        import torch
        return LLM(ref, dtype="bfloat16" if torch.cuda.is_available() else "float32", quantization="fp8", **common)
    if name == "fp8-kv":
        return LLM(ref, dtype="float32", kv_cache_dtype="fp8", **common)
    if name == "fp8-kv-ckpt":
        from pdserve.common.models.quantization.kv_cache import text_kv_scales
        from pdserve.common.models.quantization.writer import add_kv_scales
        out = os.path.join(work, name)
        if not os.path.isfile(os.path.join(out, "config.json")):
            add_kv_scales(ref, out, text_kv_scales(ref, calibration_data, 128, 512, None))
        return LLM(out, dtype="float32", kv_cache_dtype="fp8", **common)
    if name == "gguf":
        if gguf_path is None:
            raise ValueError("the gguf variant needs a GGUF model")
        return LLM(gguf_path, quantization="gguf", **common)
    from pdserve.common.models.quantization.calibrate import Calibration
    method, options, calibrated = INT4[name]
    out = os.path.join(work, name)
    if not os.path.isfile(os.path.join(out, "config.json")):
        calibration = Calibration(text=calibration_data) if calibrated else None
        quantize_checkpoint(ref, out, method, group_size=group_size, calibration=calibration, **options)
    return LLM(out, dtype="float32", **common)


def cmd_accuracy(args) -> dict:
    import json
    import tempfile
    import time

    from pdserve.common.config import ConfigError
    from pdserve.common.models.gguf_loader import export_hf_folder
    from pdserve.common.models.loader import is_gguf, resolve_model_path
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"--variants: unknown {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    path = resolve_model_path(args.model or "default")
    work = args.work_dir or tempfile.mkdtemp(prefix="pdserve-accuracy-")
    gguf_path = path if is_gguf(path) else None
    ref_folder = path
    if gguf_path is not None:
        ref_folder = os.path.join(work, "fp32")
        if not os.path.isfile(os.path.join(ref_folder, "config.json")):
            export_hf_folder(gguf_path, ref_folder)
    folders = {"fp32": ref_folder}
    with open(args.text) as f:
        text = f.read()
    with open(args.prompts) as f:
        prompt_texts = [line.rstrip("\n") for line in f if line.strip()]
    rows, reference = [], None
    for name in ["fp32"] + [v for v in variants if v != "fp32"]:
        t0 = time.perf_counter()
        llm = _variant_llm(name, folders, gguf_path, args.group_size, work, args.calibration_data)
        try:
            tok = llm.get_tokenizer()
            ids = tok.encode(text)
            prompts = [tok.encode(p) for p in prompt_texts]
            scores = score_tokens(llm, ids, args.window)
            answers = greedy(llm, prompts, args.max_tokens)
        finally:  # its KV pool and graphs go before the next variant's engine sizes its own (CUDA)
            llm.shutdown()
        if reference is None:
            reference = (scores, answers)
        row = {"variant": name, "perplexity": round(scores.perplexity(), 3), "scored_tokens": len(scores.logprobs),
               "top1_agreement": round(top1_agreement(scores, reference[0]), 4),
               "greedy": agreement(answers, reference[1]), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_accuracy(rows, path, len(prompt_texts), args.max_tokens)
    summary = {"model": path, "text": args.text, "prompts": len(prompt_texts), "max_tokens": args.max_tokens,
               "window": args.window, "group_size": args.group_size, "rows": rows}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def print_accuracy(rows: list[dict], model: str, num_prompts: int, max_tokens: int) -> None:
    print(f"\n== accuracy vs fp32 ({os.path.basename(model)} dequantized), {rows[0]['scored_tokens']} scored tokens, "
          f"{num_prompts} prompts x {max_tokens} greedy tokens ==")
    print(f"{'variant':<10} {'perplexity':>10} {'top-1 agree':>11} {'greedy exact':>12} {'greedy token':>12} "
          f"{'first token':>11} {'seconds':>8}")
    for r in rows:
        g = r["greedy"]
        print(f"{r['variant']:<10} {r['perplexity']:>10} {r['top1_agreement']:>11} {g['exact']:>12} {g['token']:>12} "
              f"{g['first']:>11} {r['seconds']:>8}")

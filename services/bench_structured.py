"""`pdserve bench structured`: output tok/s with a JSON-schema grammar vs unconstrained, same run.

    pdserve bench structured                                   # CPU, the packaged SmolLM2
    pdserve bench structured --shape llama3-8b --device cuda   # GPU: Llama-3-8B shape, dummy weights
    python -m pdserve.services.bench_structured ...            # the same
    python -m pdserve.services.bench_structured --export-tokenizer .tok   # SmolLM2's tokenizer -> .tok/

For each batch size B, rounds alternate the two modes on the same engine: B random-token prompts
(--input-len, fresh each round), --output-len tokens with ignore_eos; the constrained mode adds
`structured_outputs={"json": SCHEMA}` (nested object, array, free strings: a grammar the model
rarely completes early). Only *full decode steps* are timed: steps after the prefill step in which
all B requests produce a token, so requests that end early (a completed grammar) or the prefill do
not change the batch being compared. tok/s = tokens of those steps / their wall time; the figure per
mode is the median over rounds, and `ratio` = constrained / unconstrained.

Per timed step of the constrained mode, from the manager's `MaskStats` (common/engine/mask_fill.py):
`accept_ms_per_step`: engine thread, where step k-1's tokens land on the host: every grammar row
accepts its token (one batched xgrammar call); `start_ms_per_step`: engine thread, the fill of
step k's mask handed to the workers, until each share is inside its xgrammar call (a thread
wake-up when cores are idle); `fill_ms_per_step`: the workers, from
that start to every row filled (wall time, beside the engine thread's completion of step k-1 and
scheduling of step k+1); `join_ms_per_step`: the engine thread blocked waiting for that fill
before step k's sampler (the fill's time NOT hidden behind the engine thread's own work);
`update_ms_per_step`: the engine thread in update after scheduler.update (tokens of rows not in
the fill; normally nothing left to accept); `shares_taken_back` (per round): shares no worker had
picked up when the engine thread needed them (it ran them itself: a busy host). These say what
the grammar costs independently of how long the forward happened to take: the engine thread's
own cost is accept + start + join + update, and the mask is free while accept + start + fill
stays below the device's step (and the engine thread's cost plus its other host work too).

Grammar rows keep overlapped steps (async scheduling, the default on CUDA): the mask of step k
is filled on the worker threads while step k's forward runs on the device and the engine thread
completes step k-1, from the token step k-1 sampled, and applied on the device before sampling.
`--grammar-threads` / `--grammar-shares` take several values: each pair (shares <= threads) is
its own constrained mode in the same rounds (a sweep; `json_schema` is the first pair).

`--shape llama3-8b` writes bench_gpu's Llama-3-8B config (vocab 128256) to a temp folder with
dummy weights; the tokenizer is SmolLM2's (`--tokenizer DIR`: an HF tokenizer folder, e.g. the
one `--export-tokenizer` writes; default: converted from the packaged GGUF): the grammar is
compiled over its 49152 tokens and the mask covers all 128256 logits (ids past the tokenizer are
never allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street", "zip"]}},
    "required": ["name", "age", "tags", "address"]}


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("structured", help="output tok/s with a JSON-schema grammar vs unconstrained")
    add_args(p)
    p.set_defaults(func=main_args)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="smollm2", choices=["smollm2", "llama3-8b", "llama3-vocab", "tiny"],
                   help="smollm2: the packaged model; llama3-8b: dummy weights (GPU); llama3-vocab: two tiny "
                        "layers with Llama-3's 128256-token vocabulary (the 8B shape's grammar work, a short "
                        "forward: CPU); tiny: a smoke test of the dummy path")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="concurrent requests of each run")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="rounds per mode and batch size (median taken)")
    p.add_argument("--max-model-len", type=int, default=1024, help="the engine's context length")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlapped steps for unconstrained requests (default: on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer folder (default: SmolLM2's, from the packaged GGUF)")
    p.add_argument("--grammar-threads", type=int, nargs="+", default=None,
                   help="threads filling a step's mask rows (default: half the usable cores, at most 8); "
                        "several: a sweep, one constrained mode each")
    p.add_argument("--grammar-shares", type=int, nargs="+", default=[1],
                   help="Python worker threads among them, one xgrammar call each (the rest: xgrammar's "
                        "C++ threads); several: a sweep")
    p.add_argument("--export-tokenizer", default=None, metavar="DIR",
                   help="write SmolLM2's tokenizer (from the packaged GGUF) to DIR as an HF folder and exit")
    p.add_argument("--json-out", default=None, help="write the results here")


def build_engine(args):
    from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.common.engine.engine_core import EngineCore
    from pdserve.common.models.loader import default_model_path
    from pdserve.common.tokenizer import gguf_tokenizer_folder
    max_seqs = max(args.batch_sizes)
    if args.shape == "smollm2":
        model = ModelConfig(model=default_model_path(), tokenizer=args.tokenizer, max_model_len=args.max_model_len,
                            device=args.device, seed=args.seed)
        cache = CacheConfig(num_blocks=-(-args.max_model_len // 16) * max_seqs + 64)
    else:
        from pdserve.services.bench_gpu import LLAMA3_8B, TINY
        folder = tempfile.mkdtemp(prefix="pdserve-bench-structured-")
        shape = {"llama3-8b": LLAMA3_8B, "tiny": TINY,
                 "llama3-vocab": {**TINY, "vocab_size": LLAMA3_8B["vocab_size"]}}[args.shape]
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(shape, f)
        tokenizer = args.tokenizer or gguf_tokenizer_folder(default_model_path())
        model = ModelConfig(model=folder, tokenizer=tokenizer, dtype="bfloat16" if args.device == "cuda" else "float32",
                            max_model_len=args.max_model_len, load_format="dummy", device=args.device, seed=args.seed)
        cache = CacheConfig() if args.device == "cuda" else CacheConfig(num_blocks=-(-args.max_model_len // 16) * max_seqs)
    config = EngineConfig(model=model, cache=cache,
                          scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max(
                              8192, max_seqs * args.input_len), max_model_len=args.max_model_len),
                          enforce_eager=args.device != "cuda", async_scheduling=args.async_scheduling)
    return EngineCore(config)


def full_batch_rate(engine, prompts: list[list[int]], params, tag: str) -> dict:
    """Run the batch to completion; time only steps after the prefill in which every request
    produced a token (and the grammar's host work and wait in those steps)."""
    n = len(prompts)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    stats = engine.structured.stats
    fields = ("accept_seconds", "start_seconds", "fill_seconds", "join_seconds", "update_seconds",
              "num_shares_taken_back")
    sums = dict.fromkeys(fields, 0)
    tokens = seconds = steps = 0
    seen_prefill = False
    while engine.has_unfinished():
        before = engine.num_generated_tokens
        stats_before = {f: getattr(stats, f) for f in fields}
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.num_generated_tokens - before == n:
            if seen_prefill:
                tokens, seconds, steps = tokens + n, seconds + dt, steps + 1
                for f in fields:
                    sums[f] += getattr(stats, f) - stats_before[f]
            seen_prefill = True
    per_step = (lambda x: 1000 * x / steps) if steps else (lambda x: None)
    return {"tok_per_s": tokens / seconds if seconds else None, "steps": steps, "ms_per_step": per_step(seconds),
            **{f.replace("_seconds", "_ms_per_step"): per_step(sums[f]) for f in fields[:-1]},
            "shares_taken_back": sums["num_shares_taken_back"]}


def export_tokenizer(folder: str) -> None:
    """SmolLM2's tokenizer as an HF folder (tokenizer.json, tokenizer_config.json; ~3.5 MB): a
    GPU run takes it with --tokenizer instead of the 93 MB GGUF."""
    from pdserve.common.models.loader import default_model_path
    from pdserve.common.tokenizer import gguf_tokenizer_folder
    source = gguf_tokenizer_folder(default_model_path())
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), folder)
    print(f"wrote {len(os.listdir(source))} files of SmolLM2's tokenizer to {folder}")


def main_args(args) -> dict | None:
    from pdserve.common.sampling_params import SamplingParams
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return None
    engine = build_engine(args)
    rng = random.Random(args.seed)
    vocab = min(engine.arch.vocab_size, engine.tokenizer.vocab_size)
    plain = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    grammar = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                             structured_outputs={"json": SCHEMA})
    configs = [(t, s) for t in (args.grammar_threads or [engine.structured.num_threads])
               for s in args.grammar_shares if s <= t]
    if not configs:
        raise SystemExit("--grammar-shares: every value is above every --grammar-threads value")
    modes = {"none": (plain, None), "json_schema": (grammar, configs[0])}
    modes.update({f"json_schema_t{t}s{s}": (grammar, (t, s)) for t, s in configs[1:]})

    def prompts(b):
        return [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(b)]
    def run(name, b, tag):
        params, config = modes[name]
        if config is not None:
            engine.structured.set_threads(*config)
        return full_batch_rate(engine, prompts(b), params, tag)
    for name in modes:  # warm-up: kernels, graphs, the grammar's compile
        run(name, 2, f"warm-{name}")
    results = []
    for b in args.batch_sizes:
        runs = {name: [] for name in modes}
        for r in range(args.rounds):
            for name in modes:
                runs[name].append(run(name, b, f"b{b}-{name}-{r}"))
        row = {"batch_size": b}
        for name, rs in runs.items():
            rates = [x["tok_per_s"] for x in rs if x["tok_per_s"]]
            row[name] = {"tok_per_s": round(statistics.median(rates), 1) if rates else None,
                         "ms_per_step": _median([x["ms_per_step"] for x in rs]),
                         "full_steps": [x["steps"] for x in rs], "all_tok_per_s": [round(x, 1) for x in rates]}
        for name, (_, config) in modes.items():
            if config is None:
                continue
            rs, mode = runs[name], row[name]
            mode["grammar_threads"], mode["grammar_shares"] = config
            for f in ("accept_ms_per_step", "start_ms_per_step", "fill_ms_per_step", "join_ms_per_step",
                      "update_ms_per_step"):
                mode[f] = _median([x[f] for x in rs])
            mode["shares_taken_back"] = [x["shares_taken_back"] for x in rs]
            if row["none"]["tok_per_s"] and mode["tok_per_s"]:
                mode["ratio"] = round(mode["tok_per_s"] / row["none"]["tok_per_s"], 3)
            print(f"batch {b:>3}: unconstrained {row['none']['tok_per_s']} tok/s, {name} (grammar threads "
                  f"{config[0]}, shares {config[1]}) {mode['tok_per_s']} tok/s, ratio {mode.get('ratio')}; step "
                  f"{row['none']['ms_per_step']} vs {mode['ms_per_step']} ms; engine thread: accept "
                  f"{mode['accept_ms_per_step']} ms, fill start {mode['start_ms_per_step']} ms, blocked in join {mode['join_ms_per_step']} ms, in update "
                  f"{mode['update_ms_per_step']} ms; workers filling {mode['fill_ms_per_step']} ms (beside the "
                  f"engine thread); shares the engine thread ran itself {mode['shares_taken_back']}", flush=True)
        row["ratio"] = row["json_schema"].get("ratio")
        results.append(row)
    summary = {"bench": "structured", "shape": args.shape, "device": str(engine.runner.device),
               "async_scheduling": engine.async_scheduling, "input_len": args.input_len,
               "output_len": args.output_len, "rounds": args.rounds,
               "results": results}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.services.bench_structured", description=__doc__.split("\n")[0])
    add_args(p)
    main_args(p.parse_args(argv))


if __name__ == "__main__":
    main()

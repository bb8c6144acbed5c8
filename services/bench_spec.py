"""`pdserve bench spec`: speculative decoding against none, in one process, on an input-grounded set.

    pdserve bench spec [--batch-sizes 1 16] [-k 8] [--methods none ngram draft] [--draft-model M]
                       [engine flags: --model, --device, --kv-cache-memory ...]
    pdserve bench spec --sweep [--sequential-prompts 8]      (bench_spec_sweep.py: n-gram settings
                       replayed on greedy outputs, predicted ms/token from measured step costs)
    pdserve bench spec --stages [--methods none ngram draft] [--sequential-prompts 8] [--batch-sizes 1 16]
                       (bench_spec_stages.py: each engine's host ms per decode step, stage by stage)

n-gram defaults k = 8, prompt_lookup_min 1, max 4: the best of the sweep over min {1,2,3} x
max {3,4,5} x k {3..8} on this set (SmolLM2, 8 prompts: 1.41x predicted at the H200 bf16 step
costs, against 1.28x for the former k = 4, min 2, measured 1.23x; 1.46x with the guessed verify
steps, 1.53x at -k 15, which at batch 1 replays the same 16-row CUDA graph: docs/benchmarks.md).

Prompts: services/bench_data/grounded_prompts.jsonl (16 passages, each with "repeat / copy this"
instructions; --prompts FILE for another JSONL of {"passage", "instruction"}), through the chat
template, greedy, at most --max-tokens each. Greedy outputs do not depend on speculation, so
every method generates the same tokens (checked: `outputs_identical`) where a row's roundings do
not depend on its batch: fp32, or bf16 with --batch-invariant on CPU (docs/benchmarks.md).

Methods: `none`; `ngram` (prompt lookup, --prompt-lookup-min/max; a lone request's verify rounds
chained on the device, --device-rounds: spec_decode/device_rounds.py); `ngram_host` (one round per
step, drafts from the host: the engine before device rounds, as every other n-gram method); `ngram_all` (the same feeding
every draft there is room for: draft_budget "all", where `ngram` has "auto", spec_decode/budget.py);
`ngram_sync` (the same with steps one at a time, --no-async-scheduling for it alone: what the
overlap of speculative steps gains, spec_decode/pipeline.py); `ngram_overlap` (steps launched
before the previous result at batch 1-3: guessed drafts and bridge steps, pipeline.py) and
`ngram_guess` (the same without bridge steps); `draft` (--draft-model, default the target itself: every draft
accepted, the upper bound of the mechanism); `draft_sync` (the same with the drafts read on the host
before the verify step launches: what spec_decode/decoder.DEFER_DRAFTS gains). `--dtype` (an engine flag) sets the dtype of all. All engines
are built first, then each batch size runs every method in turn (--repeats rounds), so a noisy
machine disturbs them alike. Batch 1 runs --sequential-prompts prompts one after the other;
batch B > 1 runs B prompts at once (the set repeated if B is larger).

Per method and batch size: ms per output token (per request: time from its first token to its
last / (tokens - 1), averaged), speedup = none's / this, acceptance rate and mean accepted length
(tokens per verify round), draft ms per verify step (proposer time; a draft model's prompts are
fed in their prefill steps, reported apart as draft prefill ms per request: time to first
token, not per output token), and
    bound = mean accepted length * t_none / (t_none + draft ms per step)
the speedup if verifying k + 1 tokens cost one plain decode step and the proposer were the only
extra cost; efficiency = speedup / bound.

Then the per-step split: decode steps (engine.step() calls after every prompt's first token),
counted by the kind of step each call launched (verify: one carrying drafts, launched after the
previous step's result; guess: one carrying drafts launched while the previous step ran, its
drafts proposed past a guessed token in flight; bridge: one launched before a verify step's
result, a row per number of drafts it may accept, spec_decode/pipeline.py; plain: the rest),
their wall ms, the ms the host spent blocked on a step's result (`EngineCore.wait_seconds`;
on CUDA the device time the host did not overlap), host = wall - wait, and launch: the part of
host scheduling, proposing and launching (speculative engines only; `EngineCore.launch_seconds`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from pdserve.common.config import ConfigError
from pdserve.services.bench_spec_stages import STAGE_METHODS, method_policy, step_kind
from pdserve.services.bench_spec_sweep import add_sweep_args, run_sweep

DATA = os.path.join(os.path.dirname(__file__), "bench_data", "grounded_prompts.jsonl")


def add_parser(bench_sub, add_engine_args) -> None:
    p = bench_sub.add_parser("spec", help="speculative decoding (n-gram, draft model) vs none, same run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes to run (default: %(default)s)")
    p.add_argument("-k", "--spec-tokens", type=int, default=8, help="num_speculative_tokens (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None,
                   choices=["none", "ngram", "ngram_host", "ngram_all", "ngram_sync", "ngram_overlap", "ngram_guess",
                            "draft", "draft_sync"],
                   help="methods compared; ngram: with --device-rounds; ngram_host: one verify round per step, "
                        "drafts from the host (device_rounds 0, as the next three); "
                        "ngram_sync: n-gram without async scheduling; ngram_overlap: n-gram "
                        "steps overlapped below 4 running requests (guessed drafts, bridge steps: "
                        "spec_decode/pipeline.py, off by default); ngram_guess: the same without bridge steps; "
                        "draft_sync: the draft's drafts read on the "
                        "host before the verify step launches (decoder.DEFER_DRAFTS off) (default: none ngram draft; with --stages: "
                        "none ngram ngram_overlap, and it takes only these and draft)")
    p.add_argument("--draft-model", default=None, help="draft of methods draft, draft_sync (default: the target itself)")
    p.add_argument("--prompt-lookup-min", type=int, default=1, help="n-gram: shortest match (default: %(default)s)")
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="n-gram: longest match (default: %(default)s)")
    p.add_argument("--device-rounds", type=int, default=None,
                   help="n-gram: verify rounds a lone request's step chains on the device (speculative config "
                        "device_rounds; default: the engine's, spec_decode/device_rounds.py)")
    p.add_argument("--prompts", default=DATA, help="JSONL of {passage, instruction} (default: the shipped set)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: %(default)s)")
    p.add_argument("--sequential-prompts", type=int, default=4, help="prompts run one at a time at batch 1 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method and batch size (default: %(default)s)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    add_sweep_args(p)
    p.add_argument("--stages", action="store_true",
                   help="none, n-gram one step at a time and overlapped (ngram_overlap) or --methods of these and "
                        "draft, async scheduling on, per --batch-sizes: host ms per decode step by stage "
                        "(bench_spec_stages.py)")
    add_engine_args(p)
    p.set_defaults(func=cmd_spec)


def method_config(args, method: str, target: str) -> dict | None:
    if method == "none":
        return None
    if method in ("ngram", "ngram_host", "ngram_all", "ngram_sync", "ngram_overlap", "ngram_guess"):
        return {"method": "ngram", "num_speculative_tokens": args.spec_tokens,
                "prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max,
                "draft_budget": "all" if method == "ngram_all" else "auto",
                "device_rounds": args.device_rounds if method in ("ngram", "ngram_all") else 0}
    return {"model": args.draft_model or target, "num_speculative_tokens": args.spec_tokens}


def run_batch(llm, prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    """Run prompts together to completion: per-request ms per output token, tokens, steps, and
    the decode steps' split (`StepSplit`: steps with drafts apart, wall and device-wait time)."""
    from pdserve.common.sampling_params import SamplingParams
    engine = llm.engine
    spec = engine.runner.spec
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    first, last, outs = {}, {}, {}
    steps = 0
    split = {"plain": StepSplit(), "verify": StepSplit(), "guess": StepSplit(), "bridge": StepSplit()}
    while engine.has_unfinished():
        wait0, launch0, t0 = engine.wait_seconds, engine.launch_seconds, time.perf_counter()
        overlapped0 = engine.num_overlapped_steps
        outputs = engine.step()
        now = time.perf_counter()
        if len(first) == len(prompts):  # every prompt has its first token: a decode step
            kind = step_kind(spec, engine.num_overlapped_steps > overlapped0)
            split[kind].add(now - t0, engine.wait_seconds - wait0, engine.launch_seconds - launch0)
        steps += 1
        for o in outputs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    tpot = [(last[r] - first[r]) / (len(t) - 1) for r, t in outs.items() if len(t) > 1]
    return {"tpot": tpot, "tokens": [outs[f"{tag}-{i}"] for i in range(len(prompts))], "steps": steps,
            "split": split}


@dataclass
class StepSplit:
    """Decode steps of one kind (with drafts to verify, or plain): how many, their wall time and
    the part of it the host spent blocked on the device for a step's result (EngineCore.wait_seconds).
    host = wall - wait; on CUDA wait is the device time the host did not overlap. launch: the part
    of host spent scheduling, proposing and launching the step (EngineCore.launch_seconds; with
    speculation only): for a step launched after the previous one's result, the host time the
    device sat idle between the two."""
    num: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0
    launch_s: float = 0.0

    def add(self, wall: float, wait: float, launch: float = 0.0) -> None:
        self.num, self.wall_s, self.wait_s = self.num + 1, self.wall_s + wall, self.wait_s + wait
        self.launch_s += launch

    def merge(self, other: "StepSplit") -> None:
        self.num, self.wall_s, self.wait_s = self.num + other.num, self.wall_s + other.wall_s, self.wait_s + other.wait_s
        self.launch_s += other.launch_s

    def ms(self) -> dict | None:
        if not self.num:
            return None
        return {"steps": self.num, "ms_per_step": round(1000 * self.wall_s / self.num, 3),
                "host_ms": round(1000 * (self.wall_s - self.wait_s) / self.num, 3),
                "wait_ms": round(1000 * self.wait_s / self.num, 3), "launch_ms": round(1000 * self.launch_s / self.num, 3)}


@dataclass
class Tally:
    """One method at one batch size, over the repeats."""
    tpot: list = field(default_factory=list)  # seconds per output token, per request
    tokens: list = field(default_factory=list)  # outputs of the first repeat (compared across methods)
    steps: int = 0  # decode steps (each run's first step, the prefill, left out)
    propose_s: float = 0.0
    prefill_s: float = 0.0  # a draft model's prompts, fed in their prefill steps (not per verify step)
    requests: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    guessed: int = 0  # drafts proposed past a token in flight, and how many guessed it right
    guess_hits: int = 0
    plain: StepSplit = field(default_factory=StepSplit)
    verify: StepSplit = field(default_factory=StepSplit)
    guess: StepSplit = field(default_factory=StepSplit)
    bridge: StepSplit = field(default_factory=StepSplit)

    def measure(self, llm, groups: list[list[list[int]]], max_tokens: int, tag: str, first_repeat: bool) -> None:
        engine = llm.engine
        spec_before, propose_before = engine.stats().spec_decode, _propose_seconds(engine)
        prefill_before = _prefill_seconds(engine)
        for gi, group in enumerate(groups):
            r = run_batch(llm, group, max_tokens, f"{tag}-{gi}")
            self.requests += len(group)
            self.tpot += r["tpot"]
            self.steps += r["steps"] - 1
            self.plain.merge(r["split"]["plain"])
            self.verify.merge(r["split"]["verify"])
            self.guess.merge(r["split"]["guess"])
            self.bridge.merge(r["split"]["bridge"])
            if first_repeat:
                self.tokens += r["tokens"]
        if spec_before is not None:
            after = engine.stats().spec_decode
            self.propose_s += _propose_seconds(engine) - propose_before
            self.prefill_s += _prefill_seconds(engine) - prefill_before
            self.drafts += after.num_drafts - spec_before.num_drafts
            self.draft_tokens += after.num_draft_tokens - spec_before.num_draft_tokens
            self.accepted += after.num_accepted_tokens - spec_before.num_accepted_tokens
            self.guessed += after.num_guessed_drafts - spec_before.num_guessed_drafts
            self.guess_hits += after.num_guess_hits - spec_before.num_guess_hits

    def row(self, method: str, batch_size: int, base: "Tally | None") -> dict:
        ms = 1000 * sum(self.tpot) / len(self.tpot)
        row = {"method": method, "batch_size": batch_size, "ms_per_output_token": round(ms, 3),
               "output_tokens": sum(len(t) for t in self.tokens),
               "outputs_identical": None if base is None else self.tokens == base.tokens,
               "plain_steps": self.plain.ms(), "verify_steps": self.verify.ms(), "guess_steps": self.guess.ms(),
               "bridge_steps": self.bridge.ms()}
        base_ms = None if base is None else 1000 * sum(base.tpot) / len(base.tpot)
        if base_ms is not None:
            row["speedup"] = round(base_ms / ms, 3)
        if self.drafts:
            mean_len = 1 + self.accepted / self.drafts
            draft_ms = 1000 * self.propose_s / max(self.steps, 1)
            row.update(acceptance_rate=round(self.accepted / self.draft_tokens, 3),
                       mean_accepted_length=round(mean_len, 3), draft_ms_per_step=round(draft_ms, 3),
                       draft_prefill_ms_per_request=round(1000 * self.prefill_s / max(self.requests, 1), 3),
                       guessed_drafts=self.guessed, guess_hits=self.guess_hits)
            if base_ms is not None:  # per request, a plain step takes base_ms and makes one token
                bound = mean_len * base_ms / (base_ms + draft_ms)
                row.update(bound=round(bound, 3), efficiency=round(row["speedup"] / bound, 3))
        return row


def _propose_seconds(engine) -> float:
    return engine.runner.spec.propose_seconds if engine.runner.spec is not None else 0.0


def _prefill_seconds(engine) -> float:
    return engine.runner.spec.prefill_seconds if engine.runner.spec is not None else 0.0


def cmd_spec(args) -> None:
    from pdserve.common.config import engine_config
    from pdserve.common.engine.llm import LLM
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    llms = {}
    base = engine_config(args)
    if args.sweep:  # one plain engine: its greedy outputs, then the n-gram settings replayed on them
        llm = LLM.from_config(engine_config(args, speculative_config=None, speculative_model=None,
                                            num_speculative_tokens=None))
        return run_sweep(args, llm, chat_prompts(llm.get_tokenizer(), rows)[:args.sequential_prompts])
    if args.stages:  # none, n-gram one at a time and overlapped (or --methods of these and draft): stages timed
        from pdserve.services.bench_spec_stages import run_stage_methods

        def build(method: str, **share):
            spec = method_config(args, method if method in ("none", "ngram", "draft", "draft_sync") else "ngram_host",
                                 base.model.model)
            return LLM.from_config(engine_config(args, speculative_config=spec, speculative_model=None,
                                                 num_speculative_tokens=None, async_scheduling=True, **share))
        methods = list(STAGE_METHODS[:3]) if args.methods is None else args.methods
        if not set(methods) <= set(STAGE_METHODS):
            raise ConfigError(f"--stages times {', '.join(STAGE_METHODS)}; not {', '.join(set(methods) - set(STAGE_METHODS))}")
        # (its tokenizer makes the prompts; it runs first and lives on beside each other engine,
        # so on CUDA it takes half of what the process may use: --gpu-memory-utilization)
        plain = build("none", gpu_memory_utilization=base.cache.gpu_memory_utilization / 2)
        prompts = chat_prompts(plain.get_tokenizer(), rows)[:args.sequential_prompts]
        table = run_stage_methods(args, lambda m: plain if m == "none" else build(m), prompts, run_batch, methods)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(table, f, indent=2)
        return
    target = base.model.model
    args.methods = args.methods or ["none", "ngram", "draft"]
    for i, method in enumerate(args.methods, start=1):
        # every engine lives for the whole run (the methods alternate); on CUDA each KV pool is
        # sized from what this process may use in all (--gpu-memory-utilization), so engine i of
        # n may grow the process to i / n of it
        share = {"gpu_memory_utilization": base.cache.gpu_memory_utilization * i / len(args.methods)}
        if method == "ngram_sync":  # the engine before overlapped speculative steps (spec_decode/pipeline.py)
            share["async_scheduling"] = False
        llms[method] = LLM.from_config(engine_config(args, speculative_config=method_config(args, method, target),
                                                     speculative_model=None, num_speculative_tokens=None, **share))
    prompts = chat_prompts(next(iter(llms.values())).get_tokenizer(), rows)
    for method, llm in llms.items():  # warm-up (and the draft's first forward)
        with method_policy(method):
            run_batch(llm, prompts[:2], 8, "warm")
    results = []
    for bs in args.batch_sizes:
        groups = ([[p] for p in prompts[:args.sequential_prompts]] if bs == 1
                  else [[prompts[i % len(prompts)] for i in range(bs)]])
        tallies = {m: Tally() for m in args.methods}
        for rep in range(args.repeats):
            for method, llm in llms.items():
                with method_policy(method):
                    tallies[method].measure(llm, groups, args.max_tokens, f"b{bs}-{rep}", rep == 0)
        results += [t.row(m, bs, tallies.get("none")) for m, t in tallies.items()]
    any_llm = next(iter(llms.values()))
    summary = {"model": any_llm.engine.model_name, "device": str(any_llm.engine.runner.device),
               "dtype": str(any_llm.engine.runner.dtype).removeprefix("torch."), "k": args.spec_tokens,
               "max_tokens": args.max_tokens, "prompts": os.path.basename(args.prompts), "results": results}
    print(f"{'method':>6} {'batch':>5} {'ms/tok':>8} {'speedup':>7} {'accept':>6} {'mean len':>8} "
          f"{'draft ms':>8} {'bound':>6} {'effic.':>6} same")
    for r in results:
        print(f"{r['method']:>6} {r['batch_size']:>5} {r['ms_per_output_token']:>8.2f} {r.get('speedup', 1.0):>7.2f} "
              f"{_f(r.get('acceptance_rate'))} {_f(r.get('mean_accepted_length'), 8)} "
              f"{_f(r.get('draft_ms_per_step'), 8)} {_f(r.get('bound'))} {_f(r.get('efficiency'))} "
              f"{r['outputs_identical']}")
    print(f"\nper decode step (ms; host = wall - wait, wait = blocked on the device for a step's result;\n"
          f"verify: launched after the step before's result, guess: launched while it ran, drafts past its token;\n"
          f"bridge: launched before a verify step's result, a row per outcome):\n"
          f"{'method':>6} {'batch':>5} | {'plain':>5} {'ms':>6} {'host':>6} {'wait':>6} {'launch':>6} | "
          f"{'verify':>6} {'ms':>6} {'host':>6} {'wait':>6} {'launch':>6} | "
          f"{'guess':>5} {'ms':>6} {'host':>6} {'wait':>6} {'launch':>6} | "
          f"{'bridge':>6} {'ms':>6} {'host':>6} {'wait':>6} {'launch':>6} | guess hits")
    for r in results:
        hits = f"{r['guess_hits']}/{r['guessed_drafts']}" if r.get("guessed_drafts") else "-"
        print(f"{r['method']:>6} {r['batch_size']:>5} | {_split(r['plain_steps'], 5)} | {_split(r['verify_steps'], 6)} | "
              f"{_split(r['guess_steps'], 5)} | {_split(r['bridge_steps'], 6)} | {hits}")
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)


def chat_prompts(tok, rows: list[dict]) -> list[list[int]]:
    """The set's {passage, instruction} rows as chat-templated prompt token ids."""
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["passage"] + "\n\n" + r["instruction"]}],
                                               add_generation_prompt=True), add_special_tokens=False) for r in rows]


def _split(ms: dict | None, width: int) -> str:
    if ms is None:
        return f"{0:>{width}} {'-':>6} {'-':>6} {'-':>6} {'-':>6}"
    return (f"{ms['steps']:>{width}} {ms['ms_per_step']:>6.3f} {ms['host_ms']:>6.3f} {ms['wait_ms']:>6.3f} "
            f"{ms['launch_ms']:>6.3f}")


def _f(value, width: int = 6) -> str:
    return f"{value:>{width}.2f}" if value is not None else " " * (width - 1) + "-"

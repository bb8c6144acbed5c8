"""`pdserve bench spec --stages`: where a speculative engine's host time goes, stage by stage.

One n-gram engine (the bench's k and lookup lengths, async scheduling as the device would
have it: on by default on CUDA, forced on here on the CPU too) runs, per --batch-sizes B, the
first --sequential-prompts prompts one at a time (B = 1) or B prompts at once; its stage
functions are wrapped with timers (on this engine's objects only), and every decode step
(engine.step() call) adds each stage's time to the kind of step it launched (bench_spec.py's
split: plain, verify, guess). Printed per batch size and kind: ms per step of

    apply     the previous step's result on the host and scheduler.update
      wait      of it: blocked on the device for the result (EngineCore.wait_seconds; CUDA)
      update    of it: scheduler.update
    schedule  scheduler.schedule
    propose   the n-gram lookup or the draft model's rounds (SpecDecoder.prepare's proposer)
      dforward  of it: the draft model's forward passes (inputs, forward or graph replay, greedy: the
                tail's tokens; also the round it drafts ahead behind a verify step, outside propose)
      dsample   of it: the draft tokens sampled on the device (random requests, queued)
                (the rest of propose: the rounds' bookkeeping and the wait for the drafts)
    prepare   the rest of SpecDecoder.prepare (the drafts appended to the inputs)
    flatten   flatten_step (the step's host arrays)
    inputs    the backend's inputs (tensors, attention metadata)
    forward   the model's forward pass (CPU: its compute; CUDA: queueing the kernels / a graph replay)
    sample    verify (logits of the rows, the rejection test queued) or the plain sampler's launch
    emit      the deltas of the finished step
    step      the whole engine.step() call
    host      step - wait - forward: the host's own work (on the CPU the forward is compute)

For a verify step everything from `apply` to `sample` lies between the previous result and the
launch: on a GPU the device waits through it (docs/speculative.md, "Where a verify step's time
goes"). On the CPU `forward` is the compute itself; the other stages are host work on any device.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

CLOCK = time.perf_counter  # wall time; time.thread_time: the engine thread's CPU time (a busy shared CPU)
STAGES = ("apply", "wait", "update", "schedule", "propose", "dforward", "dsample", "prepare", "flatten", "inputs",
          "forward", "sample", "emit")


def step_kind(spec, overlapped: bool) -> str:
    """The kind of decode step the last engine.step() launched (`spec`: its SpecDecoder, or None;
    `overlapped`: the step launched while the one before ran): bridge (before a verify step's
    result), guess (drafts past a token in flight), verify, or plain."""
    if spec is not None and spec.has_bridge():
        return "bridge"
    if spec is not None and spec.has_drafts():
        return "guess" if overlapped else "verify"
    return "plain"


@contextlib.contextmanager
def method_policy(method: str):
    """While a method's engine runs: ngram_overlap overlaps speculative steps below 4 running
    requests (the engine's policy before 2026-12-01, pipeline.OVERLAP_MAX_BATCH); ngram_guess the
    same without bridge steps (pipeline.BRIDGE off: after a verify step the next waits for its
    result; after a plain one it launches first, drafting past a guess); draft_sync reads
    a draft model's drafts on the host before the verify step launches (the engine before
    2026-12-02: decoder.DEFER_DRAFTS off)."""
    from pdserve.common.engine.spec_decode import decoder, pipeline
    before = pipeline.OVERLAP_MAX_BATCH, pipeline.BRIDGE, decoder.DEFER_DRAFTS
    if method in ("ngram_overlap", "ngram_guess"):
        pipeline.OVERLAP_MAX_BATCH = 4
    if method == "ngram_guess":
        pipeline.BRIDGE = False
    if method == "draft_sync":
        decoder.DEFER_DRAFTS = False
    try:
        yield
    finally:
        pipeline.OVERLAP_MAX_BATCH, pipeline.BRIDGE, decoder.DEFER_DRAFTS = before


class StageTimer:
    """Seconds per stage, accumulated by wrapped callables."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kw):
            t0 = CLOCK()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[stage] += CLOCK() - t0
        setattr(owner, attr, timed)


def instrument(engine) -> StageTimer:
    """Timers on this engine's stage functions (instance attributes: other engines are untouched;
    flatten_step is module-level in model_runner and is wrapped there while the bench runs)."""
    from pdserve.common.engine import model_runner
    timer = StageTimer()
    runner, spec = engine.runner, engine.runner.spec
    timer.wrap(engine, "_apply", "apply")
    timer.wrap(engine.scheduler, "update", "update")
    timer.wrap(engine.scheduler, "schedule", "schedule")
    if spec is not None:  # (none: a plain engine, for comparison)
        timer.wrap(spec.proposer, "propose", "propose")
        if spec.draft is not None:  # (greedy drafts left on the device: decoder.DEFER_DRAFTS)
            timer.wrap(spec.draft, "propose_on_device", "propose")
        timer.wrap(spec, "prepare", "prepare")
        if spec.draft is not None:  # the draft model's rounds inside propose
            timer.wrap(spec.draft.runner, "forward_logits", "dforward")
            timer.wrap(spec.draft.runner, "forward_greedy", "dforward")
            timer.wrap(spec.draft, "_sample", "dsample")
    timer.wrap(model_runner, "flatten_step", "flatten")
    timer.wrap(runner.inputs, "prepare", "inputs")
    timer.wrap(runner.model, "forward", "forward")
    if runner.graphs is not None:  # CUDA: decode-only steps replay a graph instead
        timer.wrap(runner.graphs, "run", "forward")
    if spec is not None:
        timer.wrap(spec, "verify", "sample")
    timer.wrap(runner.sampler, "sample", "sample")
    timer.wrap(engine, "_emit", "emit")
    return timer


STAGE_METHODS = ("none", "ngram", "ngram_overlap", "ngram_guess", "draft", "draft_sync")  # --stages: the first three unless --methods


def run_stage_methods(args, build, prompts: list[list[int]], run_batch, methods=STAGE_METHODS[:3]) -> dict:
    """--stages: a plain engine, an n-gram engine (steps one at a time, the default), one with
    steps overlapped below 4 running requests (method_policy: guessed drafts, bridge
    steps) and a draft-model engine, those of `methods`, each built by build(method) (async
    scheduling on), warmed up by run_batch (bench_spec's, passed in: bench_spec imports this
    module), its stages timed (run_stages) and shut down -> {method: {B: {kind: row}}}."""
    tables = {}
    for method in methods:
        llm = build(method)
        try:
            with method_policy(method):
                run_batch(llm, prompts[:2], 8, "warm")
                print(f"== {method}")
                tables[method] = run_stages(args, llm, prompts)
        finally:
            llm.shutdown()
    return tables


def run_stages(args, llm, prompts: list[list[int]]) -> dict:
    """Per --batch-sizes B: at B = 1 the prompts one at a time, else B of them at once (the set
    repeated); per kind of decode step, ms per step by stage -> {B: {kind: row}}."""
    from pdserve.common.engine import model_runner
    flatten = model_runner.flatten_step
    timer = instrument(llm.engine)
    try:
        tables = {}
        for bs in args.batch_sizes:
            groups = ([[p] for p in prompts] if bs == 1 else [[prompts[i % len(prompts)] for i in range(bs)]])
            tables[bs] = _run_groups(args, llm, groups, timer, f"stages-b{bs}")
            _print(args, llm, tables[bs], bs, len(prompts) if bs == 1 else bs)
    finally:
        model_runner.flatten_step = flatten
    return tables


def _run_groups(args, llm, groups: list[list[list[int]]], timer: StageTimer, tag: str) -> dict:
    """Run each group of prompts together to completion; per step kind, ms per decode step by
    stage (a decode step: every request of the group has its first token)."""
    from pdserve.common.sampling_params import SamplingParams
    engine = llm.engine
    spec = engine.runner.spec
    kinds: dict[str, dict[str, float]] = {k: defaultdict(float) for k in ("plain", "verify", "guess", "bridge")}
    counts = dict.fromkeys(kinds, 0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for g, group in enumerate(groups):
        for i, p in enumerate(group):
            engine.add_request(f"{tag}-{g}-{i}", p, params)
        started: set[str] = set()
        while engine.has_unfinished():
            timer.seconds["wait"] = engine.wait_seconds  # (perf_counter seconds, whatever CLOCK is)
            before = dict(timer.seconds)
            overlapped0 = engine.num_overlapped_steps
            decode = len(started) == len(group)
            t0 = CLOCK()
            outputs = engine.step()
            wall = CLOCK() - t0
            started.update(o.request_id for o in outputs if o.new_token_ids)
            if not decode:  # prefill steps (until every request has its first token)
                continue
            kind = step_kind(spec, engine.num_overlapped_steps > overlapped0)
            counts[kind] += 1
            timer.seconds["wait"] = engine.wait_seconds
            for stage in STAGES:
                kinds[kind][stage] += timer.seconds[stage] - before.get(stage, 0.0)
            kinds[kind]["step"] += wall
    table = {}
    for kind in kinds:
        if counts[kind]:
            row = {s: 1000 * v / counts[kind] for s, v in kinds[kind].items()}
            row["host"] = row["step"] - row.get("wait", 0.0) - row.get("forward", 0.0)
            table[kind] = {"steps": counts[kind], **{s: round(v, 4) for s, v in row.items()}}
    return table


def _print(args, llm, table: dict, batch_size: int, num_prompts: int) -> None:
    spec = llm.engine.runner.spec
    spec = "" if spec is None else f", k = {args.spec_tokens}, draft model" if spec.draft is not None else \
        f", k = {args.spec_tokens}, lookup {args.prompt_lookup_min}..{args.prompt_lookup_max}"
    print(f"host ms per decode step by stage ({llm.engine.runner.device}, batch {batch_size}, {num_prompts} prompts{spec}; "
          "wait and update are part of apply, propose of prepare, dforward and dsample of propose (flatten "
          "includes the draft's); host = step - wait - forward):")
    print(f"{'kind':>6} {'steps':>5} | " + " ".join(f"{s:>8}" for s in STAGES) + f" | {'step':>7} {'host':>7}")
    for kind, row in table.items():
        print(f"{kind:>6} {row['steps']:>5} | " + " ".join(f"{row.get(s, 0.0):>8.4f}" for s in STAGES)
              + f" | {row['step']:>7.4f} {row['host']:>7.4f}")

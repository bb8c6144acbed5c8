"""Rank 0's host path per step at TP=2, batch 1, on CPU (gloo, the tiny Llama): where the engine
thread's microseconds go, with the greedy tail on and off, in one run.

    python tests/bench_tp_host.py [--steps 256] [--prompt-len 512] [--tp 2]

One request (prompt-len tokens, then `steps` greedy decode steps, overlapped as on CUDA) per
configuration; EngineCore.step of rank 0 timed by stage with perf_counter wrappers around its
parts (bound on the instances, nothing else changed):

    schedule     Scheduler.schedule
    message      TPWorkers.send_step: plain_greedy + encode_step + the pipe writes
    inputs       ModelRunner._forward less the model (flatten_step, the fill, backend inputs)
    model        the model's forward (CPU compute here: the GPU's on CUDA, not host time)
    sample       what launch does after the forward: the tail (LM head + shard argmax + all-gather)
                 or compute_logits (LM head + gloo gather) + the Sampler + the token broadcast
    wait         _TPPending.result: the wait for the step's tokens, then RunnerOutput
    update       Scheduler.update + the outputs (EngineCore._apply/_emit less the wait)
    step         all of EngineCore.step

The LM head and the collectives are CPU/gloo work here, so `sample` overstates what they cost a
GPU's host; `message`, `inputs`, `wait` and `update` are host Python on either. The worker's own
step (decode_step + its launch) runs in its process, not in these figures. Also printed: the
step message's size and encode/decode microseconds alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def timed(obj, name: str, bucket: dict, key: str):
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] = bucket.get(key, 0) + time.perf_counter_ns() - t0
    setattr(obj, name, wrapper)


def measure(folder: str, tp: int, graph_sampler: bool, steps: int, prompt_len: int) -> dict:
    from pdserve.common.engine.llm import LLM
    from pdserve.common.sampling_params import SamplingParams
    llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", tensor_parallel_size=tp,
              graph_sampler=graph_sampler, async_scheduling=True, max_model_len=prompt_len + steps + 64)
    core = llm.engine
    runner = core.runner
    spent: dict[str, int] = {}
    timed(core.scheduler, "schedule", spent, "schedule")
    timed(core.scheduler, "update", spent, "update")
    if tp > 1:
        timed(runner.workers, "send_step", spent, "message")
    timed(runner, "_forward", spent, "forward")
    timed(runner.model, "forward", spent, "model")
    timed(runner, "launch", spent, "launch")
    timed(core, "_apply", spent, "apply")
    timed(core, "_emit", spent, "emit")
    try:
        params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
        core.add_request("r", list(range(3, 3 + prompt_len)), params)
        core.step()  # the prefill (and the first decode launched behind it)
        core.step()
        spent.clear()
        wait0 = core.wait_seconds
        t0 = time.perf_counter_ns()
        num = 0
        while core.has_unfinished() and num < steps - 4:
            core.step()
            num += 1
        total = time.perf_counter_ns() - t0
        spent["wait"] = int((core.wait_seconds - wait0) * 1e9)
    finally:
        llm.shutdown()
    us = lambda ns: round(ns / num / 1000, 1)  # noqa: E731
    out = {"schedule": us(spent.get("schedule", 0)), "message": us(spent.get("message", 0)),
           "inputs": us(spent["forward"] - spent["model"]), "model": us(spent["model"]),
           "sample": us(spent["launch"] - spent["forward"] - spent.get("message", 0)),
           "wait": us(spent["wait"]), "update": us(spent["apply"] + spent["emit"] - spent["wait"]),
           "step": us(total), "steps": num}
    return out


def message_cost(prompt_len: int, reps: int = 2000) -> dict:
    """encode_step / decode_step of a batch-1 decode step at prompt_len + 128 context."""
    from pdserve.common.engine.outputs import ScheduledRequest, SchedulerOutput
    from pdserve.common.engine.tp_workers import decode_step, encode_step
    from pdserve.common.sampling_params import SamplingParams
    ctx = prompt_len + 128
    s = ScheduledRequest("req-0123456789abcdef", [-1], ctx - 1, list(range(-(-ctx // 16))), True,
                         SamplingParams(temperature=0), [], [])
    sched = SchedulerOutput([s], 1, all_greedy=True)
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        payload = encode_step(sched)
    t1 = time.perf_counter_ns()
    cache: dict = {}
    for _ in range(reps):
        decode_step(payload, cache)
    t2 = time.perf_counter_ns()
    return {"bytes": len(payload), "encode_us": round((t1 - t0) / reps / 1000, 2),
            "decode_us": round((t2 - t1) / reps / 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", default=None, help="an HF folder (default: a tiny random Llama, built here)")
    args = p.parse_args()
    folder = args.model
    if folder is None:
        from conftest import build_tiny_model, default_model_path, gguf_tokenizer_folder
        folder = build_tiny_model(tempfile.mkdtemp(prefix="pdserve-tp-host-"), "llama",
                                  gguf_tokenizer_folder(default_model_path()))
    rows = {}
    for graph_sampler in (False, True):
        rows["tail" if graph_sampler else "sampler"] = measure(folder, args.tp, graph_sampler, args.steps,
                                                               args.prompt_len)
    keys = ["schedule", "message", "inputs", "model", "sample", "wait", "update", "step"]
    print(f"TP={args.tp} batch 1, {args.steps} decode steps after a {args.prompt_len}-token prompt, "
          "rank 0's engine thread, us per step:")
    print(f"{'':<8}" + "".join(f"{k:>10}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<8}" + "".join(f"{r[k]:>10}" for k in keys))
    print("step message (batch-1 decode):", message_cost(args.prompt_len))


if __name__ == "__main__":
    main()

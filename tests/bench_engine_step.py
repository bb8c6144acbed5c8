"""The engine's per-step bookkeeping at a batch of 256, without a model (issue 11 run 3).

    python tests/bench_engine_step.py [--batch 256] [--prompt-len 256] [--output-len 128]

    Scheduler + KVCacheManager (prefix caching on) + EngineCore._outputs, driven as EngineCore
    drives them: schedule() -> a RunnerOutput with one sampled token per scheduled request ->
    update() -> the deltas; no forward pass, so what is timed is the host's Python per step,
    the part of a GPU decode step that the device does not hide. Also the runner's host work
    around the forward: `inputs` (flatten_step: the step's arrays, block tables through the
    BlockTableCache) and `sample` (Sampler.sample + logprobs on [B, 64] CPU logits, greedy
    rows: the per-row Python, the tensor ops being tiny). Prints microseconds per generated
    token for each (decode steps only: the first step's prefill is left out) and their sum.
    tests/bench_decode_host.py runs it once per code tree it compares.

    `--wire`: the decode worker's DecodeStream per step instead (services/decode/mux.py's own
    DecodeMux code: each request's delta delivered (_on_news), counted in the request metrics
    and built into the message (_build), the message serialized) and the router's reading of it (parse, per request an EngineOutput:
    delta_from_proto of each DecodeChunk, or the packed rows' PackedDelta.output where the tree
    has them), in microseconds per token at the same batch.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pdserve.common.config import SchedulerConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.model_runner import BlockTableCache, flatten_step
from pdserve.common.engine.outputs import RunnerOutput
from pdserve.common.engine.sampler import Sampler
from pdserve.common.engine.scheduler import Scheduler
from pdserve.common.request import Request
from pdserve.common.sampling_params import SamplingParams


def measure(batch: int, prompt_len: int, output_len: int, seed: int = 0) -> dict[str, float]:
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len,
                                      max_model_len=prompt_len + output_len + 16),
                      KVCacheManager(batch * (prompt_len + output_len) // 16 + batch, 16, True))
    core = EngineCore.__new__(EngineCore)  # only _outputs is used: it needs `requests`
    core.requests = {}
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        req = Request(f"r{i}", [rng.randrange(3, 500) for _ in range(prompt_len)], params, (2,))
        sched.add_request(req)
        core.requests[req.request_id] = [req]
    tables, sampler = BlockTableCache(), Sampler(torch.device("cpu"))
    logits = torch.randn(batch, 64)
    spent = {"schedule": 0.0, "inputs": 0.0, "sample": 0.0, "update": 0.0, "outputs": 0.0}
    num_tokens = 0
    first = True
    while sched.has_unfinished():
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        tables.drop(out.finished_req_ids | out.preempted_req_ids)
        decodes = [s for s in out.scheduled if len(s.input_token_ids) == 1]
        ordered = decodes + [s for s in out.scheduled if len(s.input_token_ids) > 1]
        if ordered:
            flatten_step(ordered, len(decodes), 16, tables)
        t2 = time.perf_counter()
        sample_reqs = [s for s in ordered if s.sample]
        history = {"history": out.any_host_history} if hasattr(out, "any_host_history") else {}  # older trees
        if sample_reqs:
            rows = logits[:len(sample_reqs)]
            tokens = sampler.sample(rows, sample_reqs, (2,), [None] * len(sample_reqs), **history)
            if history.get("history", True):
                sampler.logprobs(rows, tokens, sample_reqs)
        t3 = time.perf_counter()
        result = RunnerOutput(sampled_token_ids={s.req_id: 7 for s in out.scheduled if s.sample})
        t4 = time.perf_counter()
        touched = sched.update(out, result)
        t5 = time.perf_counter()
        deltas = core._outputs(touched)
        t6 = time.perf_counter()
        if not first:
            spent["schedule"] += t1 - t0
            spent["inputs"] += t2 - t1
            spent["sample"] += t3 - t2
            spent["update"] += t5 - t4
            spent["outputs"] += t6 - t5
            num_tokens += len(deltas)
        first = False
    us = {k: round(1e6 * v / max(num_tokens, 1), 3) for k, v in spent.items()}
    us["total"] = round(sum(us.values()), 3)
    return us


def measure_wire(batch: int, steps: int = 200) -> dict[str, float]:
    """Per token: the decode's DecodeMux work for one step of `batch` one-token deltas (request
    metrics counted, as a worker does), and the router's reading of the message. The mux and
    engine are built without their servicer and engine thread (only the per-step methods run)."""
    import queue
    import threading

    from pdserve.common.engine.async_llm import AsyncLLM
    from pdserve.common.outputs import EngineOutput
    from pdserve.proto import convert
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.services.decode.mux import ChunkBuilder, DecodeMux

    from pdserve.common.metrics import ServerMetrics
    from pdserve.common.request_metrics import DeltaTracker

    engine = AsyncLLM.__new__(AsyncLLM)
    engine._streams, engine._trackers, engine._inbox, engine._wake = {}, {}, queue.SimpleQueue(), threading.Event()
    engine.request_metrics = ServerMetrics("bench", 1024)  # a worker's: every delta counted
    mux = DecodeMux.__new__(DecodeMux)
    mux.engine, mux.open, mux.news, mux.pending = engine, {}, {}, []
    packed = hasattr(convert, "PackedRows")  # this tree packs rows
    if packed:
        mux.packed = convert.PackedRows()

    class _Wake:  # asyncio.Event's set() without a loop
        def set(self) -> None:
            pass
    mux.wake = mux.first_news = _Wake()
    params = SamplingParams(temperature=0, max_tokens=10 ** 6, ignore_eos=True)
    rids = [f"cmpl-{i:032x}" for i in range(batch)]
    for rid in rids:
        builder = ChunkBuilder.__new__(ChunkBuilder)
        builder.rid, builder.params, builder.done, builder.first = rid, params, set(), False
        mux.open[rid] = builder
        engine._trackers[rid] = DeltaTracker(engine.request_metrics, time.time(), 256, 1)
    decode_s = router_s = 0.0
    for step in range(steps):
        deltas = [[EngineOutput(rid, 0, [step % 500])] for rid in rids]  # the engine's, made on its thread
        t0 = time.perf_counter()
        for rid, outs in zip(rids, deltas):
            mux._on_news(rid, outs)
        if hasattr(engine, "metrics_batch"):  # this tree counts a message's metrics at once
            metrics = engine.metrics_batch()
            for rid in list(mux.news):
                mux._build(rid, metrics)
            metrics.flush()
        else:
            for rid in list(mux.news):
                mux._build(rid)
        message = pb.DecodeChunks(chunks=mux.pending)
        mux.pending = []
        if packed:
            mux.packed.fill(message)
        wire = message.SerializeToString()
        t1 = time.perf_counter()
        got = pb.DecodeChunks.FromString(wire)
        outs = [convert.delta_from_proto(c.request_id, d) for c in got.chunks for d in c.sequences]
        if packed:
            outs += [delta.output(rid) for rid, delta in convert.unpack_rows(got)]
        t2 = time.perf_counter()
        assert len(outs) == batch
        decode_s += t1 - t0
        router_s += t2 - t1
    per = 1e6 / (steps * batch)
    return {"decode_mux": round(decode_s * per, 3), "router_read": round(router_s * per, 3),
            "total": round((decode_s + router_s) * per, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="runs; the fastest is reported (the box's noise)")
    p.add_argument("--wire", action="store_true", help="the DecodeStream's per-step work instead (see above)")
    a = p.parse_args()
    if a.wire:
        runs = [measure_wire(a.batch) for _ in range(a.repeat)]
        print(json.dumps(min(runs, key=lambda r: r["total"])))
        return
    runs = [measure(a.batch, a.prompt_len, a.output_len) for _ in range(a.repeat)]
    print(json.dumps(min(runs, key=lambda r: r["total"])))


if __name__ == "__main__":
    main()

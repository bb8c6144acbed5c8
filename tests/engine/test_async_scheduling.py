"""Overlapped steps (async scheduling): step k is scheduled and launched while step k-1 runs,
its decode inputs filled on the device from k-1's sampled tokens. On CPU the overlap hides
nothing, but the bookkeeping is the same as on CUDA (where it is the default), so it is forced on
here and must give exactly the outputs of one-at-a-time steps: greedy == HF, seeded sampling,
stops found one step late (the extra token dropped), preemption, aborts, drains for requests
that need host-side history, and no leaked KV block.
"""

from __future__ import annotations

import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_correctness import MAX_TOKENS, reference


def run_llm(folder, prompts, params, **kw):
    llm = LLM(folder, dtype="float32", **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    assert engine.kv.num_requests() == 0 and engine._inflight is None
    return outs, engine


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", ["default", "chunked_16", "preemption"])
def test_overlapped_greedy_matches_hf(tiny_models, prompts, arch, variant):
    kw = {"default": {}, "chunked_16": {"max_num_batched_tokens": 16},
          "preemption": {"num_gpu_blocks_override": 24, "max_model_len": 384}}[variant]
    outs, engine = run_llm(tiny_models[arch], prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                           async_scheduling=True, **kw)
    assert [o.outputs[0].token_ids for o in outs] == reference(tiny_models, arch, prompts)
    assert engine.num_overlapped_steps > engine.num_steps // 2
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0


def test_overlapped_sampling_equals_one_at_a_time(tiny_models, prompts):
    """Seeded sampling, stop ids, stop strings, max_tokens, n: same outputs, overlapped or not;
    a request with logprobs joins half-way (steps drain and run one at a time until it ends)."""
    folder = tiny_models["llama"]
    base, _ = run_llm(folder, prompts[:4], SamplingParams(temperature=0, max_tokens=20), async_scheduling=False)
    stop_ids = [o.outputs[0].token_ids[6] for o in base]
    text = base[1].outputs[0].text
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=11 + i, max_tokens=5 + 3 * i)
              for i in range(6)]
    params += [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_ids[0]]),
               SamplingParams(temperature=0, max_tokens=20, stop=[text[len(text) // 2:len(text) // 2 + 3]]),
               SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=9),
               SamplingParams(temperature=0, max_tokens=1)]
    batch = [prompts[(i + 2) % len(prompts)] for i in range(6)] + [prompts[0], prompts[1], prompts[2], prompts[3]]
    got = {}
    for overlap in (False, True):
        llm = LLM(folder, async_scheduling=overlap, dtype="float32")
        engine = llm.engine
        for i, (p, sp) in enumerate(zip(batch, params)):
            llm.add_request(str(i), p, sp)
        outs, steps = {}, 0
        while engine.has_unfinished():
            for out in llm.step():
                if out.finished:
                    outs[out.request_id] = [(c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]
            steps += 1
            if steps == 6:  # a logprobs request: overlapping pauses while it runs
                llm.add_request("lp", prompts[2], SamplingParams(temperature=0, max_tokens=4, logprobs=2))
        assert engine.kv.num_free_blocks == engine.runner.num_blocks
        got[overlap] = outs
        assert (engine.num_overlapped_steps > 0) == overlap
    assert got[True] == got[False]
    assert got[True]["6"][0][1] == "stop" and got[True]["6"][0][0][-1] == stop_ids[0]
    assert got[True]["7"][0][1] == "stop"
    assert [len(t) for t, _, _ in got[True]["8"]] == [9, 9, 9]
    assert len(got[True]["9"][0][0]) == 1


def test_abort_while_a_step_is_in_flight(tiny_models, prompts):
    llm = LLM(tiny_models["llama"], async_scheduling=True)
    engine = llm.engine
    for i in range(4):
        llm.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=30))
    for _ in range(5):
        llm.step()
    assert engine._inflight is not None
    aborted = llm.abort(["1", "2"])
    assert {o.request_id for o in aborted} == {"1", "2"} and all(o.finished for o in aborted)
    done = {}
    while engine.has_unfinished():
        for out in llm.step():
            assert out.request_id not in ("1", "2")
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert sorted(done) == ["0", "3"] and all(len(t) == 30 for t in done.values())
    assert engine.kv.num_free_blocks == engine.runner.num_blocks


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_models, prompts):
    llm = LLM(tiny_models["llama"], async_scheduling=True)
    engine = llm.engine
    real_launch = engine.runner.launch
    calls = {"n": 0}

    def launch(sched):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("device fault")
        return real_launch(sched)
    engine.runner.launch = launch
    for i in range(3):
        llm.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=12))
    finished = {}
    while engine.has_unfinished():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
    assert set(finished.values()) == {"error"}
    engine.runner.launch = real_launch
    llm.add_request("after", prompts[3], SamplingParams(temperature=0, max_tokens=5))
    while engine.has_unfinished():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
    assert finished["after"] == "length"
    assert engine.kv.num_free_blocks == engine.runner.num_blocks

"""Speculative decoding on CUDA (Triton backend, CUDA graphs; marked gpu, skipped without CUDA):
verify steps run as one-token rows through the decode graphs and the draft's steps through its
own, the drafts left on the device for the verify step behind them (and the draft's ahead round
behind that); greedy tokens equal a run without speculation (float32, tiny models), every
self-draft is accepted, seeded n-gram outputs equal plain sampling and seeded draft-model outputs do not
depend on k; the KV pool is sized for target and draft from GPU memory and is whole again. At
batch 1 a verify step launched while a plain step runs (its first row's input filled on the
device from that step, spec_decode/pipeline.py), and a bridge step launched before a verify
step's result (every row's input filled from it), replay the graphs with the same tokens.

Every engine here sizes its pool from 5 % of the GPU (UTIL): at 0.5-0.9 of an H200 these 8 KB-per-
block tiny models got 8-15 million KV blocks, each a Python object (BlockPool before f2be5533
made them lazily), ~10 s to build and free per engine, ten engines in this file: the file ran
past its 170 s limit in the third test (tests/gpu_spec_guess.sh). Each test has a hard limit (pytest-timeout, thread method: all
threads' stacks are dumped and the run ends), so a hang fails fast with its stack instead of
using up the GPU call; the CPU runs the third test's flow in
tests/engine/test_spec_decode_overlap.py (test_guessed_flow_as_on_cuda)."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_spec_decode_overlap import guessed_flow

# 120 s a test: each took < ~45 s with the pool below, the first one compiling the kernels on a fresh machine
# (a hang dumps every thread's stack and ends the run)
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120, method="thread")]
UTIL = 0.05  # gpu_memory_utilization of every engine here: ~0.6 M blocks, sized from GPU memory

# drafts from the host, one verify round per step: these tests are about those steps (device
# rounds, the CUDA default for a lone greedy request, have their own test below)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "device_rounds": 0}


def run(folder, prompts, params, **kw):
    """Token ids per prompt, and what the checks read from the engine before it is shut down
    (its GPU memory released for the next run)."""
    llm = LLM(folder, device="cuda", dtype="float32", max_model_len=512, **{"gpu_memory_utilization": UTIL, **kw})
    engine = llm.engine
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    tokens = [[c.token_ids for c in o.outputs] for o in outs]
    spec = engine.runner.spec
    info = {"spec": spec, "replays": engine.runner.graphs.num_replays, "stats": engine.stats().spec_decode,

            "draft_replays": spec.draft.runner.graphs.num_replays if spec is not None and spec.draft else None}
    llm.shutdown()
    assert torch.cuda.memory_allocated() < 2**30, "shutdown left the engine's memory allocated"
    return tokens, info


def test_greedy_equal_and_verify_steps_replay_graphs(tiny_models, prompts):
    folder = tiny_models["llama"]
    batch = prompts[:8]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    want, _ = run(folder, batch, greedy)
    for spec in (NGRAM, {"model": folder, "num_speculative_tokens": 3},
                 {"model": tiny_models["qwen3"], "num_speculative_tokens": 4}):
        got, info = run(folder, batch, greedy, speculative_config=spec)
        assert got == want, spec
        spec_decoder = info["spec"]
        assert spec_decoder.verify_as_decodes and info["replays"] > 0
        if info["stats"].num_draft_tokens > 0:  # verify steps ran as one-token rows (the graph form),
            assert spec_decoder.num_row_steps > 0  # their greedy tokens from the graphs' tail (argmax)
            assert spec_decoder.num_tail_verifies > 0
        if spec_decoder.draft is not None:  # greedy drafts stayed on the device (decoder.DEFER_DRAFTS)
            assert info["draft_replays"] > 0 and spec_decoder.num_deferred_verifies > 0
        st = info["stats"]
        if spec.get("model") == folder:
            assert st.num_accepted_tokens == st.num_draft_tokens > 0


def test_seeded_sampling_rules_hold_on_cuda(tiny_models, prompts):
    folder = tiny_models["llama"]
    batch = prompts[:6]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=50 + i, max_tokens=16) for i in range(len(batch))]
    plain, _ = run(folder, batch, params)
    ngram, _ = run(folder, batch, params, speculative_config=NGRAM)
    assert ngram == plain
    k2, _ = run(folder, batch, params, speculative_config={"model": tiny_models["qwen3"], "num_speculative_tokens": 2})
    k4, _ = run(folder, batch, params, speculative_config={"model": tiny_models["qwen3"], "num_speculative_tokens": 4})
    assert k2 == k4


def test_drafts_past_a_guessed_token_in_flight_on_cuda(tiny_model_factory, tmp_path_factory, monkeypatch):
    """A 512-token vocabulary (its greedy outputs soon repeat: the lookup finds drafts), prompts one
    at a time, overlapped speculative steps (off by default: pipeline.OVERLAP_MAX_BATCH lifted):
    guessed verify steps happen, some guesses wrong, and bridge steps (launched before a
    verify step's result, inputs filled on the device from its rows); tokens equal a run without
    drafts (the flow of test_spec_decode_overlap.guessed_flow, which the CPU runs too)."""
    from pdserve.common.engine.spec_decode import pipeline
    monkeypatch.setattr(pipeline, "OVERLAP_MAX_BATCH", 1 << 20)
    folder = tiny_model_factory(str(tmp_path_factory.mktemp("v512") / "llama"), "llama", vocab_size=512,
                                initializer_range=0.02)
    want, _ = guessed_flow(folder, "cuda", gpu_memory_utilization=UTIL)
    got, (st, replays, overlapped, spec) = guessed_flow(folder, "cuda", speculative_config=NGRAM,
                                                        gpu_memory_utilization=UTIL)
    assert overlapped and replays[0] > 0
    assert got == want
    assert st.num_guessed_drafts > st.num_guess_hits > 0, st
    assert spec.num_bridge_steps > 0 and spec.num_row_steps > 0  # bridge steps replayed as one-token rows


def test_verify_rows_read_as_groups_on_cuda(tiny_model_factory, tmp_path_factory, monkeypatch):
    """A verify step's rows of one request replay the grouped graph (its decode attention reads
    their K/V once per group; decoder.GROUPED_MIN_CONTEXT lowered to 0: these contexts are
    short): tokens equal a run without drafts, prompts one at a time (the 512-token vocabulary of
    the test above, whose outputs repeat: the lookup finds drafts)."""
    from pdserve.common.engine.spec_decode import decoder
    monkeypatch.setattr(decoder, "GROUPED_MIN_CONTEXT", 0)
    folder = tiny_model_factory(str(tmp_path_factory.mktemp("v512g") / "llama"), "llama", vocab_size=512,
                                initializer_range=0.02)
    want, _ = guessed_flow(folder, "cuda", gpu_memory_utilization=UTIL)
    got, (st, (_, grouped), _, _) = guessed_flow(folder, "cuda", speculative_config=NGRAM, gpu_memory_utilization=UTIL)
    assert got == want
    assert st.num_draft_tokens > 0 and grouped > 0


def test_self_draft_drafts_ahead_of_its_verify_steps_on_cuda(tiny_models, prompts):
    """Two requests (within decoder.AHEAD_MAX_REQUESTS), the target as its own draft: greedy drafts
    stay on the device, the draft's ahead round runs behind each verify step (its device time read
    once it is done: CUDA events) and the next proposals start from it; tokens equal a run without
    speculation and every draft is accepted."""
    folder = tiny_models["llama"]
    batch = prompts[:2]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    want, _ = run(folder, batch, greedy)
    got, info = run(folder, batch, greedy, speculative_config={"model": folder, "num_speculative_tokens": 3})
    assert got == want
    spec, st = info["spec"], info["stats"]
    assert st.num_accepted_tokens == st.num_draft_tokens > 0
    assert spec.num_deferred_verifies > 0 and spec.draft.num_ahead >= spec.draft.num_heads_used > 0
    assert spec.propose_seconds > 0


@pytest.mark.parametrize("grouped", [False, True])
def test_device_rounds_replay_the_verify_graph_on_cuda(tiny_model_factory, tmp_path_factory, monkeypatch, grouped):
    """n-gram's default on CUDA for a lone greedy request: R verify rounds a step, the lookup on the
    device and each round's rows replaying the (k + 1)-row graph and its tail, inputs written on
    the device (spec_decode/device_rounds.py); tokens equal a run without drafts, prompts one at a
    time (the 512-token vocabulary above, whose outputs repeat). `grouped`: the rows read as one
    group (decoder.GROUPED_MIN_CONTEXT lowered to 0)."""
    from pdserve.common.engine.spec_decode import decoder, device_rounds
    if grouped:
        monkeypatch.setattr(decoder, "GROUPED_MIN_CONTEXT", 0)
    folder = tiny_model_factory(str(tmp_path_factory.mktemp("v512r") / "llama"), "llama", vocab_size=512,
                                initializer_range=0.02)
    want, _ = guessed_flow(folder, "cuda", gpu_memory_utilization=UTIL)
    spec = {key: value for key, value in NGRAM.items() if key != "device_rounds"}
    got, (st, (replays, grouped_replays), _, decoder_) = guessed_flow(folder, "cuda", speculative_config=spec,
                                                                      gpu_memory_utilization=UTIL)
    assert got == want
    rounds = decoder_.device_rounds
    assert rounds.rounds == device_rounds.DEFAULT_ROUNDS and rounds.num_rounds > rounds.num_steps > 0
    assert st.num_drafts > 0 and st.num_accepted_tokens > 0 and replays >= rounds.num_rounds
    assert (grouped_replays > 0) == grouped

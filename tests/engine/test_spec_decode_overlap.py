"""Speculative decoding with overlapped steps (async scheduling, spec_decode/pipeline.py), forced
on here on the CPU: a step's deltas come after the next step's launch, and a step that drafted
nothing lets the next launch first (a plain decode, its input filled from the step in flight).
Outputs are those of one-at-a-time steps: greedy equals HF, seeded n-gram outputs equal plain
sampling, a draft model's seeded outputs do not change; verify steps and overlapped steps both
happen, no KV block leaks and none is held past a request's tokens. A step launched while a
plain step runs verifies drafts looked up past its input token in flight, the first token
found guessing it: wrong guesses happen, and outputs still equal HF's (the real token is filled
on the device; a run that trusted the guess would diverge at the first wrong one).

The model: a random Llama with a 512-token vocabulary, whose greedy outputs soon repeat, so the
n-gram lookup finds drafts in most steps and none in some (the 49152-token fixtures rarely match)."""

from __future__ import annotations

import random

import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_correctness import hf_greedy
from tests.engine.test_spec_decode import NGRAM, draft, generate, tokens


@pytest.fixture(autouse=True)
def overlap_any_batch(monkeypatch):
    """These tests check the overlapped steps' mechanism in batches too: the engine's policy
    (pipeline.OVERLAP_MAX_BATCH: one step at a time from 4 running requests) lifted, except in
    test_large_batches_step_one_at_a_time, which checks it."""
    from pdserve.common.engine.spec_decode import pipeline
    monkeypatch.setattr(pipeline, "OVERLAP_MAX_BATCH", 1 << 20)


@pytest.fixture(scope="module")
def small_vocab(tiny_model_factory, tmp_path_factory):
    folder = tiny_model_factory(str(tmp_path_factory.mktemp("v512") / "llama"), "llama", vocab_size=512,
                                initializer_range=0.02)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 9, 40, 77, 130, 200)]
    return folder, prompts


@pytest.mark.parametrize("variant", [{}, {"num_gpu_blocks_override": 72, "max_model_len": 256}])
def test_overlapped_ngram_greedy_matches_hf(small_vocab, variant):
    folder, prompts = small_vocab
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, engine = generate(folder, prompts, params, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4, **variant)
    assert tokens(outs) == hf_greedy(folder, prompts, 40)
    st = engine.stats().spec_decode
    assert st.num_drafts > 10 and st.num_accepted_tokens > 0  # verify steps ran ...
    assert engine.num_overlapped_steps > 0  # ... and steps without drafts let the next one launch first
    assert engine._inflight is None
    if variant:
        assert engine.scheduler.num_preemptions > 0


def test_overlapped_seeded_ngram_equals_plain_sampling(small_vocab):
    """n-gram drafts are one-hot: seeded outputs are those of plain sampling, overlapped or not;
    with a stop id and a stop string on the way; verify as one-token rows (the CUDA form)."""
    folder, prompts = small_vocab
    base, _ = generate(folder, prompts[:2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = base[1].outputs[0].text
    params = [SamplingParams(temperature=0.3, seed=30 + i, max_tokens=30, ignore_eos=True) for i in range(4)]
    params += [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tokens(base)[0][12]]),
               SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[text[-3:]])]
    plain, _ = generate(folder, prompts, params)
    spec, engine = generate(folder, prompts, params, speculative_config=NGRAM, async_scheduling=True,
                            decode_rows=True)
    assert tokens(spec) == tokens(plain)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    st = engine.stats().spec_decode  # (drafts past a wrong guess are dropped, not verified)
    assert st.num_drafts + st.num_guessed_drafts > 0 and engine.num_overlapped_steps > 0


def test_default_policy_launches_before_the_deltas_go_out(small_vocab, monkeypatch):
    """The engine's own policy (pipeline.OVERLAP_MAX_BATCH = 1: no step launches before the
    previous result) with async scheduling on, as on CUDA: each step's deltas are returned after
    the next step has launched (the caller's work on them runs while the device computes), no
    step launches before the previous result, and outputs are those of plain decoding, with
    seeded draws, a stop id and a stop string that end requests while their next step runs."""
    from pdserve.common.engine.spec_decode import pipeline
    monkeypatch.setattr(pipeline, "OVERLAP_MAX_BATCH", 1)
    folder, prompts = small_vocab
    base, _ = generate(folder, prompts[:2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = base[1].outputs[0].text
    params = [SamplingParams(temperature=0.3, seed=40 + i, max_tokens=30, ignore_eos=True) for i in range(3)]
    params += [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tokens(base)[0][12]]),
               SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[text[-3:]])]
    plain, _ = generate(folder, prompts, params)
    llm = LLM(folder, dtype="float32", speculative_config=NGRAM, async_scheduling=True, block_size=4)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.add_request(str(i), p, sp)
    done, behind, steps = {}, 0, 0
    while engine.has_unfinished():
        outs = llm.step()
        steps += 1
        behind += bool(outs) and engine._inflight is not None  # deltas out, the next step running
        done.update((o.request_id, o) for o in outs if o.finished)
    spec = [done[str(i)] for i in range(len(prompts))]
    assert tokens(spec) == tokens(plain)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    assert engine.num_overlapped_steps == 0 and engine._inflight is None
    assert behind > steps // 2, (behind, steps)
    assert engine.stats().spec_decode.num_accepted_tokens > 0
    assert engine.kv.num_free_blocks == engine.runner.num_blocks


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_aborts_while_a_speculative_step_runs(small_vocab, monkeypatch, method):
    """Requests aborted between steps while the next speculative step is in flight (async
    scheduling, the engine's own policy): the others finish with plain decoding's tokens, the
    aborted ones report "abort" once, and every block is back in the pool."""
    from pdserve.common.engine.spec_decode import pipeline
    monkeypatch.setattr(pipeline, "OVERLAP_MAX_BATCH", 1)
    folder, prompts = small_vocab
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = generate(folder, prompts, params)
    spec = NGRAM if method == "ngram" else draft(folder)
    llm = LLM(folder, dtype="float32", speculative_config=spec, async_scheduling=True, block_size=4)
    engine = llm.engine
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, params)
    done, aborted, steps, finished = {}, {"1", "4"}, 0, []
    while engine.has_unfinished():
        outs = llm.step()
        steps += 1
        if steps in (3, 7):  # one aborted at each point, with a step launched for it
            assert engine._inflight is not None
            outs += llm.abort([sorted(aborted)[steps == 7]])
        finished += [o.request_id for o in outs if o.finished]
        done.update((o.request_id, o) for o in outs if o.finished)
    assert sorted(finished) == sorted(done)  # each request finished once
    assert {rid for rid, o in done.items() if o.outputs[0].finish_reason == "abort"} == aborted
    kept = [i for i in range(len(prompts)) if str(i) not in aborted]
    assert [done[str(i)].outputs[0].token_ids for i in kept] == [tokens(plain)[i] for i in kept]
    assert engine.stats().spec_decode.num_drafts > 0
    assert engine.kv.num_free_blocks == engine.runner.num_blocks and engine._inflight is None


def test_overlapped_draft_model_outputs_do_not_change(small_vocab):
    """A draft model never lets a step launch before the previous one's result (it drafts from
    the tokens): only the deltas move behind the next launch; greedy and seeded outputs unchanged."""
    folder, prompts = small_vocab
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 3
    params += [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=12) for i in range(3)]
    one, _ = generate(folder, prompts, params, speculative_config=draft(folder))
    overlapped, engine = generate(folder, prompts, params, speculative_config=draft(folder), async_scheduling=True)
    assert tokens(overlapped) == tokens(one)
    assert tokens(overlapped)[:3] == hf_greedy(folder, prompts[:3], 20)
    assert engine.num_overlapped_steps == 0 and engine.stats().spec_decode.num_accepted_tokens > 0


@pytest.mark.parametrize("decode_rows", [False, True])
def test_drafts_past_a_guessed_token_in_flight_verify_exactly(small_vocab, decode_rows):
    """Batch 1, where a step without drafts lets the next launch first: that one drafts past the
    token in flight. Some guesses are wrong and some right; greedy equals HF, seeded n-gram
    equals plain sampling, blocks return (chunk form, and the one-token rows CUDA graphs replay)."""
    folder, prompts = small_vocab
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, engine = generate(folder, prompts, greedy, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4, one_at_a_time=True, decode_rows=decode_rows)
    assert tokens(outs) == hf_greedy(folder, prompts, 40)
    st = engine.stats().spec_decode
    assert st.num_guessed_drafts > st.num_guess_hits > 0, st  # guesses wrong and right, outputs exact
    assert engine._inflight is None
    seeded = [SamplingParams(temperature=0.5, seed=40 + i, max_tokens=30, ignore_eos=True) for i in range(3)]
    plain, _ = generate(folder, prompts[3:], seeded, one_at_a_time=True)
    spec, engine = generate(folder, prompts[3:], seeded, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, one_at_a_time=True, decode_rows=decode_rows)
    assert tokens(spec) == tokens(plain)
    assert engine.stats().spec_decode.num_guessed_drafts > 0


def guessed_prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (9, 40, 77, 130)]


def guessed_flow(folder, device, **kw):
    """The flow of test_spec_decode_gpu.test_drafts_past_a_guessed_token_in_flight_on_cuda: four
    prompts (`guessed_prompts`: 9 .. 130 tokens of a 512-token vocabulary) through LLM.generate
    one at a time (batch 1), default block size, max_model_len 512, 40 greedy tokens each; verify
    steps run as one-token rows on either device. -> (tokens per prompt, (spec stats, graph
    replays (of them grouped: a second int), async scheduling, the runner's SpecDecoder)); the
    pool is whole."""
    prompts = guessed_prompts()
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(folder, device=device, dtype="float32", max_model_len=512, **kw)
    engine = llm.engine
    outs = [llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    assert engine._inflight is None
    graphs = engine.runner.graphs
    replays = None if graphs is None else (graphs.num_replays, graphs.num_grouped_replays)
    info = engine.stats().spec_decode, replays, engine.async_scheduling, engine.runner.spec
    llm.shutdown()
    return outs, info


def test_guessed_flow_as_on_cuda(small_vocab):
    """The GPU test's flow on the CPU (same engine code but graphs and events): it finishes, with
    guessed verify steps (wrong and right) as one-token rows, and tokens equal HF's."""
    folder, _ = small_vocab
    got, (st, _, overlapped, spec) = guessed_flow(folder, "cpu", speculative_config=NGRAM, async_scheduling=True)
    assert got == hf_greedy(folder, guessed_prompts(), 40)
    assert overlapped and spec.num_row_steps > 0 and spec.num_bridge_steps > 0
    assert st.num_guessed_drafts > st.num_guess_hits > 0, st


def test_large_batches_step_one_at_a_time(small_vocab, monkeypatch):
    """From OVERLAP_MAX_BATCH running requests the speculative engine runs its steps one at a time
    (overlapped, it was slower than that at batch 16 on the GPU); below, overlapped. Six prompts
    of different lengths, max_tokens 10 .. 60 (the batch shrinks as they finish): outputs equal
    HF's, steps with drafts and overlapped steps both happen, and none was launched with four or
    more requests running."""
    from pdserve.common.engine.spec_decode import pipeline
    monkeypatch.setattr(pipeline, "OVERLAP_MAX_BATCH", 4)
    folder, prompts = small_vocab
    lengths = [10, 20, 30, 40, 50, 60]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm = LLM(folder, dtype="float32", speculative_config=NGRAM, async_scheduling=True, block_size=4)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.add_request(str(i), p, sp)
    done, overlapped_at = {}, []
    while engine.has_unfinished():
        running, before = engine.scheduler.num_running(), engine.num_overlapped_steps
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
        if engine.num_overlapped_steps > before:
            overlapped_at.append(running)
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    outs = [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    assert outs == [hf_greedy(folder, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert overlapped_at and max(overlapped_at) < 4, overlapped_at
    assert engine.stats().spec_decode.num_drafts > 0


def test_bridge_steps_exact_and_a_bridge_without_its_row(small_vocab):
    """Bridge steps (pipeline.py: launched before the verify step's result, one row per number of
    drafts it may accept) in a batch of 3 on a short pool (72 blocks of 4, max_model_len 256,
    preemptions): some bridged request gets fewer rows than its outcome needs (the pool short for
    the bridge's slots) and no token from it (the scheduler takes its token in flight back);
    greedy equals HF, no block held past a request's tokens, the pool whole at the end."""
    folder, prompts = small_vocab
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, engine = generate(folder, prompts[3:], greedy, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4, decode_rows=True, num_gpu_blocks_override=72,
                            max_model_len=256)
    assert tokens(outs) == hf_greedy(folder, prompts[3:], 40)
    spec = engine.runner.spec
    assert spec.num_bridge_steps > 0 and spec.num_bridge_void > 0 and engine._inflight is None
    assert engine.stats().spec_decode.num_accepted_tokens > 0


def test_masked_request_shares_a_verify_step_launched_while_its_token_is_in_flight(small_vocab):
    """An allowed_token_ids request (not drafted) in a verify step launched before the previous
    step's result: its mask is filled with its token in flight (as in a plain overlapped step)."""
    pytest.importorskip("xgrammar")
    folder, prompts = small_vocab
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    allowed = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, allowed_token_ids=[28, 29, 30, 31, 40])
    params = [greedy, allowed, greedy]
    plain, _ = generate(folder, prompts[2:5], params)
    spec, engine = generate(folder, prompts[2:5], params, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4)
    assert tokens(spec) == tokens(plain)
    assert set(tokens(spec)[1]) <= {28, 29, 30, 31, 40}
    assert engine.stats().spec_decode.num_guessed_drafts > 0


@pytest.mark.parametrize("bridge", [False, True])
def test_drafts_past_a_wrong_guess_are_dropped_and_the_next_step_launches_first(small_vocab, bridge, monkeypatch):
    """Batch 1, greedy: once the plain step's token shows a guess wrong, that step's drafts are
    dropped (its row 0's token only) and the next step launches before its result, looking up on
    the history with the surprising token. The engine's rounds are exactly those of the sweep's
    replay of this policy (bench_spec_sweep.replay) on the same outputs, and differ from the
    replay that verifies wrong guesses' drafts and waits for them (the engine before). With
    bridge steps (pipeline.BRIDGE, the default) and without."""
    from pdserve.common.engine.spec_decode import pipeline
    from pdserve.services.bench_spec_sweep import replay
    monkeypatch.setattr(pipeline, "BRIDGE", bridge)
    folder, prompts = small_vocab
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, engine = generate(folder, prompts, greedy, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4, one_at_a_time=True, decode_rows=True)
    assert tokens(outs) == hf_greedy(folder, prompts, 40)
    samples = list(zip(prompts, tokens(outs)))
    lo, hi, k = NGRAM["prompt_lookup_min"], NGRAM["prompt_lookup_max"], NGRAM["num_speculative_tokens"]
    r = replay(samples, lo, hi, k, 40, plain_ms=1.0, verify_ms=1.0, bridge=bridge)
    kept = replay(samples, lo, hi, k, 40, plain_ms=1.0, verify_ms=1.0, drop=False)
    st = engine.stats().spec_decode
    assert r.dropped > 0 and r.guess_hits > 0 and engine.runner.spec.num_row_steps > 0
    assert engine.runner.spec.num_bridge_steps == r.bridge_steps and (r.bridge_steps > 0) == bridge
    assert (st.num_guessed_drafts, st.num_guess_hits, st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == \
        (r.guess_steps, r.guess_hits, r.verify_steps - r.dropped, r.draft_tokens, r.accepted)
    assert (kept.verify_steps, kept.draft_tokens) != (r.verify_steps - r.dropped, r.draft_tokens)


def test_rejected_requests_cool_down_in_a_batch(small_vocab):
    """Per-request adaptive drafting (SpecDecoder._cool_down): in a batch, a request whose drafts
    were all rejected skips drafting for 1, 2, 4 .. 16 of its next steps, reset by a round that
    accepts any; at batch 1 it always drafts. Seeded sampling at temperature 1 (most drafts
    rejected) still gives plain sampling's tokens, and no block leaks."""
    from pdserve.common.config import SpeculativeConfig
    from pdserve.common.engine.outputs import ScheduledRequest
    from pdserve.common.engine.spec_decode.decoder import COOL_MAX, SpecDecoder
    dec = SpecDecoder(SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1,
                                        prompt_lookup_max=2), runner=None)
    reqs = [ScheduledRequest(req_id=r, input_token_ids=[5], start_pos=4, block_ids=[0], sample=True,
                             params=SamplingParams(), prompt_token_ids=[1, 2, 3, 4], output_token_ids=[5],
                             num_spec_slots=3) for r in "ab"]
    lengths = []
    for _ in range(6):
        dec._after_round("a", 3, 0)
        lengths.append(dec._cool["a"][0])
    assert lengths == [1, 2, 4, 8, COOL_MAX, COOL_MAX]
    kept = [[s.req_id for s in dec._cool_down(reqs)] for _ in range(COOL_MAX + 1)]
    assert kept == [["b"]] * COOL_MAX + [["a", "b"]] and dec.num_cooled == COOL_MAX
    dec._after_round("a", 3, 2)
    assert "a" not in dec._cool
    dec._after_round("b", 3, 0)
    dec.forget(["b"])  # finished or preempted: its cool-down goes
    assert not dec._cool
    folder, prompts = small_vocab
    seeded = [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=40, ignore_eos=True) for i in range(len(prompts))]
    plain, _ = generate(folder, prompts, seeded)
    spec, engine = generate(folder, prompts, seeded, check_blocks=True, speculative_config=NGRAM,
                            async_scheduling=True, block_size=4, decode_rows=True)
    assert tokens(spec) == tokens(plain)
    assert engine.runner.spec.num_cooled > 0 and engine.stats().spec_decode.num_drafts > 0

"""Speculative decoding in the engine (tiny float32 models, CPU): greedy outputs equal HF's with
n-gram drafts, with the target as its own draft (every draft accepted, counters exact) and with
an unrelated draft (nearly every draft rejected: KV rolled back, no block leaked), under chunked
prefill, prefix caching and preemption; seeded sampling with a draft model gives the same tokens
whatever k and the token budget; requests that do not speculate share the batch unchanged."""

from __future__ import annotations

import json
import os

import pytest

from pdserve.common.config import ConfigError
from pdserve.common.engine.kv_cache_manager import cdiv
from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_correctness import MAX_TOKENS, reference

# every draft fed: the mechanics tests count drafts and steps (the cost budget, which CPU engines
# default to, decides from step times: test_draft_budget.py)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "draft_budget": "all"}
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
# prompts[:7] (1..290 tokens, three sharing a 120-token prefix) keep the runs short; the
# preemption variant's pool (256 tokens) cannot hold them all at once.
FEW = 7
VARIANTS = {"default": {}, "chunked_16": {"max_num_batched_tokens": 16},
            "preemption": {"num_gpu_blocks_override": 64, "max_model_len": 192, "block_size": 4},
            "no_prefix_cache": {"enable_prefix_caching": False}}


def draft(folder: str, k: int = 3) -> dict:
    return {"model": folder, "num_speculative_tokens": k}


def generate(folder, prompts, params, check_blocks: bool = False, decode_rows: bool | None = None,
             one_at_a_time: bool = False, pin_cost: tuple[float, float] | None = None, **kw):
    """Run to completion step by step; after each step no request holds a block past its tokens
    (rejected drafts' blocks were freed) unless it is in a step still running (overlapped steps),
    and at the end the pool is whole again. `decode_rows`: verify (and draft) as one-token rows,
    the form CUDA graphs replay (the CPU's too for the target; forced for the draft here), or False:
    as chunks (None: the engine's choice). `pin_cost`: the draft budget's step cost (a, b) fixed
    instead of fitted (test_draft_budget.py). `one_at_a_time`: each prompt added when
    the one before has finished (batch 1). float32 unless asked: outputs are compared with HF's
    token for token."""
    llm = LLM(folder, **{"dtype": "float32", **kw})
    engine = llm.engine
    if decode_rows is not None:
        engine.runner.spec.verify_as_decodes = decode_rows
    if pin_cost is not None:
        engine.runner.spec.budget.cost_model = lambda: pin_cost
    if decode_rows:
        if engine.runner.spec.draft is not None:
            engine.runner.spec.draft.decode_rows = True
    params = params if isinstance(params, list) else [params] * len(prompts)
    batches = [[i] for i in range(len(prompts))] if one_at_a_time else [range(len(prompts))]
    done = {}
    for batch in batches:
        for i in batch:
            llm.add_request(str(i), prompts[i], params[i])
        while engine.has_unfinished():
            for out in llm.step():
                if out.finished:
                    done[out.request_id] = out
            if check_blocks:
                bs = engine.kv.block_size
                for req in engine.scheduler.running:  # (a request in a step still in flight holds its slots)
                    assert req.num_inflight or len(req.block_ids) <= cdiv(req.num_tokens, bs), req
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    assert engine.kv.num_requests() == 0
    return [done[str(i)] for i in range(len(prompts))], engine


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_self_draft_greedy_matches_hf_and_accepts_everything(tiny_models, prompts, variant, monkeypatch):
    """(The draft's ahead round runs at every batch size here: decoder.AHEAD_MAX_REQUESTS.)"""
    from pdserve.common.engine.spec_decode import decoder
    monkeypatch.setattr(decoder, "AHEAD_MAX_REQUESTS", len(prompts))
    monkeypatch.setattr(decoder, "AHEAD_ON_CPU", True)
    folder = tiny_models["llama"]
    batch = prompts if variant == "default" else prompts[:FEW]
    outs, engine = generate(folder, batch, GREEDY, speculative_config=draft(folder), **VARIANTS[variant])
    assert tokens(outs) == reference(tiny_models, "llama", prompts)[:len(batch)]
    st = engine.stats().spec_decode
    assert st.num_draft_tokens > 0 and st.num_accepted_tokens == st.num_draft_tokens
    assert engine.runner.spec.num_deferred_verifies > 0  # greedy: the drafts stayed on the device
    draft_model = engine.runner.spec.draft  # every draft accepted: next first drafts sampled ahead, and used
    assert draft_model.num_ahead >= draft_model.num_heads_used > 0
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("variant,defer", [("default", True), ("preemption", True), ("default", False)])
def test_unrelated_draft_greedy_matches_hf_and_returns_every_block(tiny_models, prompts, variant, defer, monkeypatch):
    """A Qwen3-shaped random draft for the Llama target: almost every draft is rejected (the
    per-request cool-down off, so that every step drafts and rolls back). `defer`: the greedy
    drafts stay on the device until the verify step's result (decoder.DEFER_DRAFTS), or the host
    reads them before it launches that step."""
    from pdserve.common.engine.spec_decode import decoder
    monkeypatch.setattr(decoder, "COOL_MAX", 0)
    monkeypatch.setattr(decoder, "DEFER_DRAFTS", defer)
    monkeypatch.setattr(decoder, "AHEAD_MAX_REQUESTS", FEW)
    monkeypatch.setattr(decoder, "AHEAD_ON_CPU", True)
    outs, engine = generate(tiny_models["llama"], prompts[:FEW], GREEDY, check_blocks=True,
                            speculative_config=draft(tiny_models["qwen3"], k=3),
                            **{"block_size": 4, **VARIANTS[variant]})
    assert tokens(outs) == reference(tiny_models, "llama", prompts)[:FEW]
    st = engine.stats().spec_decode
    assert st.num_draft_tokens > 300 and st.acceptance_rate < 0.2
    spec = engine.runner.spec
    assert (spec.num_deferred_verifies > 0) == defer
    assert (spec.draft.num_ahead > 0) == defer  # drafted ahead behind the verify steps, mostly dropped
    assert spec.draft.num_heads_used <= spec.draft.num_ahead / 2
    assert spec.propose_seconds > 0  # the draft's cost is counted either way (bench spec's draft ms per step)
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("drafter", ["self", "qwen3"])
def test_verify_as_one_token_rows_gives_the_same_tokens(tiny_models, prompts, drafter, monkeypatch):
    """The CUDA-graph form of a verify step ([t, d1 .. dn] as n + 1 decode rows) and of the draft's
    catch-up and ahead round: greedy equals HF, seeded equals the chunk form."""
    from pdserve.common.engine.spec_decode import decoder
    monkeypatch.setattr(decoder, "AHEAD_MAX_REQUESTS", 4)
    monkeypatch.setattr(decoder, "AHEAD_ON_CPU", True)
    folder = tiny_models["llama"]
    spec = draft(folder if drafter == "self" else tiny_models["qwen3"], k=3)
    batch = prompts[:4]
    outs, engine = generate(folder, batch, GREEDY, decode_rows=True, speculative_config=spec, block_size=4)
    assert tokens(outs) == reference(tiny_models, "llama", prompts)[:4]
    assert engine.runner.spec.num_row_steps > 0  # steps of decodes and verify chunks ran as one-token rows
    if drafter == "self":
        st = engine.stats().spec_decode
        assert st.num_accepted_tokens == st.num_draft_tokens > 0
        assert engine.runner.spec.draft.num_heads_used > 0  # the ahead round as one-token rows too
    params = [SamplingParams(temperature=0.8, seed=20 + i, max_tokens=10) for i in range(3)]
    rows, _ = generate(folder, batch[:3], params, decode_rows=True, speculative_config=spec)
    chunks, _ = generate(folder, batch[:3], params, speculative_config=spec, decode_rows=False)
    assert tokens(rows) == tokens(chunks)


def test_ngram_greedy_matches_hf(tiny_models, prompts):
    outs, engine = generate(tiny_models["llama"], prompts, GREEDY, check_blocks=True, speculative_config=NGRAM,
                            block_size=4, max_num_batched_tokens=64)
    assert tokens(outs) == reference(tiny_models, "llama", prompts)
    assert engine.stats().spec_decode.num_drafts > 0
    # the steps without drafts sampled by the greedy tail (LM head -> argmax), verify steps by verify
    assert engine.runner.num_greedy_tail_steps > 0


@pytest.mark.parametrize("variant", ["default", "chunked_16"])
def test_the_draft_takes_each_prompt_in_its_prefill_step(tiny_models, prompts, variant):
    """A draft model is fed a prompt's chunks in the steps that prefill them (after the target's
    step is queued), so no proposal catches up over a prompt: every chunk a proposal feeds is at
    most k + 1 tokens (the last round's draft and the token after it), and every draft of the
    self-draft is still accepted (its KV at the prompt's positions is right, shared prefixes too)."""
    folder = tiny_models["llama"]
    llm = LLM(folder, dtype="float32", speculative_config=draft(folder, k=3), **VARIANTS[variant])
    proposer = llm.engine.runner.spec.draft
    fed, forward_greedy = [], proposer.runner.forward_greedy  # (greedy: the draft's rounds take the tail's tokens)

    def recording(sched):
        fed.append(max(s.num_tokens for s in sched.scheduled))
        return forward_greedy(sched)
    proposer.runner.forward_greedy = recording
    outs = llm.generate(prompts[:FEW], GREEDY)
    assert tokens(outs) == reference(tiny_models, "llama", prompts)[:FEW]
    assert max(len(p) for p in prompts[:FEW]) > 4 and fed and max(fed) <= 4
    assert llm.engine.runner.spec.prefill_seconds > 0
    st = llm.engine.stats().spec_decode
    assert st.num_draft_tokens > 0 and st.num_accepted_tokens == st.num_draft_tokens


def test_self_draft_counters_are_exact(tiny_models, prompts):
    """k = 3, 24 tokens each: the first token plain, then windows of 4 tokens (3 accepted drafts
    + 1), the last window capped by max_tokens to 2 drafts: 6 drafts of 17 tokens per request."""
    folder = tiny_models["llama"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs, engine = generate(folder, prompts, params, speculative_config=draft(folder))
    n = len(prompts)
    assert [len(t) for t in tokens(outs)] == [24] * n
    st = engine.stats()
    assert (st.spec_decode.num_drafts, st.spec_decode.num_draft_tokens, st.spec_decode.num_accepted_tokens) == \
        (6 * n, 17 * n, 17 * n)
    assert st.spec_decode.accepted_per_pos == [6 * n, 6 * n, 5 * n]
    assert st.spec_decode.mean_accepted_length == pytest.approx(1 + 17 / 6)
    assert st.num_generated_tokens == 24 * n
    assert st.num_steps == 1 + 6  # one prefill step for all, then six verify steps


@pytest.mark.parametrize("drafter", ["self", "qwen3"])
def test_seeded_sampling_with_a_draft_model_does_not_depend_on_k_or_the_budget(tiny_models, prompts, drafter):
    """Every output position after the first is decided by the draft's token for it (drawn from
    its own position-seeded stream) and the target's position-seeded draws."""
    folder = tiny_models["llama"]
    draft_folder = folder if drafter == "self" else tiny_models["qwen3"]
    batch = prompts[:4]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=10, n=1 + (i == 0))
              for i in range(len(batch))]
    a, ea = generate(folder, batch, params, speculative_config=draft(draft_folder, k=2))
    b, _ = generate(folder, batch, params, speculative_config=draft(draft_folder, k=4), max_num_batched_tokens=24)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    if drafter == "self":
        st = ea.stats().spec_decode
        assert st.acceptance_rate > 0.95  # p == q up to float rounding between the two passes


def test_requests_that_do_not_speculate_share_the_batch(tiny_models, prompts):
    """logprobs, penalties and min_tokens requests are sampled as without speculation (a seeded
    random request that speculates gives other tokens than without: same distribution only)."""
    folder = tiny_models["llama"]
    batch = prompts[:5]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=10, logprobs=2),
              SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.3, max_tokens=10),
              SamplingParams(temperature=0, max_tokens=10, min_tokens=5), SamplingParams(temperature=0.9, seed=4)]
    plain, _ = generate(folder, batch, params)
    spec, engine = generate(folder, batch, params, speculative_config=draft(folder))
    assert tokens(spec)[:4] == tokens(plain)[:4]
    for s, p in zip(spec[1].outputs[0].logprobs, plain[1].outputs[0].logprobs):
        assert s.keys() == p.keys()
    assert engine.stats().spec_decode.num_drafts > 0


def test_token_mask_requests_are_sampled_under_their_masks(tiny_models, prompts):
    """Structured outputs, allowed_token_ids and bad_words requests share a verify step with
    speculating requests: they are not drafted, and their masks apply as without speculation."""
    pytest.importorskip("xgrammar")
    folder = tiny_models["llama"]
    choice = SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["alpha", "beta gamma"]})
    allowed = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, allowed_token_ids=[28, 29, 30])
    params = [GREEDY, choice, allowed, GREEDY]
    batch = prompts[:4]
    plain, _ = generate(folder, batch, params)
    spec, engine = generate(folder, batch, params, speculative_config=draft(folder))
    assert tokens(spec) == tokens(plain)
    assert spec[1].outputs[0].text in ("alpha", "beta gamma")
    assert set(tokens(spec)[2]) <= {28, 29, 30}
    assert engine.stats().spec_decode.num_drafts > 0 and engine.structured.num_requests == 0


def test_engine_config_errors(tiny_models, tmp_path):
    folder = tiny_models["llama"]
    with pytest.raises(ConfigError, match="model path not found"):
        LLM(folder, speculative_config=draft(str(tmp_path / "missing")))
    big = tmp_path / "big_vocab"  # the draft's shape is checked before its weights are read
    big.mkdir()
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    (big / "config.json").write_text(json.dumps({**config, "vocab_size": 50000}))
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(folder, speculative_config=draft(str(big)))
    with pytest.raises(ConfigError, match="not both"):
        LLM(folder, speculative_config=NGRAM, speculative_model=folder)
    llm = LLM(folder, speculative_model=folder, num_speculative_tokens=2)
    assert llm.engine.config.speculative_config.num_speculative_tokens == 2
    assert llm.engine.config.speculative_config.method == "draft_model"


def test_smollm2_greedy_and_seeded_outputs_do_not_change(smollm2_path):
    """The packaged SmolLM2 on a copy prompt of the bench set: n-gram drafts get accepted, and
    greedy (n-gram, self-draft) and seeded n-gram outputs are those of a run without speculation."""
    from pdserve.services.bench_spec import DATA
    row = json.loads(open(DATA).readline())
    messages = [{"role": "user", "content": row["passage"] + "\n\n" + row["instruction"]}]
    params = [SamplingParams(temperature=0, max_tokens=16), SamplingParams(temperature=0.8, seed=1, max_tokens=16)]

    def chat(**kw):
        llm = LLM(smollm2_path, max_model_len=512, num_gpu_blocks_override=64, dtype="float32", **kw)
        outs = [llm.chat(messages, p, use_tqdm=False)[0].outputs[0].token_ids for p in params]
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        return outs, llm.engine.stats().spec_decode
    want, _ = chat()
    got, st = chat(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                       "prompt_lookup_min": 2})
    assert got == want and st.acceptance_rate > 0.3
    got, st = chat(speculative_config=draft(smollm2_path, k=3))
    assert got[0] == want[0] and st.acceptance_rate > 0.95

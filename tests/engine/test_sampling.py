"""Sampling semantics: seeds, n, stop strings / token ids, logprobs vs HF's log_softmax."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PROMPTS = [[5, 77, 1200, 9], list(range(300, 340)), [42] * 3, list(range(1000, 1100))]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32")


def gen(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
    return outs


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=16)
    alone = gen(llm, PROMPTS[:1], params)[0].outputs[0].token_ids
    mixed = gen(llm, PROMPTS, [params] + [SamplingParams(temperature=0.8, max_tokens=20)] * 3)[0].outputs[0].token_ids
    assert alone == mixed
    other = gen(llm, PROMPTS[:1], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=8, max_tokens=16))
    assert other[0].outputs[0].token_ids != alone


def test_n_gives_n_outputs_sharing_prompt_blocks(llm):
    out = gen(llm, [list(range(2000, 2064))], SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # the 3 later sequences found the 63 leading prompt tokens (3 full blocks) in the cache
    assert llm.engine.kv.num_prefix_hits >= 3 * 48


def test_top_k_1_equals_greedy(llm):
    greedy = gen(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    topk1 = gen(llm, PROMPTS, SamplingParams(temperature=1.3, top_k=1, seed=3, max_tokens=12))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def test_stop_token_ids_and_max_tokens(llm):
    base = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_cuts_text(llm):
    base = gen(llm, PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop
    cut = text.index(stop)
    out = gen(llm, PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    incl = gen(llm, PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                  include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == text[:cut + len(stop)]


def test_min_tokens_blocks_stop_token(llm):
    base = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    stop_id = base.token_ids[0]
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, min_tokens=5,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(out.token_ids) >= 5 and stop_id not in out.token_ids[:5]


def test_logprobs_match_hf_log_softmax(llm, tiny_models):
    from transformers import AutoModelForCausalLM
    prompt = PROMPTS[1]
    out = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=3, prompt_logprobs=2))[0]
    comp = out.outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    seq = torch.tensor([prompt + comp.token_ids])
    with torch.inference_mode():
        lp = torch.log_softmax(hf(seq).logits[0].float(), dim=-1)
    n = len(prompt)
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        ref = lp[n - 1 + i]
        assert entry[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-4)
        assert entry[tok].rank == 1  # greedy picks the top token
        assert set(entry) == set(ref.topk(3).indices.tolist()) | {tok}
        assert entry[tok].decoded_token is not None
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for pos in range(1, n):
        assert out.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(lp[pos - 1][prompt[pos]].item(), abs=1e-4)


def test_prompt_logprobs_survive_preemption(llm, tiny_models):
    """A request preempted while its prompt is chunked is recomputed from its first token: its
    prompt logprobs are still one entry per prompt token, equal to an unhurried run's (before,
    every chunk after the first preemption was dropped)."""
    prompts = [[100 + (i * 7 + j) % 900 for j in range(100)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=1)
    want = gen(llm, prompts, params)
    tight = LLM(tiny_models["llama"], num_gpu_blocks_override=17, max_num_batched_tokens=24, max_model_len=256,
                dtype="float32")
    got = gen(tight, prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(want, got):
        assert len(b.prompt_logprobs) == len(a.prompt_logprobs) == 100 and b.prompt_logprobs[0] is None
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert set(ea) == set(eb) and all(ea[t].logprob == pytest.approx(eb[t].logprob, abs=1e-5) for t in ea)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_penalties_change_output_and_stay_valid(llm):
    base = gen(llm, [[7] * 20], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    pen = gen(llm, [[7] * 20], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=5.0,
                                               frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0].token_ids
    assert len(pen) == 16 and pen != base
    assert len(set(pen)) >= len(set(base))


def test_max_logprobs_caps_what_a_request_may_ask(tiny_models):
    """vLLM's --max-logprobs: 20 by default; -1 lifts the cap up to the vocabulary."""
    from pdserve.common.config import ConfigError
    from pdserve.common.errors import ParameterError
    with pytest.raises(ParameterError, match="max allowed: 20"):
        gen(LLM(tiny_models["llama"], num_gpu_blocks_override=64, dtype="float32"), [PROMPTS[0]],
            SamplingParams(max_tokens=1, logprobs=21))
    free = LLM(tiny_models["llama"], num_gpu_blocks_override=64, dtype="float32", max_logprobs=-1)
    out = gen(free, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2, logprobs=100, prompt_logprobs=50))[0]
    assert [len(top) for top in out.outputs[0].logprobs] == [100, 100]  # the chosen token is among the top
    assert all(len(top) >= 50 for top in out.prompt_logprobs[1:])
    vocab = free.engine.arch.vocab_size
    with pytest.raises(ParameterError, match=f"max allowed: {vocab}"):
        gen(free, [PROMPTS[0]], SamplingParams(max_tokens=1, logprobs=vocab + 1))
    with pytest.raises(ConfigError, match="--max-logprobs"):
        LLM(tiny_models["llama"], dtype="float32", max_logprobs=-2)


@pytest.mark.parametrize("where", ["launch", "result"])
def test_an_interrupted_generate_leaves_the_engine_clean(tiny_models, where):
    """Ctrl-C inside generate (here a KeyboardInterrupt raised in the 5th step's launch or result
    wait, async scheduling on): the next generate gets exactly a fresh engine's outputs and the
    pool is full again (before, the next call failed: 'an input token in flight that no launched
    step samples')."""
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32", async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in gen(llm, PROMPTS, params)]
    runner = llm.engine.runner
    calls = {"n": 0}
    if where == "launch":
        real = runner.launch

        def interrupted(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(*args, **kw)
        runner.launch = interrupted
    else:
        real = llm.engine._apply

        def interrupted(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(*args, **kw)
        llm.engine._apply = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS * 10], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in gen(llm, PROMPTS, params)] == want  # (gen: the pool is full)


def test_min_tokens_holds_back_stop_strings(llm):
    """vLLM's rule: a stop string counts only in the text after the first min_tokens tokens."""
    base = gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = base.text[:3]  # in the first token's text
    early = gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    assert early[0].outputs[0].finish_reason == "stop" and len(early[0].outputs[0].token_ids) < 3
    held = gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                 min_tokens=6))[0].outputs[0]
    assert len(held.token_ids) >= 6 and held.token_ids == base.token_ids[:len(held.token_ids)]
    assert held.text.startswith(stop)  # not cut at the early match


def test_chat_takes_vllms_template_arguments(llm):
    """LLM.chat(chat_template=, chat_template_kwargs=, tools=) as vLLM's; the tokenizer answers
    the HF attributes users read (eos_token_id, len)."""
    msgs = [{"role": "user", "content": "Hi"}]
    p = SamplingParams(temperature=0, max_tokens=1)
    base = llm.chat(msgs, p, use_tqdm=False)[0]
    bare = llm.chat(msgs, p, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})[0]
    assert len(bare.prompt_token_ids) < len(base.prompt_token_ids)
    assert bare.prompt_token_ids == base.prompt_token_ids[:len(bare.prompt_token_ids)]
    custom = llm.chat(msgs, p, use_tqdm=False,
                      chat_template="{% for m in messages %}<<{{ m.content }}>>{% endfor %}{{ tools | length }}",
                      tools=[{"type": "function", "function": {"name": "f"}}])[0]
    assert custom.prompt == "<<Hi>>1"
    assert llm.chat(msgs, p, use_tqdm=False)[0].prompt_token_ids == base.prompt_token_ids  # the model's again
    tok = llm.get_tokenizer()
    assert tok.eos_token_id == tok.eos_token_ids[0] and len(tok) == tok.vocab_size

"""n-gram verify rounds chained on the device (spec_decode/device_rounds.py), run on the CPU
through the same torch code: the on-device lookup proposes what the host's does, and a lone
greedy request's steps of R rounds give HF's tokens, count their drafts per round and return
every KV block."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pdserve.common.config import ConfigError, SpeculativeConfig
from pdserve.common.engine.llm import LLM
from pdserve.common.engine.spec_decode.device_rounds import lookup as device_lookup
from pdserve.common.engine.spec_decode.ngram import lookup as host_lookup
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_spec_decode import NGRAM, generate, tokens
from tests.engine.test_spec_decode_overlap import hf_greedy, small_vocab  # noqa: F401 (a fixture)


@pytest.mark.parametrize("vocab", [2, 5, 50])
def test_the_device_lookup_proposes_what_the_host_lookup_does(vocab):
    rng = random.Random(vocab)
    checked = found = 0
    for _ in range(300):
        length = rng.randrange(1, 120)
        seq = [rng.randrange(vocab) for _ in range(length)]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(1, 9)
        want = host_lookup(np.array(seq, np.int32), min_n, max_n, k).tolist()
        hist = torch.zeros(128 + 9, dtype=torch.int64)
        hist[:length] = torch.tensor(seq)
        hist[length:] = torch.randint(0, vocab, (hist.shape[0] - length,))  # garbage past the history
        drafts, count = device_lookup(hist, torch.tensor(length), min_n, max_n, k)
        assert drafts[:int(count)].tolist() == want, (seq, min_n, max_n, k)
        checked += 1
        found += bool(want)
    assert checked == 300 and 0 < found < 300  # both outcomes were exercised


ROUNDS = {**NGRAM, "device_rounds": 4}


@pytest.mark.parametrize("variant", [{}, {"block_size": 4, "max_model_len": 160}])
def test_a_lone_greedy_request_chains_rounds_and_matches_hf(small_vocab, variant):
    """A 512-token vocabulary whose greedy outputs soon repeat (the lookup finds drafts):
    prompts one at a time (every decode alone: rounds), then all at once (the last one alone at
    the end); tokens equal HF's (cut by max_model_len in the second variant), drafts are counted
    per round, no block is held past a request's tokens or left held."""
    folder, prompts = small_vocab
    max_len = variant.get("max_model_len", 1 << 30)
    prompts = [p for p in prompts if len(p) < max_len - 8]
    want = [w[:max_len - len(p)] for w, p in zip(hf_greedy(folder, prompts, 40), prompts)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, engine = generate(folder, prompts, params, check_blocks=True, one_at_a_time=True,
                            speculative_config=ROUNDS, **variant)
    assert tokens(outs) == want
    rounds = engine.runner.spec.device_rounds
    assert rounds.num_steps > 0 and rounds.num_rounds > rounds.num_steps
    st = engine.stats().spec_decode
    assert st.num_drafts > 0 and 0 < st.num_accepted_tokens <= st.num_draft_tokens <= 3 * st.num_drafts
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens
    lengths = [12 + 28 * (i == len(prompts) - 1) for i in range(len(prompts))]  # the last one ends alone
    outs, engine = generate(folder, prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                              for n in lengths],
                            check_blocks=True, speculative_config=ROUNDS, **variant)
    assert tokens(outs) == [w[:n] for w, n in zip(want, lengths)]
    assert engine.runner.spec.device_rounds.num_steps > 0


def test_smollm2_copies_with_rounds_and_its_tokens_do_not_change(smollm2_path):
    """The packaged SmolLM2 on a copy prompt of the bench set: the rounds' drafts get accepted
    and the greedy tokens are those of a run without speculation."""
    from pdserve.services.bench_spec import DATA
    row = json.loads(open(DATA).readline())
    messages = [{"role": "user", "content": row["passage"] + "\n\n" + row["instruction"]}]
    params = SamplingParams(temperature=0, max_tokens=24)

    def chat(**kw):
        llm = LLM(smollm2_path, max_model_len=512, num_gpu_blocks_override=64, dtype="float32", **kw)
        out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        return out, llm.engine
    want, _ = chat()
    got, engine = chat(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                                           "prompt_lookup_max": 4, "device_rounds": 2})
    assert got == want
    assert engine.runner.spec.device_rounds.num_steps > 0 and engine.stats().spec_decode.acceptance_rate > 0.3


def test_rounds_stop_at_max_tokens_and_eos_exactly(tiny_models, prompts):
    """max_tokens inside a step's rounds: the output is cut there, as without rounds."""
    folder = tiny_models["llama"]
    for max_tokens in (2, 7, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        outs, _ = generate(folder, prompts[:3], params, one_at_a_time=True, speculative_config=ROUNDS)
        plain, _ = generate(folder, prompts[:3], params, one_at_a_time=True, speculative_config=None)
        assert tokens(outs) == tokens(plain)
        assert all(len(t) <= max_tokens for t in tokens(outs))


def test_requests_that_are_not_plain_greedy_never_chain_rounds(tiny_models, prompts):
    folder = tiny_models["llama"]
    params = [SamplingParams(temperature=0.8, seed=3, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=20, logprobs=2),
              SamplingParams(temperature=0, max_tokens=20, logit_bias={5: 1.0})]
    outs, engine = generate(folder, prompts[:3], params, one_at_a_time=True, speculative_config=ROUNDS)
    plain, _ = generate(folder, prompts[:3], params, one_at_a_time=True, speculative_config=None)
    assert tokens(outs) == tokens(plain)
    assert engine.runner.spec.device_rounds.num_steps == 0


def test_device_rounds_is_checked():
    with pytest.raises(ConfigError, match="device_rounds"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "device_rounds": -1})
    with pytest.raises(ConfigError, match="device_rounds"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "device_rounds": "4"})
    with pytest.raises(ConfigError, match="device_rounds applies to method ngram only"):
        SpeculativeConfig.parse({"model": "x", "num_speculative_tokens": 3, "device_rounds": 2})

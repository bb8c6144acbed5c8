"""The greedy sampling tail (engine/greedy_tail.py) on CPU: the sharded argmax equals torch.argmax
of the full row (ties, vocab padding, bf16), and in the engine it samples every plain-greedy step
at TP=1 and TP=2 (gloo, real worker processes) with the same tokens as the eager Sampler, while a
batch with one sampled row takes the Sampler and stays correct. On CPU the tail runs eagerly: the
same function the CUDA tail graphs capture (tests/engine/test_greedy_tail_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.engine.greedy_tail import merge_best, shard_best
from pdserve.common.engine.llm import LLM
from pdserve.common.models.parallel import vocab_shard
from pdserve.common.sampling_params import SamplingParams

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("world,vocab,dtype", [(2, 101, torch.float32), (3, 100, torch.float32),
                                               (4, 103, torch.bfloat16), (2, 64, torch.bfloat16)])
def test_sharded_argmax_is_torch_argmax(world, vocab, dtype):
    gen = torch.Generator().manual_seed(world * vocab)
    full = torch.randint(-6, 6, (64, vocab), generator=gen).to(dtype)  # small ints: many ties, across shards too
    full[0] = -3  # one value everywhere: token 0
    full[1, -1] = 50  # the last real id, next to the padding
    full[2] = -5
    full[2, [7, vocab - 1]] = 1  # a tie between shards: the lower id
    rows = -(-vocab // world)
    padded = torch.cat((full, torch.full((64, rows * world - vocab), 100.0, dtype=dtype)), dim=1)  # padding wins if read
    pairs = []
    for rank in range(world):
        start, n = vocab_shard(vocab, rank, world)
        pairs.append(shard_best(padded[:, start:start + n], start, max(0, min(n, vocab - start))))
    got = merge_best(torch.stack(pairs))
    assert got.dtype == torch.int64
    assert torch.equal(got, full.float().argmax(dim=-1))


def generate(folder: str, prompts: list[list[int]], params: list[SamplingParams], **kwargs):
    llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.runner.num_greedy_tail_steps
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def odd_vocab_qwen3(tmp_path_factory, tiny_model_factory) -> str:
    """Tied embeddings, vocab 49151: the last rank of 2 or 4 has one padding row in its LM-head shard."""
    return tiny_model_factory(str(tmp_path_factory.mktemp("odd") / "qwen3"), "qwen3", vocab_size=49151)


def prompts_of(prompts):
    return [prompts[i] for i in (0, 3, 8)]


@pytest.mark.parametrize("model,tp,kwargs", [("llama", 1, {}), ("llama", 2, {"async_scheduling": True}),
                                             ("odd", 2, {}), ("odd", 4, {"async_scheduling": True})])
def test_greedy_tail_takes_every_greedy_step_with_the_samplers_tokens(tiny_models, odd_vocab_qwen3, prompts,
                                                                       model, tp, kwargs):
    folder = odd_vocab_qwen3 if model == "odd" else tiny_models[model]
    ps = prompts_of(prompts)
    want, eager_steps = generate(folder, ps, [GREEDY] * 3, graph_sampler=False)
    got, tail_steps = generate(folder, ps, [GREEDY] * 3, tensor_parallel_size=tp, **kwargs)
    assert eager_steps == 0
    assert got == want
    # the prompts prefill in one step, then every step samples all three: MAX_TOKENS sampling steps
    assert tail_steps == MAX_TOKENS


def test_a_batch_with_one_sampled_row_takes_the_sampler(tiny_models, prompts):
    folder = tiny_models["llama"]
    ps = prompts_of(prompts)
    params = [GREEDY, SAMPLED, GREEDY]
    want, _ = generate(folder, ps, params, graph_sampler=False)
    got, tail_steps = generate(folder, ps, params, tensor_parallel_size=2)
    assert got == want
    assert tail_steps == 0  # the sampled row runs as long as the greedy ones: no step is all-greedy
    alone, _ = generate(folder, ps[:1], [GREEDY], graph_sampler=False)
    assert got[0] == alone[0]  # the greedy rows are the batch-independent argmax

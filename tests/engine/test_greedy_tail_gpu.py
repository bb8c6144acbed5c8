"""The greedy tail's CUDA graphs (engine/greedy_tail.py, cuda_graphs.py's tail graphs) on the GPU.

TP=1 (one GPU) and TP=2 (two GPUs, the all-gather of (max, id) pairs captured in the tail graph,
vocab 49151: rank 1's LM-head shard has a padding row): greedy tokens with the tail equal those
of the eager Sampler (--no-graph-sampler) under overlapped steps and batch sizes that change as
requests finish, the tail graphs are replayed, and a batch with one seeded sampled row replays
none and keeps its tokens. Marked `gpu`; the TP=2 test needs two devices.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90, method="thread")]  # a hang dumps every stack
VOCAB = 49151
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def odd_vocab_llama(tmp_path_factory) -> str:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                   rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    folder = str(tmp_path_factory.mktemp("tail") / "llama")
    transformers.LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 7, 33, 100, 5, 250, 64, 17, 2, 129)]


def run(folder: str, prompts, params, **options):
    config = EngineConfig.from_options(model=folder, device="cuda", dtype="float32", enforce_eager=False,
                                       num_gpu_blocks_override=4096, max_num_seqs=16, max_model_len=1024,
                                       **options)  # small pool, buckets 1..16: eight engines start in this file
    engine = EngineCore(config, load_tokenizer_=False)
    try:
        # max_tokens staggered: the decode batch shrinks as requests finish (buckets 16 .. 1)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, SamplingParams(**{**sp.to_dict(), "max_tokens": sp.max_tokens + 3 * i}))
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                done.setdefault(out.request_id, []).extend(out.new_token_ids)
        runner = engine.runner
        return ([done[str(i)] for i in range(len(prompts))], runner.graphs.num_tail_replays,
                runner.num_greedy_tail_steps)
    finally:
        engine.shutdown()
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("tp", [1, 2])
def test_tail_graphs_give_the_samplers_tokens(odd_vocab_llama, prompts, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices")
    params = [GREEDY] * len(prompts)
    want, replays_off, steps_off = run(odd_vocab_llama, prompts, params, tensor_parallel_size=tp,
                                       graph_sampler=False)
    got, replays, steps = run(odd_vocab_llama, prompts, params, tensor_parallel_size=tp)
    assert replays_off == steps_off == 0
    assert got == want
    assert replays > 20 and steps > replays  # every decode step in a tail graph; prefill steps eagerly

    mixed = [GREEDY] * (len(prompts) - 1) + [SAMPLED]  # the sampled row outlives the others
    want, _, _ = run(odd_vocab_llama, prompts, mixed, tensor_parallel_size=tp, graph_sampler=False)
    got, replays, _ = run(odd_vocab_llama, prompts, mixed, tensor_parallel_size=tp)
    assert got == want
    assert replays == 0

"""`--batch-invariant` (CPU bfloat16): a request's greedy tokens alone equal its tokens in a batch.

SmolLM2 in bf16 on the CPU fast path: oneDNN's kernel, and its order of summation, depends on the
row count: on an AMD EPYC (AVX-512 BF16) its one-row GEMM sums the MLP's down projection
(K = 1,536 > N = 576) in another order than its multi-row kernel (5 of 16 prompts decoded other
tokens alone than in a batch of 16, docs/benchmarks.md, ninth session); on a Xeon with AMX every
product of 33+ rows (the batch's prefill) differs from 1-32-row ones (3 of 16 prompts). With the
flag every one matches on both, and n-gram speculation (verify rows are multi-row products)
gives plain decoding's tokens at batch 1. On an AVX2-only AMD EPYC (no AVX-512: oneDNN does not
pack bf16 there) the tokens alone equal the batch's too, without the two-row product."""

from __future__ import annotations

import json

import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.models.cpu_ops import pack_dtype
from pdserve.common.sampling_params import SamplingParams
from pdserve.services.bench_spec import DATA, chat_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_bf16_tokens_alone_equal_the_batch_s(smollm2_path):
    with open(DATA) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    llm = LLM(smollm2_path, dtype="bfloat16", batch_invariant=True, max_model_len=1024)
    ops = llm.engine.runner.model.layers[0].mlp.ops
    # oneDNN packs bf16 (AVX-512 / AMX), or the bf16 weights widened to fp32 (AVX2 only, pack_dtype):
    # every down projection's one row runs as two
    assert pack_dtype(torch.bfloat16) is not None
    assert len(ops._two_rows) == len(llm.engine.runner.model.layers)
    assert bool(ops._widened) == (pack_dtype(torch.bfloat16) == torch.float32)
    assert ops._row_block == 32
    prompts = chat_prompts(llm.get_tokenizer(), rows)
    batch = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                         use_tqdm=False)]
    alone = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    assert alone == batch
    llm.shutdown()
    spec = LLM(smollm2_path, dtype="bfloat16", batch_invariant=True, max_model_len=1024,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "draft_budget": "all"})
    drafted = [spec.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
               for p in prompts[:6]]
    assert drafted == alone[:6] and spec.engine.stats().spec_decode.num_draft_tokens > 0
    spec.shutdown()


def test_the_flag_is_off_by_default_and_leaves_fp32_alone(smollm2_path):
    llm = LLM(smollm2_path, dtype="float32", batch_invariant=True, max_model_len=256)
    assert not llm.engine.runner.model.layers[0].mlp.ops._two_rows  # fp32: the one-row kernel stays
    llm.shutdown()
    llm = LLM(smollm2_path, dtype="bfloat16", max_model_len=256)
    assert not llm.engine.runner.model.layers[0].mlp.ops._two_rows
    llm.shutdown()

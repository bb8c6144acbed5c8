"""--kv-cache-dtype fp8: capacity, accuracy against a full-precision KV cache, and the KV handoff.

Bounds (tiny Llama, weight std 0.02, fp32 weights; measured values in parentheses):
  fp8 KV per head     logits rel. error <= 0.02 (0.0087), top-1 >= 0.93 (0.975), greedy first token >= 0.9
                      (1.0), token agreement >= 0.5 (0.84), also with 16-token prefill chunks
  fp8 KV per tensor   the same bounds (0.0099, 0.975, 1.0, 0.82)
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.kv_transfer.base import KVLayout, KVTransferError, make_client, make_server
from pdserve.services.accuracy import agreement, greedy

from helpers import sequence_logits


def test_fp8_kv_holds_twice_the_tokens_of_bf16(quant_models):
    bf16 = LLM(quant_models["llama"], dtype="bfloat16", kv_cache_memory_gb=0.01).engine.runner
    fp8 = LLM(quant_models["llama"], dtype="bfloat16", kv_cache_memory_gb=0.01, kv_cache_dtype="fp8").engine.runner
    assert fp8.kv_caches[0].dtype == torch.float8_e4m3fn and bf16.kv_caches[0].dtype == torch.bfloat16
    assert fp8.bytes_per_block() * 2 == bf16.bytes_per_block()
    assert fp8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)
    print(f"\nKV tokens in 10 MB: bf16 {bf16.num_blocks * bf16.block_size}, fp8 {fp8.num_blocks * fp8.block_size}")
    scales = fp8.kv_scales
    assert len(scales) == 2 and scales[0].shape == (2, 2) and (scales[0] > 0).all()
    assert fp8.model.layers[1].self_attn.attn.kv_scale is scales[1]


@pytest.mark.parametrize("granularity", ["per-head", "per-tensor"])
def test_fp8_kv_agrees_with_full_precision_kv(quant_models, scoring_ids, short_prompts, granularity):
    ref = LLM(quant_models["llama"], dtype="float32", enable_prefix_caching=False)
    llm = LLM(quant_models["llama"], dtype="float32", enable_prefix_caching=False, kv_cache_dtype="fp8",
              kv_cache_scale=granularity)
    scales = torch.stack(llm.engine.runner.kv_scales)  # [L, 2, KVH]
    assert (scales.amax(-1) == scales.amin(-1)).all() == (granularity == "per-tensor")
    ref_logits, logits = sequence_logits(ref, scoring_ids), sequence_logits(llm, scoring_ids)
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    # chunked prefill (16-token chunks read earlier chunks back from the fp8 blocks), prefix hits
    chunked = LLM(quant_models["llama"], dtype="float32", kv_cache_dtype="fp8", kv_cache_scale=granularity,
                  max_num_batched_tokens=16)
    agree = agreement(greedy(llm, short_prompts, 16), greedy(ref, short_prompts, 16))
    agree_chunked = agreement(greedy(chunked, short_prompts, 16), greedy(ref, short_prompts, 16))
    print(f"\nfp8 KV {granularity}: logits rel. error {rel:.4f}, top-1 {top1:.3f}, greedy {agree}, "
          f"chunked {agree_chunked}")
    assert rel <= 0.02 and top1 >= 0.93
    for a in (agree, agree_chunked):
        assert a["first"] >= 0.9 and a["token"] >= 0.5


def _fp8_caches(scale: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(2):
        kv = (torch.randn(2, 12, 4, 2, 8, generator=gen) * 100).to(torch.float8_e4m3fn)
        kv.kv_scale = torch.full((2, 2), scale)
        caches.append(kv)
    return caches


@pytest.mark.parametrize("backend", ["local", "tcp"])
def test_handoff_moves_fp8_blocks_and_checks_their_scales(backend):
    src, dst, other = _fp8_caches(0.01, 1), _fp8_caches(0.01, 2), _fp8_caches(0.02, 3)
    layout = KVLayout.from_caches(src)
    assert layout.dtype == "float8_e4m3fn" and layout.kv_scales == (float(torch.tensor(0.01)),) * 8
    assert layout.bytes_per_block == 2 * 2 * 4 * 2 * 8  # one byte per value
    assert KVLayout.from_dict(layout.to_dict()) == layout

    async def main():
        server = make_server(backend, src, {"lease": [3, 4, 9]}.get)
        client, mismatched = make_client(backend, dst), make_client(backend, other)
        try:
            address = await server.start()
            assert await client.pull(address, "lease", [0, 7, 8], deadline_s=10.0) == 3 * layout.bytes_per_block
            with pytest.raises(KVTransferError, match="fp8 KV scales differ"):
                await mismatched.pull(address, "lease", [0, 1, 2], deadline_s=10.0)
        finally:
            await client.close()
            await mismatched.close()
            await server.close()

    asyncio.run(main())
    for s, d in zip(src, dst):
        assert torch.equal(d[:, [0, 7, 8]].view(torch.uint8), s[:, [3, 4, 9]].view(torch.uint8))

"""fp8 (e4m3) KV cache: the scales, found once at start-up, and where they live.

    runner start-up (--kv-cache-dtype fp8):
      calibrate_kv_scales: one prefill of CALIBRATION_TOKENS seeded random token ids through the
        model into a temporary cache in the model dtype; per layer, amax of the stored K (after
        rotary) and V per KV head  ->  scale = amax * MARGIN / 448   (per-tensor: max over heads)
      attach_kv_scales: each layer's attention backend gets kv_scale [2, KVH] (K row, V row); the
        cache tensors carry it too (`kv.kv_scale`), so the KV transport's layout includes the
        scales and a peer whose scales differ is refused (its blocks would decode wrongly)

e4m3 keeps 3 mantissa bits from 2^-6 * scale up to 448 * scale, so a loose scale costs little
while a tight one clips: MARGIN 2 leaves room for activations above the calibration's, and the
store saturates anything beyond. The calibration is deterministic (seeded ids, the same weights),
so prefill and decode workers of one model compute the same scales.
"""

from __future__ import annotations

import random

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
CALIBRATION_TOKENS = 512
MARGIN = 2.0
_REQ_ID = "kv-scale-calibration"


def kv_cache_dtype(fp8: bool, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_KV_DTYPE if fp8 else model_dtype


@torch.inference_mode()
def calibrate_kv_scales(runner, per_tensor: bool, seed: int = 0) -> list[torch.Tensor]:
    """[2, KVH] fp32 scales per layer, from one prefill through `runner` (its model not yet scaled)."""
    from pdserve.common.engine.outputs import ScheduledRequest, SchedulerOutput
    from pdserve.common.sampling_params import SamplingParams
    arch, bs = runner.arch, runner.block_size
    num_tokens = min(CALIBRATION_TOKENS, runner.max_model_len)
    num_blocks = -(-num_tokens // bs)
    shape = (2, num_blocks, bs, arch.num_kv_heads, arch.head_dim)
    runner.kv_caches = [torch.zeros(shape, dtype=runner.dtype, device=runner.device) for _ in range(arch.num_layers)]
    rng = random.Random(seed)
    ids = [rng.randrange(arch.vocab_size) for _ in range(num_tokens)]
    params = SamplingParams(temperature=0, max_tokens=1)
    runner.execute(SchedulerOutput(scheduled=[ScheduledRequest(
        req_id=_REQ_ID, input_token_ids=ids, start_pos=0, block_ids=list(range(num_blocks)), sample=True,
        params=params, prompt_token_ids=ids, output_token_ids=[])], num_batched_tokens=num_tokens))
    scales = []
    for kv in runner.kv_caches:
        amax = kv.float().abs().amax(dim=(1, 2, 4))  # [2, KVH] (unused slots hold zeros)
        if per_tensor:
            amax = amax.amax(dim=1, keepdim=True).expand_as(amax)
        scales.append((amax * MARGIN / 448.0).clamp_min(1e-6).contiguous())
    runner.kv_caches = []
    runner.execute(SchedulerOutput(scheduled=[], num_batched_tokens=0, finished_req_ids={_REQ_ID}))  # drop its rows
    return scales


def attach_kv_scales(model: torch.nn.Module, scales: list[torch.Tensor] | None) -> None:
    for layer, scale in zip(model.layers, scales or [None] * len(model.layers)):
        layer.self_attn.attn.kv_scale = scale

"""Test helpers: logits of a whole sequence through the runner's model, dequantized weights."""

from __future__ import annotations

import torch

from pdserve.common.engine.model_runner import BlockTableCache, flatten_step
from pdserve.common.engine.outputs import ScheduledRequest
from pdserve.common.sampling_params import SamplingParams
from pdserve.kernels.reference import dequantize_int_ref

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@torch.inference_mode()
def sequence_logits(llm, ids: list[int]) -> torch.Tensor:
    """[T, vocab] fp32 logits of every position of one prompt (a fresh engine: blocks 0.. are free)."""
    runner = llm.engine.runner
    bs = runner.block_size
    s = ScheduledRequest(req_id="logits", input_token_ids=ids, start_pos=0, block_ids=list(range(-(-len(ids) // bs))),
                         sample=True, params=SamplingParams(), prompt_token_ids=ids, output_token_ids=[])
    input_ids, positions, meta, _ = runner.inputs.prepare(flatten_step([s], 0, bs, BlockTableCache()))
    return runner.model.compute_logits(runner.model(input_ids, positions, runner.kv_caches, meta))


def dequantized_weight(module) -> torch.Tensor:
    """[N, K] fp32 weight a quantized module computes with (nn.Linear: its weight)."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.float()
    if hasattr(module, "weight_scale"):
        return module.weight.float() * module.weight_scale.float()[:, None]
    w = dequantize_int_ref(module.qweight, module.scales, module.qzeros, module.bits, module.group_size)  # [K, N]
    if module.perm is not None:  # rows are in act-order: put input perm[i] back at its place
        unpermuted = torch.empty_like(w)
        unpermuted[module.perm] = w
        w = unpermuted
    return w.t()


def int_step(module) -> torch.Tensor:
    """[N, K] quantization step (scale) of each weight of an IntLinear, in input order."""
    s = module.scales.float().repeat_interleave(module.group_size, dim=0)  # [K, N]
    if module.perm is not None:
        unpermuted = torch.empty_like(s)
        unpermuted[module.perm] = s
        s = unpermuted
    return s.t()

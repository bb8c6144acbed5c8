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

A checkpoint that carries its own scales (llm-compressor's / AutoFP8's `self_attn.k_scale` and
`v_scale`, LlamaForCausalLM.checkpoint_kv_scales) skips the calibration: `checkpoint_scales` uses
them as they are (x is stored as x / scale, as vLLM does), one per tensor or per KV head. `pdserve
quantize --kv-cache-scales` writes them from calibration text (`text_kv_scales`: the same
prefill as the start-up calibration, `kv_amax`, on real text instead of random ids, per tensor,
with the same MARGIN).
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
    num_tokens = min(CALIBRATION_TOKENS, runner.max_model_len)
    rng = random.Random(seed)
    ids = [rng.randrange(runner.arch.vocab_size) for _ in range(num_tokens)]
    return scales_from_amax(kv_amax(runner, ids), per_tensor)


def scales_from_amax(amax: list[torch.Tensor], per_tensor: bool) -> list[torch.Tensor]:
    """Per layer [2, KVH] |K| / |V| maxima -> [2, KVH] scales (per tensor: the max over heads)."""
    scales = []
    for a in amax:
        if per_tensor:
            a = a.amax(dim=1, keepdim=True).expand_as(a)
        scales.append((a * MARGIN / 448.0).clamp_min(1e-6).contiguous())
    return scales


@torch.inference_mode()
def kv_amax(runner, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the [2, KVH] maxima of |K| (after rotary) and |V| that a prefill of `ids` stores,
    through `runner` into temporary caches in the model dtype (its own caches, if any, put back)."""
    from pdserve.common.engine.outputs import ScheduledRequest, SchedulerOutput
    from pdserve.common.sampling_params import SamplingParams
    arch, bs = runner.arch, runner.block_size
    num_blocks = -(-len(ids) // bs)
    shape = (2, num_blocks, bs, runner.num_kv_heads, arch.head_dim)  # this rank's KV heads under TP
    own = runner.kv_caches
    runner.kv_caches = [torch.zeros(shape, dtype=runner.dtype, device=runner.device) for _ in range(arch.num_layers)]
    try:
        params = SamplingParams(temperature=0, max_tokens=1)
        runner.execute(SchedulerOutput(scheduled=[ScheduledRequest(
            req_id=_REQ_ID, input_token_ids=list(ids), start_pos=0, block_ids=list(range(num_blocks)), sample=True,
            params=params, prompt_token_ids=list(ids), output_token_ids=[])], num_batched_tokens=len(ids)))
        amax = [kv.float().abs().amax(dim=(1, 2, 4)) for kv in runner.kv_caches]  # [2, KVH] (unused slots: 0)
    finally:
        runner.kv_caches = own
        runner.execute(SchedulerOutput(scheduled=[], num_batched_tokens=0, finished_req_ids={_REQ_ID}))  # its rows
    return amax


def checkpoint_scales(model: torch.nn.Module, per_tensor: bool) -> list[torch.Tensor] | None:
    """The checkpoint's KV-cache scales as [2, KVH] fp32 per layer (None: it has none). One scale
    per tensor is repeated over the heads; per-head ones are kept unless `per_tensor` (their max)."""
    found = getattr(model, "checkpoint_kv_scales", None)
    if not found:
        return None
    num_kv_heads = model.cfg.num_kv_heads
    device = model.embed_tokens.weight.device
    scales = []
    for i in range(len(model.layers)):
        rows = [found[i][w].expand(num_kv_heads) if found[i][w].numel() == 1 else found[i][w] for w in "kv"]
        s = torch.stack(rows)
        if per_tensor:
            s = s.amax(dim=1, keepdim=True).expand_as(s)
        scales.append(s.to(device).contiguous())
    return scales


def attach_kv_scales(model: torch.nn.Module, scales: list[torch.Tensor] | None) -> None:
    for layer, scale in zip(model.layers, scales or [None] * len(model.layers)):
        layer.self_attn.attn.kv_scale = scale


def text_kv_scales(src: str, text: str | None, num_samples: int, seq_len: int, device: str | None,
                   log=None) -> list[tuple[float, float]]:
    """Per layer (K scale, V scale), one per tensor, from prefills of calibration text through a
    pdserve engine on the HF folder `src` (in its checkpoint dtype): the maxima of |K| after rotary
    and |V| over the samples, times MARGIN, / 448 (`pdserve quantize --kv-cache-scales`)."""
    from pdserve.common.engine.llm import LLM
    from pdserve.common.models.quantization.calibrate import calibration_samples, default_text
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with open(text or default_text(), encoding="utf-8") as f:
        body = f.read()
    llm = LLM(src, device=device, max_model_len=seq_len, enforce_eager=True, num_gpu_blocks_override=max(64, seq_len),
              max_num_seqs=1, enable_prefix_caching=False)
    try:
        runner = llm.engine.runner
        samples = calibration_samples(llm.get_tokenizer(), body, num_samples, seq_len)
        amax = None
        for i, ids in enumerate(samples.tolist()):
            found = kv_amax(runner, ids)
            amax = found if amax is None else [torch.maximum(a, b) for a, b in zip(amax, found)]
            if log is not None and (i + 1) % 16 == 0:
                log(f"kv-cache scales: {i + 1} of {len(samples)} samples")
    finally:
        llm.shutdown()
    return [(float(s[0, 0]), float(s[1, 0])) for s in scales_from_amax(amax, per_tensor=True)]

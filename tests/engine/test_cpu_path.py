"""The CPU fast path in the engine: what start-up chooses, and the torch fallback of the C++ kernels.

test_correctness runs `--kernels auto` (packed GEMMs + C++ kernels) and `reference` against HF;
here the same greedy comparison runs the fallback used when the kernels cannot be built (packed
GEMMs, batched-matmul decode attention, eager element-wise ops), and start-up is checked: the
weights packed once, `--dtype auto` from the CPU's flags, threads from the cores the process may use.
"""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.common.config import EngineConfig, cpu_has_bf16
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.model_runner import ModelRunner
from pdserve.common.models.cpu_ops import CpuKernelAttention, CpuOps, CpuPagedAttention
from pdserve.common.models.llama import TorchOps
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_correctness import MAX_TOKENS, reference


def _engine(folder: str, backend: str, **options) -> EngineCore:
    config = EngineConfig.from_options(model=folder, dtype="float32", **options)
    engine = EngineCore(config, load_tokenizer_=False)
    if backend is not None:
        engine.runner = ModelRunner(config.model, config.cache, engine.arch, engine.model_path, engine.max_model_len,
                                    scheduler_cfg=engine.scheduler.config, attention_backend=backend)
    return engine


def _greedy(engine: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    done: dict[str, list[int]] = {}
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                done[o.request_id] = outs[o.request_id]
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_torch_fallback_of_the_cpu_path_matches_hf(tiny_models, prompts, arch):
    engine = _engine(tiny_models[arch], "cpu_eager", max_num_batched_tokens=96)  # chunks read prefixes
    ops = engine.runner.model.ops
    assert isinstance(ops, CpuOps) and not ops.kernels
    assert isinstance(engine.runner.model.layers[0].self_attn.attn, CpuPagedAttention)
    assert _greedy(engine, prompts) == reference(tiny_models, arch, prompts)


def test_start_up_chooses_the_cpu_path(tiny_models):
    engine = _engine(tiny_models["llama"], None)
    model = engine.runner.model
    assert isinstance(model.ops, CpuOps) and model.ops.kernels
    assert isinstance(model.layers[0].self_attn.attn, CpuKernelAttention)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # packed once; the plain copies dropped (meta: shape and dtype kept, no memory)
    assert linears and all(m.weight.is_meta and m.weight.shape == (m.out_features, m.in_features) for m in linears)
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    reference_engine = _engine(tiny_models["llama"], None, kernels="reference")
    assert reference_engine.runner.model.ops is not None and isinstance(reference_engine.runner.model.ops, TorchOps)


def test_dtype_auto_follows_the_cpu(tiny_models):
    config = EngineConfig.from_options(model=tiny_models["llama"])
    engine = EngineCore(config, load_tokenizer_=False)
    assert engine.runner.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)

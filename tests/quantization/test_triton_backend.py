"""The Triton backend with quantized weights and an fp8 KV cache, through the whole engine, on CPU
under the Triton interpreter (a subprocess: TRITON_INTERPRET must be set before triton loads).

A GPTQ act-order int4 model (int_matmul: gemv for decode rows, tiled GEMM for prefill chunks)
with --kv-cache-dtype fp8 (rotary_store_kv quantizes, decode/prefill attention dequantize) gives
the same greedy tokens as the torch path (int_matmul_ref, TorchPagedAttention's fp8 path).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import runpy, sys
runpy.run_path(sys.argv[1])  # tests/kernels/conftest.py: fixes for Triton 3.6's interpreter
from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.model_runner import ModelRunner
from pdserve.common.models.quantization.int_linear import IntLinear
from pdserve.common.sampling_params import SamplingParams

config = EngineConfig(model=ModelConfig(model=sys.argv[2], max_model_len=128, dtype="float32"),
                      cache=CacheConfig(num_blocks=32, kv_cache_dtype="fp8"),
                      scheduler=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=4), async_scheduling=False)
prompts = [[5, 6, 7], list(range(100, 130)), [9]]

def run(backend):
    engine = EngineCore(config, load_tokenizer_=False)
    if backend == "triton":
        engine.runner = ModelRunner(config.model, config.cache, engine.arch, engine.model_path, 128,
                                    scheduler_cfg=config.scheduler, attention_backend="triton")
    qkv = engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, IntLinear) and qkv.use_triton == (backend == "triton")
    assert engine.runner.kv_caches[0].dtype.itemsize == 1
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            done[o.request_id] += o.new_token_ids
    return [done[str(i)] for i in range(len(prompts))], engine.runner.kv_scales

(want, want_scales), (got, got_scales) = run("torch"), run("triton")
same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
assert same >= 16, (got, want)  # of 18 tokens
print("OK", same, [float((a - b).abs().max()) for a, b in zip(want_scales, got_scales)])
"""


def test_triton_backend_with_int4_weights_and_fp8_kv_under_the_interpreter(quant_models):
    pytest.importorskip("triton")
    conftest = os.path.join(os.path.dirname(__file__), "..", "kernels", "conftest.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, conftest, quant_models["llama-gptq-asym-act"]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
    print(proc.stdout)

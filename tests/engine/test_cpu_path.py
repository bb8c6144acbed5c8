"""The CPU fast path in the engine: what start-up chooses, and the torch fallback of the C++ kernels.

test_correctness runs `--kernels auto` (packed GEMMs + C++ kernels) and `reference` against HF;
here the same greedy comparison runs the fallback used when the kernels cannot be built (packed
GEMMs, batched-matmul decode attention, eager element-wise ops), and start-up is checked: the
weights packed once, `--dtype auto` from the CPU's flags, threads from the cores the process may use,
and AsyncLLM building its engine on the thread that steps it (one OpenMP pool).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from pdserve.common.config import ConfigError, EngineConfig, cpu_has_bf16
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.model_runner import ModelRunner, zeros_on_demand
from pdserve.common.models.cpu_ops import (CpuKernelAttention, CpuOps, CpuPagedAttention,
                                           populate_in_background)
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


def test_async_llm_builds_and_steps_its_engine_on_one_thread(tiny_models, prompts, monkeypatch):
    """`serve` and the workers: the EngineCore is built on the engine thread (where every step
    runs, so torch's OpenMP pool is that thread's alone); its outputs are the offline engine's,
    and a bad config still fails the constructor with its ConfigError."""
    config = EngineConfig.from_options(model=tiny_models["llama"], dtype="float32")
    builders = []  # the real constructor, and the name of the thread that ran it
    init = EngineCore.__init__
    monkeypatch.setattr(EngineCore, "__init__", lambda self, *a, **kw: (
        builders.append(threading.current_thread().name), init(self, *a, **kw))[1])
    engine = AsyncLLM(config)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

    async def stream(i, p):
        tokens = []
        async for outs in engine.stream(str(i), p, params):
            tokens += [t for o in outs for t in o.new_token_ids]
        return tokens

    async def run():
        stepper = await engine.call_in_engine(lambda core: threading.current_thread().name)
        return stepper, await asyncio.gather(*(stream(i, p) for i, p in enumerate(prompts[:4])))

    try:
        stepper, got = asyncio.run(run())
    finally:
        engine.shutdown()
    assert builders == [stepper] == ["pdserve-engine"]
    assert got == reference(tiny_models, "llama", prompts)[:4]
    with pytest.raises(ConfigError, match="--max-model-len"):
        AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], max_model_len=10 ** 9))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("limit", [None, 150])
def test_kv_pool_pages_are_populated_in_the_background_keeping_their_contents(limit):
    # [slabs 3 x 2, 300 blocks, 16, 2, 64] fp32: 6 slabs of 2.4 MB; values written first must survive
    pool = zeros_on_demand((3, 2, 300, 16, 2, 64), torch.float32, torch.device("cpu"))
    before = _rss_bytes()
    pool[0, 0, 0, 0, 0, 0], pool[2, 1, 140, 15, 1, 63], pool[1, 0, 299, 3, 0, 7] = 1.5, -2.0, 3.0
    thread = populate_in_background(pool, block_dim=2, num_blocks=limit)
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive()
    grown, size = _rss_bytes() - before, pool.numel() * pool.element_size()
    wanted = size if limit is None else size * limit // 300
    assert grown >= 0.8 * wanted, f"RSS grew {grown} bytes, the populated blocks are {wanted}"
    assert (pool[0, 0, 0, 0, 0, 0].item(), pool[2, 1, 140, 15, 1, 63].item(), pool[1, 0, 299, 3, 0, 7].item()) == \
        (1.5, -2.0, 3.0)
    assert int((pool != 0).sum()) == 3


def _eventually(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_kv_pool_population_follows_the_block_frontier_while_idle():
    """With a frontier (blocks handed out so far; None while the engine is busy), the thread keeps
    `ahead` blocks past it in memory as it moves, does nothing while busy, leaves the rest
    alone, and ends once the whole pool is in."""
    # 64 KB blocks, 19.2 MB slabs: what is populated may round up to whole 2 MB huge pages (32
    # blocks), so the blocks checked stay more than a huge page away from populated ranges (of
    # this slab and of the next one's start)
    pool = zeros_on_demand((2, 2, 300, 16, 16, 64), torch.float32, torch.device("cpu"))
    handed, busy = [0], [False]
    thread = populate_in_background(pool, block_dim=2, num_blocks=10,
                                    frontier=lambda: None if busy[0] else handed[0], ahead=10)
    slabs = [pool[i, j] for i in range(2) for j in range(2)]
    assert _eventually(lambda: all(_resident(s[:10]) for s in slabs))
    time.sleep(0.2)  # nothing handed out yet: it waits
    assert thread.is_alive() and not any(_resident(s[150:160]) for s in slabs)
    busy[0], handed[0] = True, 100
    time.sleep(0.3)  # busy: it waits though the frontier moved
    assert not any(_resident(s[100:110]) for s in slabs)
    busy[0] = False
    assert _eventually(lambda: all(_resident(s[:110]) for s in slabs))
    time.sleep(0.2)
    assert not any(_resident(s[200:210]) for s in slabs)
    handed[0] = 295
    assert _eventually(lambda: all(_resident(s) for s in slabs))
    assert _eventually(lambda: not thread.is_alive())
    assert int((pool != 0).sum()) == 0  # populated, not written


def _resident(tensor: torch.Tensor) -> bool:
    """Every page under `tensor` (contiguous) is in memory (mincore(2)); nothing is touched."""
    import ctypes
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() & ~(page - 1)
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    vec = (ctypes.c_ubyte * (-(-(end - start) // page)))()
    assert ctypes.CDLL("libc.so.6").mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0
    return all(v & 1 for v in vec)


def test_the_cpu_runner_populates_the_blocks_its_scheduler_can_hold_then_ahead_of_use(tiny_models):
    engine = _engine(tiny_models["llama"], None, max_model_len=64, max_num_seqs=2, kv_cache_memory_gb=0.25)
    runner = engine.runner
    assert runner.kv_populate is not None
    # 2 sequences x 64 tokens = 8 blocks of 16: blocks 0-7 of every (layer, K/V) slab come into
    # memory; the pool's last block (tens of MB further on) is left alone while unused
    at_once = 2 * -(-64 // runner.block_size)
    assert runner.num_blocks > 10 * at_once
    assert _eventually(lambda: all(_resident(slab[:at_once]) for layer in runner.kv_caches for slab in layer))
    assert not _resident(runner.kv_caches[-1][1][-1])
    # as the block pool hands out blocks, the thread keeps its margin ahead of them: make the pool
    # hand out all but the last block, then the rest of the pool comes into memory
    handed = engine.kv.pool.allocate(runner.num_blocks - 1)
    assert engine.kv.num_blocks_handed_out() == runner.num_blocks - 1
    assert _eventually(lambda: _resident(runner.kv_caches[-1][1][-1]))
    assert _eventually(lambda: not runner.kv_populate.is_alive())  # the whole pool: the thread is done
    engine.kv.pool.free(handed)


def test_the_offline_llm_takes_larger_default_steps_on_cpu_than_a_server(tiny_models):
    from pdserve.common.config import (CPU_DECODE_DEFER_STEPS, CPU_HALF_TOKEN_BUDGET, CPU_OFFLINE_TOKEN_BUDGET,
                                       CPU_TOKEN_BUDGET)
    from pdserve.common.engine.llm import LLM
    served = _engine(tiny_models["llama"], None, max_model_len=64)
    assert served.scheduler.config.token_budget == CPU_TOKEN_BUDGET == 1024
    assert served.scheduler.config.decode_defer_limit == 0  # fp32
    served = EngineCore(EngineConfig.from_options(model=tiny_models["llama"], dtype="bfloat16", max_model_len=64),
                        load_tokenizer_=False)
    assert served.scheduler.config.token_budget == CPU_HALF_TOKEN_BUDGET == 2048
    assert served.scheduler.config.decode_defer_limit == CPU_DECODE_DEFER_STEPS == 3  # prompts first, a while
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=64)
    assert llm.engine.scheduler.config.token_budget == CPU_OFFLINE_TOKEN_BUDGET == 4096
    assert llm.engine.scheduler.config.decode_defer_limit == 0
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=64, max_num_batched_tokens=256)
    assert llm.engine.scheduler.config.token_budget == 256  # the flag wins


def test_bf16_products_of_one_or_two_rows_take_the_gemv(tiny_models, monkeypatch):
    """bf16 decoding of one or two requests runs its linears and logits through the GEMV (kernels/
    cpu.py gemv_bf16), equal to oneDNN's packed product within one bf16 rounding; three rows and
    --batch-invariant engines keep oneDNN."""
    from pdserve.kernels import cpu as cpu_kernels
    if not cpu_kernels.load() or not cpu_kernels.gemv_bf16_available():
        pytest.skip("no AVX512-BF16 GEMV on this CPU")
    engine = EngineCore(EngineConfig.from_options(model=tiny_models["llama"], dtype="bfloat16", max_model_len=64),
                        load_tokenizer_=False)
    ops = engine.runner.model.ops
    assert ops._rows and ops._head_rows is not None
    layer = next(iter(ops._rows))
    g = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3):
        x = torch.randn(rows, layer.in_features, generator=g).to(torch.bfloat16)
        want = ops._onednn(layer, x, ops._packed[layer], layer.bias).float()
        torch.testing.assert_close(ops.linear(layer, x).float(), want, atol=1e-2, rtol=2 ** -7)
    calls = []
    real = cpu_kernels.gemv_bf16
    monkeypatch.setattr(cpu_kernels, "gemv_bf16", lambda x, w, b=None: calls.append(x.shape[0]) or real(x, w, b))
    engine.add_request("one", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    assert calls and set(calls) == {1}  # the prompt's last row and each decode row: one row a product
    invariant = EngineCore(EngineConfig.from_options(model=tiny_models["llama"], dtype="bfloat16", max_model_len=64,
                                                     batch_invariant=True), load_tokenizer_=False)
    assert not invariant.runner.model.ops._rows and invariant.runner.model.ops._head_rows is None


def test_bf16_weights_onednn_cannot_pack_are_packed_widened_to_fp32(tiny_models, monkeypatch):
    """Where oneDNN packs no bf16 (AVX2 without AVX-512; forced here), the bf16 linears and the
    logits head are packed widened to fp32 (`pack_dtype`): each product equals the fp32 product of
    the bf16 weight within one bf16 rounding of its output, which stays bf16; the engine decodes."""
    from pdserve.common.models import cpu_ops
    real_can_pack, real_pack = cpu_ops.can_pack, cpu_ops._pack_and_drop
    monkeypatch.setattr(cpu_ops, "can_pack", lambda dtype: dtype != torch.bfloat16 and real_can_pack(dtype))
    if cpu_ops.pack_dtype(torch.bfloat16) != torch.float32:
        pytest.skip("oneDNN packs nothing on this build")
    weights: dict[torch.nn.Module, torch.Tensor] = {}
    monkeypatch.setattr(cpu_ops, "_pack_and_drop",
                        lambda layer, dtype: real_pack(layer, dtype)
                        if weights.setdefault(layer, layer.weight.detach().clone()) is not None else None)
    engine = EngineCore(EngineConfig.from_options(model=tiny_models["llama"], dtype="bfloat16", max_model_len=64),
                        load_tokenizer_=False)
    model = engine.runner.model
    ops = model.ops
    head = model.lm_head  # the tiny llama's head is untied: a Linear, packed as the logits weight
    assert set(weights) == set(ops._packed) | {head} and set(ops._widened) == set(ops._packed) | {None}
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    g = torch.Generator().manual_seed(0)
    for layer, w in weights.items():
        x = torch.randn(7, layer.in_features, generator=g).to(torch.bfloat16)
        got = ops.logits(x, head.weight) if layer is head else ops.linear(layer, x)
        assert got.dtype == torch.bfloat16
        bias = None if layer.bias is None else layer.bias.float()
        want = torch.nn.functional.linear(x.float(), w.float(), bias)
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2 ** -7)
    assert all(len(o) == MAX_TOKENS for o in _greedy(engine, [[1, 2, 3, 4], [5, 6, 7]]))

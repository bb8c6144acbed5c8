"""The CUDA engine (Triton backend, CUDA graphs, KV pool sized from memory) against HF on CUDA.

Tiny random Llama (GQA group 4: the decode kernel's tl.dot path) and Qwen3 (group 2, q/k norm:
the broadcast path) saved with `save_pretrained`, no tokenizer (token-id prompts,
skip_tokenizer_init). float32: greedy tokens identical to HF transformers on CUDA, with and
without CUDA graphs, under chunked prefill and preemption. bfloat16: prefill logits (fresh
prompts, a later chunk reading its prefix from the cache, a one-token chunk in a mixed step) within
2e-2 relative error of HF's; KV pool sizing and its errors; dummy weights from a config.json.
Marked `gpu` (skipped without CUDA), except two CPU tests: `flatten_step` against the per-token
definition, and the Triton backend (and the CUDA-graph input path, replays run eagerly) on CPU
tensors under the Triton interpreter, in a subprocess (~35 s).
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from pdserve.common.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.model_runner import BlockTableCache, flatten_step
from pdserve.common.engine.outputs import ScheduledRequest
from pdserve.common.sampling_params import SamplingParams

MAX_TOKENS = 24
TINY = {  # family -> (config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                      head_dim=16, tie_word_embeddings=True)),
    "mistral_sw": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, num_attention_heads=4,
                                                               num_key_value_heads=2, sliding_window=32)),
}


def build_model(folder: str, family: str, vocab_size: int = 49152, initializer_range: float = 0.3) -> str:
    import transformers
    cfg_name, model_name, extra = TINY[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab_size, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, initializer_range=initializer_range, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(1234)
    getattr(transformers, model_name)(cfg).to(torch.float32).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpu_tiny")
    return {family: build_model(str(root / family), family) for family in TINY}


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_engine(folder: str, *, graphs: bool, dtype: str = "float32", num_blocks: int | None = None,
                max_model_len: int | None = None, max_num_batched_tokens: int = 8192,
                gpu_memory_utilization: float = 0.15, load_format: str = "auto",
                async_scheduling: bool | None = None) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model=folder, dtype=dtype, max_model_len=max_model_len, load_format=load_format,
                          device="cuda"),
        cache=CacheConfig(num_blocks=num_blocks, gpu_memory_utilization=gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=256),
        enforce_eager=not graphs, async_scheduling=async_scheduling)
    return EngineCore(config, load_tokenizer_=False)


def generate(engine: EngineCore, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    return [done[str(i)] for i in range(len(prompts))]


def hf_model(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()


def hf_greedy(folder: str, prompts: list[list[int]]) -> list[list[int]]:
    model = hf_model(folder, torch.float32)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return outs


_HF: dict[str, list[list[int]]] = {}


def reference(models, family, prompts):
    if family not in _HF:
        _HF[family] = hf_greedy(models[family], prompts)
    return _HF[family]


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("variant", ["default", "chunked_16", "preemption", "one_step_at_a_time"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_hf_on_cuda(models, prompts, family, variant, graphs):
    kwargs = {"default": {}, "chunked_16": {"max_num_batched_tokens": 16},
              "preemption": {"num_blocks": 24, "max_model_len": 384},
              "one_step_at_a_time": {"async_scheduling": False}}[variant]
    engine = make_engine(models[family], graphs=graphs, **kwargs)
    assert engine.async_scheduling == (variant != "one_step_at_a_time")  # overlapped steps by default on CUDA
    assert type(engine.runner.model.ops).__name__ == "TritonOps"
    assert (engine.runner.graphs is not None) == graphs
    got = generate(engine, prompts)
    assert got == reference(models, family, prompts)
    if graphs:
        assert engine.runner.graphs.num_replays > 0
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if variant == "default":
        assert engine.kv.num_prefix_hits > 0
    assert (engine.num_overlapped_steps > 0) == engine.async_scheduling


@pytest.mark.gpu
def test_sliding_window_matches_hf_on_cuda(models, prompts):
    long_prompts = [p for p in prompts if len(p) > 40][:6]
    engine = make_engine(models["mistral_sw"], graphs=True, max_num_batched_tokens=24)
    assert generate(engine, long_prompts) == hf_greedy(models["mistral_sw"], long_prompts)


def _scheduled(req_id: str, prompt: list[int], start: int, end: int, block_ids: list[int]) -> ScheduledRequest:
    return ScheduledRequest(req_id=req_id, input_token_ids=prompt[start:end], start_pos=start, block_ids=block_ids,
                            sample=end == len(prompt), params=SamplingParams(temperature=0), prompt_token_ids=prompt,
                            output_token_ids=[])


def _forward_logits(engine: EngineCore, ordered: list[ScheduledRequest], num_decodes: int) -> torch.Tensor:
    runner = engine.runner
    step = flatten_step(ordered, num_decodes, runner.block_size, BlockTableCache())
    with torch.inference_mode():
        ids, pos, meta, _ = runner.inputs.prepare(step)
        return runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))  # [T, V]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_prefill_logits_close_to_hf(tmp_path, family):
    # HF's default init (0.02): with 0.3 bf16 rounding alone moves the logits by ~1.6% (HF vs HF fp32)
    folder = build_model(str(tmp_path / family), family, initializer_range=0.02)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (40, 97, 130, 17)]
    split = [39, 50, 64, 17]  # step 2: a 1-token chunk (decode row), two later chunks; prompt 4 done in step 1
    engine = make_engine(folder, graphs=False, dtype="bfloat16", num_blocks=64)
    bs = engine.runner.block_size
    blocks, first = [], 1
    for p in prompts:
        n = -(-len(p) // bs)
        blocks.append(list(range(first, first + n)))
        first += n
    step1 = [_scheduled(str(i), p, 0, s, b) for i, (p, s, b) in enumerate(zip(prompts, split, blocks))]
    logits1 = _forward_logits(engine, step1, 0)
    step2 = [_scheduled(str(i), prompts[i], split[i], len(prompts[i]), blocks[i]) for i in range(3)]
    logits2 = _forward_logits(engine, step2, 1)
    # step 2 rows: prompt 0's one-token chunk (a decode row) first, then the chunks of prompts 1, 2
    ours, at1, at2 = [], 0, 1
    for i, p in enumerate(prompts):
        rows = [logits1[at1:at1 + split[i]]]
        at1 += split[i]
        if i == 0:
            rows.append(logits2[:1])
        elif i < 3:
            rows.append(logits2[at2:at2 + len(p) - split[i]])
            at2 += len(p) - split[i]
        ours.append(torch.cat(rows))
    hf = hf_model(folder, torch.bfloat16)
    with torch.inference_mode():
        for p, got in zip(prompts, ours):
            want = hf(torch.tensor([p], device="cuda")).logits[0].float()
            assert torch.isfinite(got).all()
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 2e-2, f"relative error {rel:.3g} for a {len(p)}-token prompt"


def _write_config(folder: str, **overrides) -> str:
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "dtype": "bfloat16", **overrides}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.gpu
def test_dummy_weights_from_a_config_only_folder(tmp_path):
    folder = _write_config(str(tmp_path / "cfg_only"))
    engine = make_engine(folder, graphs=True, dtype="auto", load_format="dummy")
    assert engine.runner.dtype == torch.bfloat16 and engine.tokenizer is None
    assert all(torch.isfinite(p).all() for p in engine.runner.model.parameters())
    outs = generate(engine, [[5, 6, 7], list(range(10, 300))], max_tokens=16)
    assert [len(o) for o in outs] == [16, 16]


@pytest.mark.gpu
def test_kv_pool_is_sized_from_gpu_memory(models):
    engine = make_engine(models["llama"], graphs=False, gpu_memory_utilization=0.15)
    runner = engine.runner
    total = torch.cuda.get_device_properties(0).total_memory
    assert runner.num_blocks * runner.bytes_per_block() <= 0.15 * total
    assert runner.num_blocks * runner.block_size >= engine.max_model_len


@pytest.mark.gpu
def test_too_little_memory_for_max_model_len_is_a_config_error(models):
    with pytest.raises(ConfigError, match="gpu-memory-utilization"):
        make_engine(models["llama"], graphs=False, gpu_memory_utilization=0.001)


@pytest.mark.gpu
def test_weights_that_do_not_fit_are_a_config_error(tmp_path):
    folder = _write_config(str(tmp_path / "huge"), hidden_size=16384, intermediate_size=65536, num_hidden_layers=200,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=32000)
    with pytest.raises(ConfigError, match="does not fit"):
        make_engine(folder, graphs=False, load_format="dummy")


_INTERPRETER_SCRIPT = r"""
import runpy, sys
runpy.run_path(sys.argv[1])  # tests/kernels/conftest.py: fixes for Triton 3.6's interpreter
import torch
from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.common.engine.cuda_graphs import DecodeGraphs
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.model_runner import ModelRunner
from pdserve.common.sampling_params import SamplingParams

# float32 (the checkpoint's; --dtype auto is bf16 on a CPU with AVX512-BF16): the runs compare tokens with
# the reference kernels' (the Triton runners name their backend)
config = EngineConfig(model=ModelConfig(model=sys.argv[2], max_model_len=256, dtype="float32", kernels="reference"),
                      cache=CacheConfig(num_blocks=64),
                      scheduler=SchedulerConfig(max_num_batched_tokens=40, max_num_seqs=6))
prompts = [list(range(5, 8)), list(range(5, 22)), list(range(5, 45)), [9], list(range(5, 25)) + [7, 8]]

class EagerReplay:  # stands in for a captured graph: the same forward over the static buffers
    def __init__(self, graphs, key):
        self.graphs, self.key = graphs, key
    def replay(self):
        g, bs = self.graphs, self.key[0]
        g._outputs[self.key].copy_(g.model(g._static["ids"][:bs], g._static["pos"][:bs], g.kv_caches,
                                           g._metadata(*self.key)))

class EagerTail:  # a captured tail graph (greedy_tail.py): the bucket's tokens from its hidden
    def __init__(self, graphs, key, tail):
        self.graphs, self.key, self.tail = graphs, key, tail
    def replay(self):  # a new tensor, not the static one overwritten: on CPU the step's PendingOutput
        # holds the tokens themselves (on CUDA it copies them to pinned memory at launch)
        self.graphs._tokens[self.key] = self.tail(self.graphs._outputs[self.key])

def run(backend):  # torch: one step at a time; triton and graphs: overlapped steps (placeholder fills)
    import dataclasses
    engine = EngineCore(dataclasses.replace(config, async_scheduling=backend != "torch"), load_tokenizer_=False)
    if backend != "torch":
        runner = engine.runner = ModelRunner(config.model, config.cache, engine.arch, engine.model_path, 256,
                                             scheduler_cfg=config.scheduler, attention_backend="triton")
        assert type(runner.model.ops).__name__ == "TritonOps"
    if backend == "graphs":  # buckets 1, 2, 4, 6: padded rows, fixed num_splits, static buffers
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, engine.arch.num_kv_heads, runner.block_size,
                                     6, 256, runner.device)
        for bs in runner.graphs.sizes:
            key = (bs, False)
            runner.graphs._graphs[key] = EagerReplay(runner.graphs, key)
            runner.graphs._outputs[key] = torch.full((bs, engine.arch.hidden_size), float("nan"))
            runner.graphs._tail_graphs[key] = EagerTail(runner.graphs, key, runner.greedy_tail)
            runner.graphs._tokens[key] = torch.full((bs,), -7, dtype=torch.long)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            done.setdefault(o.request_id, []).extend(o.new_token_ids)
    replays = min(runner.graphs.num_replays, runner.graphs.num_tail_replays) if backend == "graphs" else None
    assert (engine.num_overlapped_steps > 0) == (backend != "torch")
    return [done[str(i)] for i in range(len(prompts))], engine.kv.num_prefix_hits, replays

want, got, graphed = run("torch"), run("triton"), run("graphs")
assert got[:2] == want[:2], (got, want)
assert graphed[:2] == want[:2] and graphed[2] > 0, (graphed, want)
assert want[1] > 0  # prompt 5 read its first block from the prefix cache
print("OK", got, graphed[2])
"""


def test_triton_backend_under_the_interpreter_matches_torch(tmp_path):
    """Qwen3 (q/k norm) through the whole engine: mixed decode + chunked prefill steps, a prefix hit;
    then the CUDA-graph input path (static buffers, padded buckets) with each replay (forward and
    greedy tail) run eagerly. The Triton runs overlap their steps (decode inputs filled from the
    previous step's tokens)."""
    pytest.importorskip("triton")
    folder = build_model(str(tmp_path / "qwen3"), "qwen3", vocab_size=512)
    conftest = os.path.join(os.path.dirname(__file__), "..", "kernels", "conftest.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, conftest, folder], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout


def test_flatten_step_matches_the_per_token_definition():
    """Vectorised inputs == the per-token loop, as requests grow, get preempted and rows are reused."""
    rng = random.Random(3)
    tables, bs = BlockTableCache(), 4
    reqs: dict[str, tuple[int, list[int]]] = {}  # req_id -> (start_pos, block_ids)
    next_block = 0
    for step in range(40):
        dropped = {r for r in reqs if rng.random() < 0.15}
        for r in dropped:
            del reqs[r]
        tables.drop(dropped)
        for _ in range(rng.randint(0, 3)):
            reqs[f"r{step}-{len(reqs)}"] = (0, [])
        for r in [r for r in reqs if rng.random() < 0.1]:  # preempted: recomputed on new blocks
            reqs[r] = (0, [])
            if rng.random() < 0.5:  # the runner is told; otherwise the id check must catch it
                tables.drop({r})
        ordered, num_decodes = [], 0
        for req_id, (start, blocks) in sorted(reqs.items(), key=lambda kv: kv[1][0] == 0):
            n = 1 if start else rng.randint(2, 30)
            while len(blocks) * bs < start + n + rng.randint(0, 6):
                blocks.append(next_block)
                next_block += 1
            tokens = [rng.randrange(1000) for _ in range(n)]
            ordered.append(ScheduledRequest(req_id, tokens, start, list(blocks), rng.random() < 0.8,
                                            SamplingParams(), [], []))
            num_decodes += n == 1
            reqs[req_id] = (start + n, blocks)
        if not ordered:
            continue
        got = flatten_step(ordered, num_decodes, bs, tables)
        pos = [p for s in ordered for p in range(s.start_pos, s.start_pos + s.num_tokens)]
        owner = [s for s in ordered for _ in range(s.num_tokens)]
        slots = [s.block_ids[p // bs] * bs + p % bs for s, p in zip(owner, pos)]
        assert got.positions.tolist() == pos and got.slot_mapping.tolist() == slots
        assert got.input_ids.tolist() == [t for s in ordered for t in s.input_token_ids]
        assert got.context_lens.tolist() == [s.start_pos + s.num_tokens for s in ordered]
        for row, s in zip(got.block_table.tolist(), ordered):
            n = -(-(s.start_pos + s.num_tokens) // bs)
            assert row == s.block_ids[:n] + [0] * (len(row) - n)
        ends = [sum(s.num_tokens for s in ordered[:i + 1]) - 1 for i in range(len(ordered))]
        assert got.sample_rows.tolist() == [e for e, s in zip(ends, ordered) if s.sample]


@pytest.mark.gpu
def test_batch1_linears_use_gemv_only_where_measured_faster():
    """choose_gemv times each distinct weight at M = 1, and gemv_rows at 2..16 rows; routed
    weights give cuBLAS's result (bf16 tolerance), unrouted ones and batches past 16 rows go to
    cuBLAS unchanged."""
    from pdserve.common.models.triton_attention import TritonOps, choose_gemv
    ops = TritonOps()
    model = torch.nn.ModuleDict({"o_proj": torch.nn.Linear(4096, 4096, bias=False),
                                 "qkv_proj": torch.nn.Linear(4096, 6144, bias=True),
                                 "lm_head": torch.nn.Linear(4096, 1000, bias=False)}).cuda().bfloat16()
    report = choose_gemv(ops, model)
    assert {k for k in report if " " not in k} == {"4096x4096", "6144x4096"}  # lm_head is not routed
    for name in ("o_proj", "qkv_proj"):
        layer = model[name]
        cublas_us, gemv_us, chosen = report["x".join(map(str, layer.weight.shape))]
        assert chosen == ((tuple(layer.weight.shape), torch.bfloat16) in ops.gemv_weights)
        assert chosen == (gemv_us < 0.97 * cublas_us)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            want, got = layer(x), ops.linear(layer, x)
            assert (got - want).norm() / want.norm() <= 1e-2
        label = "x".join(map(str, layer.weight.shape))
        up_to = report[label + " rows up to"]
        assert ops.gemv_rows.get((tuple(layer.weight.shape), torch.bfloat16), (0, None))[0] == up_to
        for m, (cublas_m, rows_m) in report[label + " rows"].items():
            if m <= up_to:  # (the report's times are rounded to 0.1 us)
                assert rows_m <= 0.97 * cublas_m + 0.1
        with torch.inference_mode():
            for m in (2, 9, 16, 17):
                xm = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
                want, got = layer(xm), ops.linear(layer, xm)
                if m <= up_to:
                    assert (got - want).norm() / want.norm() <= 1e-2
                else:
                    assert torch.equal(got, want)

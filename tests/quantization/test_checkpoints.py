"""`pdserve quantize` writes the real layouts; pdserve loads them back to the weights they encode.

Bounds (tiny models, weight std 0.02):
  fp8 e4m3, per channel or per tensor: |w - w_q| <= 2^-4 |w| + the scale's subnormal step
  int4 RTN (AWQ, GPTQ sym/asym, act-order), group 32: |w - w_q| <= step / 2 + 16 step 2^-11 (the
      step is stored in fp16, and the error of its rounding grows with |q - zero| <= 15)
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from pdserve.common.config import ConfigError
from pdserve.common.engine.llm import LLM
from pdserve.common.models.quantization.fp8 import Fp8Linear
from pdserve.common.models.quantization.int_linear import IntLinear
from pdserve.common.models.quantization.packing import AWQ_ORDER, pack_cols, pack_rows, unpack_cols, unpack_rows
from pdserve.services.cli import main

from helpers import LINEARS, dequantized_weight, int_step


def test_packing_orders():
    values = torch.arange(16, dtype=torch.int32).view(2, 8) % 16  # row 0: 0..7, row 1: 8..15
    gptq = pack_cols(values, 4)
    assert gptq[0, 0] == sum(v << (4 * j) for j, v in enumerate(range(8)))  # sequential nibbles
    awq = pack_cols(values, 4, awq_order=True)
    assert [(int(awq[0, 0]) >> (4 * j)) & 15 for j in range(8)] == list(AWQ_ORDER)  # position j: output AWQ_ORDER[j]
    for awq_order in (False, True):
        assert torch.equal(unpack_cols(pack_cols(values, 4, awq_order), 4, awq_order), values)
    big = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(big, 4), 4), big)
    assert torch.equal(unpack_rows(pack_rows(big * 16 + big, 8), 8), big * 17)
    assert pack_rows(torch.full((8, 1), 15), 4).dtype == torch.int32  # 0xFFFFFFFF fits as -1
    assert int(pack_rows(torch.full((8, 1), 15), 4)) == -1


def tensors(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_files_have_the_real_layouts(quant_models):
    p = "model.layers.0.self_attn.k_proj."  # k_proj: N = 32 outputs, K = 64 inputs
    awq = tensors(quant_models["llama-awq"])
    assert awq[p + "qweight"].shape == (64, 4) and awq[p + "qweight"].dtype == torch.int32
    assert awq[p + "qzeros"].shape == (2, 4) and awq[p + "scales"].shape == (2, 32)
    assert awq[p + "scales"].dtype == torch.float16 and p + "weight" not in awq
    gptq = tensors(quant_models["llama-gptq-asym-act"])
    assert gptq[p + "qweight"].shape == (8, 32) and gptq[p + "qzeros"].shape == (2, 4)
    assert gptq[p + "g_idx"].shape == (64,) and gptq[p + "g_idx"].dtype == torch.int32
    assert sorted(torch.bincount(gptq[p + "g_idx"]).tolist()) == [32, 32]
    # act-order: o_proj's groups follow its column norms (q/k/v follow the RMSNorm weight, all 1 here)
    o_idx = gptq["model.layers.0.self_attn.o_proj.g_idx"]
    assert sorted(torch.bincount(o_idx).tolist()) == [32, 32] and not torch.equal(o_idx, torch.arange(64) // 32)
    fp8 = tensors(quant_models["llama-fp8"])
    assert fp8[p + "weight"].dtype == torch.float8_e4m3fn and fp8[p + "weight_scale"].shape == (32, 1)
    assert tensors(quant_models["llama-fp8-tensor"])[p + "weight_scale"].shape == ()
    assert fp8["lm_head.weight"].dtype == torch.float32 and fp8["model.embed_tokens.weight"].dtype == torch.float32
    configs = {name: json.load(open(os.path.join(quant_models[f"llama-{name}"], "config.json")))["quantization_config"]
               for name in ("awq", "gptq", "gptq-asym-act", "fp8", "fp8-tensor")}
    assert configs["awq"] == {**configs["awq"], "quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                              "zero_point": True}
    assert configs["gptq"]["sym"] and not configs["gptq"]["desc_act"] and configs["gptq"]["checkpoint_format"] == "gptq"
    assert configs["gptq-asym-act"]["desc_act"] and not configs["gptq-asym-act"]["sym"]
    assert configs["fp8"]["quant_method"] == "compressed-tensors" and configs["fp8-tensor"]["quant_method"] == "fp8"
    assert configs["gptq"]["lm_head"] is False and "lm_head.weight" in gptq
    head = tensors(quant_models["llama-gptq-head"])  # the head: N = 49152 outputs, K = 64 inputs
    assert head["lm_head.qweight"].shape == (8, 49152) and head["lm_head.scales"].shape == (2, 49152)
    assert "lm_head.weight" not in head and head["model.embed_tokens.weight"].dtype == torch.float32
    assert json.load(open(os.path.join(quant_models["llama-gptq-head"], "config.json")))[
        "quantization_config"]["lm_head"] is True
    assert os.path.isfile(os.path.join(quant_models["llama-awq"], "tokenizer.json"))


@pytest.mark.parametrize("variant", ["fp8", "fp8-tensor", "awq", "gptq", "gptq-asym-act", "gptq-head"])
def test_loaded_weights_match_the_originals(quant_models, variant):
    # the reference path keeps the nn.Linear weights (the CPU fast path packs them and drops them)
    ref = LLM(quant_models["llama"], dtype="float32", kernels="reference",
              enable_prefix_caching=False).engine.runner.model
    llm = LLM(quant_models[f"llama-{variant}"], dtype="float32", enable_prefix_caching=False)
    model = llm.engine.runner.model
    assert model.quant_config.method == variant.split("-")[0] and model.quant_config.prequantized
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            q, w = layer.get_submodule(name), ref.layers[i].get_submodule(name).weight.detach().float()
            got = dequantized_weight(q)
            if variant.startswith("fp8"):
                assert isinstance(q, Fp8Linear)
                bound = w.abs() * 2**-4 + q.weight_scale.float()[:, None] * 2**-9
            else:
                assert isinstance(q, IntLinear) and q.bits == 4 and q.group_size == 32
                if name in ("self_attn.o_proj", "mlp.down_proj"):
                    assert (q.perm is not None) == variant.endswith("act")
                bound = int_step(q) * (0.5 + 16 * 2**-11) + 1e-7
            assert (got - w).abs().le(bound).all(), (variant, i, name, float(((got - w).abs() - bound).max()))
    if variant != "gptq-head":
        assert isinstance(model.lm_head, torch.nn.Linear)
        return
    head, w = model.lm_head, ref.lm_head.weight.detach().float()
    assert isinstance(head, IntLinear) and head.out_features == 49152
    assert (dequantized_weight(head) - w).abs().le(int_step(head) * (0.5 + 16 * 2**-11) + 1e-7).all()


def test_qwen2_biases_and_fused_act_order(quant_models):
    """q/k/v biases ride along; GPTQ act-order g_idx shared by the fused q/k/v and gate/up."""
    ref = LLM(quant_models["qwen2"], dtype="float32").engine.runner.model
    for variant in ("fp8", "awq", "gptq-asym-act"):
        model = LLM(quant_models[f"qwen2-{variant}"], dtype="float32").engine.runner.model
        qkv, ref_qkv = model.layers[1].self_attn.qkv_proj, ref.layers[1].self_attn.qkv_proj
        assert qkv.bias is not None and torch.equal(qkv.bias, ref_qkv.bias)


def test_online_fp8_quantizes_a_full_precision_checkpoint(quant_models):
    model = LLM(quant_models["llama"], quantization="fp8", dtype="float32").engine.runner.model
    assert not model.quant_config.prequantized
    kinds = {type(m).__name__ for layer in model.layers for m in layer.modules()}
    assert "Fp8Linear" in kinds and "Linear" not in kinds
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32


def test_cli_quantize_and_generate(quant_models, tmp_path, capsys):
    out = str(tmp_path / "gptq")
    assert main(["quantize", "--model", quant_models["llama"], "--method", "gptq", "--output", out,
                 "--group-size", "64", "--asym"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_weights"] == 14 and summary["bytes_after"] < summary["bytes_before"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    assert main(["generate", "--model", out, "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--max-tokens", "4", "--temperature", "0", "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["tokens"] == 4
    # errors are one line, exit 2
    assert main(["quantize", "--model", out, "--method", "awq", "--output", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", "--model", quant_models["llama"], "--method", "awq", "--output", str(tmp_path / "y"),
                 "--group-size", "256"]) == 2
    assert "--group-size 256 does not divide" in capsys.readouterr().err
    assert main(["generate", "--model", quant_models["llama"], "--input", str(prompts), "--quantization", "awq"]) == 2
    assert "needs a checkpoint in that format" in capsys.readouterr().err
    assert main(["generate", "--model", out, "--input", str(prompts), "--output", str(tmp_path / "q.jsonl"),
                 "--max-tokens", "2", "--kv-cache-dtype", "fp8", "--kv-cache-scale", "per-tensor"]) == 0


def _edit_config(src: str, dst, **quant) -> str:
    import shutil
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config["quantization_config"].update(quant)
    json.dump(config, open(path, "w"))
    return str(dst)


@pytest.mark.parametrize("variant,edit,message", [
    ("gptq", {"bits": 3}, "3-bit weights is not supported"),
    ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ("awq", {"version": "gemv"}, "only AWQ's GEMM packing"),
    ("awq", {"zero_point": False}, "zero_point false"),
    ("gptq", {"group_size": 48}, "group_size must be a power of two"),
    ("fp8-tensor", {"weight_block_size": [128, 128]}, "block-wise fp8"),
    ("fp8", {"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
    ("gptq", {"group_size": 128}, "does not divide the 64 inputs"),
    ("gptq", {"lm_head": True}, "makes lm_head a quantized layer"),  # the config says so, the file does not
])
def test_unsupported_schemes_are_config_errors(quant_models, tmp_path, variant, edit, message):
    folder = _edit_config(quant_models[f"llama-{variant}"], tmp_path / "m", **edit)
    with pytest.raises(ConfigError, match=message):
        LLM(folder, dtype="float32")


def test_flag_conflicts(quant_models):
    with pytest.raises(ConfigError, match="contradicts the checkpoint"):
        LLM(quant_models["llama-awq"], quantization="gptq")
    with pytest.raises(ConfigError, match="needs a checkpoint in that format"):
        LLM(quant_models["llama"], quantization="awq")
    with pytest.raises(ConfigError, match="--quantization must be one of"):
        LLM(quant_models["llama"], quantization="int3")


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "gptq-head"])
def test_dummy_weights_are_drawn_in_quantized_form(smollm2_tokenizer_dir, tmp_path, method):
    """--load-format dummy --quantization awq|gptq: random int4 weights (group 128) made directly,
    how the GPU benchmark builds a 70B-shaped model; fp8: random weights quantized at load;
    gptq-head: a config with GPTQ's lm_head: true (bench_gpu --quantized-lm-head) draws the head too."""
    from pdserve.common.sampling_params import SamplingParams
    import shutil
    folder = str(tmp_path / "m")
    shutil.copytree(smollm2_tokenizer_dir, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:  # no weights: dummy loading reads the shape only
        json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                   "max_position_embeddings": 512, "torch_dtype": "float32",
                   **({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False,
                                               "lm_head": True}} if method == "gptq-head" else {})}, f)
    llm = LLM(folder, load_format="dummy", quantization=method.removesuffix("-head"), dtype="float32")
    head = llm.engine.runner.model.lm_head
    assert isinstance(head, IntLinear) == (method == "gptq-head")
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear if method == "fp8" else IntLinear)
    w = dequantized_weight(qkv)
    assert 0.01 < float(w.std()) < 0.04 and w.isfinite().all()
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_lm_head_quantization_needs_an_untied_gptq_head(quant_models, tiny_model_factory, tmp_path, capsys):
    tied = tiny_model_factory(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    for method, src, message in (("gptq", tied, "ties its LM head to the embedding"),
                                 ("awq", quant_models["llama"], "--lm-head is a GPTQ option")):
        assert main(["quantize", "--model", src, "--method", method, "--output", str(tmp_path / method),
                     "--group-size", "32", "--rtn", "--lm-head"]) == 2
        assert message in capsys.readouterr().err
    # a config that says the head is quantized, on a model whose head is the embedding
    folder = _edit_config(quant_models["llama-gptq"], tmp_path / "m", lm_head=True)
    config = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**config, "tie_word_embeddings": True}, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ConfigError, match="ties its head to the embedding"):
        LLM(folder, dtype="float32")

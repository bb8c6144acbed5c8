"""The model bench_pd_gpu and bench_pd_tp serve: the Llama-3-8B shape (or a tiny one) with a
word-level tokenizer whose token i is the word `t<i>` (text and ids map one to one, so the router
needs no real tokenizer and a completion's text gives its ids back), optional seeded weights, and
the greedy comparison both report."""

from __future__ import annotations

import json
import os
import re

from pdserve.services.bench_gpu import LLAMA3_8B, TINY


def write_model(folder: str, tiny: bool = False) -> str:
    """config.json of the Llama-3-8B shape (TINY: a small one) and a word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    shape = TINY if tiny else LLAMA3_8B
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape, f, indent=2)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": f"t{shape['eos_token_id']}", "bos_token": f"t{shape['bos_token_id']}"}, f)
    return folder


def write_weights(folder: str, dtype: str, seed: int) -> str:
    """Seeded random weights for the folder's config as model.safetensors (HF Llama names); large
    enough (std 0.3) that greedy choices have margins that bf16 rounding rarely flips."""
    import torch
    from safetensors.torch import save_file
    path = os.path.join(folder, "config.json")
    c = json.load(open(path))
    c["dtype"] = c["torch_dtype"] = dtype
    json.dump(c, open(path, "w"), indent=2)
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv, vocab = c["num_attention_heads"] * d, c["num_key_value_heads"] * d, c["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.3).to(getattr(torch, dtype))
    ones = torch.ones(h, dtype=getattr(torch, dtype))
    tensors = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": ones, "lm_head.weight": w(vocab, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                    p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                    p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                    p + "mlp.down_proj.weight": w(h, inter), p + "input_layernorm.weight": ones.clone(),
                    p + "post_attention_layernorm.weight": ones.clone()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    return folder


def ids_of(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"t(\d+)", text)]


def greedy_summary(reference: list[list[int]], got: list[list[int]], stats: dict) -> dict:
    equal = [g == r for g, r in zip(got, reference)]
    return {"prompts": len(reference), "equal": sum(equal), "handoffs": stats.get("handoffs"),
            "recomputed_prompt_tokens": stats.get("recomputed_prompt_tokens"),
            "first_mismatch": next(({"prompt": i, "reference": reference[i], "1p1d": got[i]}
                                    for i, ok in enumerate(equal) if not ok), None)}

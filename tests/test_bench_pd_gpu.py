"""The GPU run script's model folder: the word-level tokenizer maps text and token ids one to one
(the greedy check reads ids back from completions text). The script itself runs on the GPU
machine; `--device cpu --tiny` smoke-runs every part (minutes: not in CI)."""

from __future__ import annotations

import torch

from pdserve.common.tokenizer import Tokenizer
from pdserve.services.bench_pd_gpu import ids_of, write_model


def test_dummy_model_tokenizer_round_trips_token_ids(tmp_path):
    folder = write_model(str(tmp_path / "m"), tiny=True)
    tok = Tokenizer(folder)
    ids = [5, 4095, 100, 7, 7]
    text = " ".join(f"t{i}" for i in ids)
    assert tok.encode(text) == ids  # no BOS or other added tokens
    assert ids_of(tok.decode(ids)) == ids
    assert tok.vocab_size == 4096  # TINY; its eos id 128001 lies outside, so no eos token here
    assert write_model(str(tmp_path / "big")) and Tokenizer(str(tmp_path / "big")).eos_token_ids == [128001]


def test_tp_part_weights_load_into_the_engine(tmp_path):
    """The tp part's seeded weights use the names the loader reads (they replace dummy weights,
    which differ per TP size): the engine holds exactly the file's tensors."""
    from safetensors.torch import load_file

    from pdserve.common.engine.llm import LLM
    from pdserve.services.bench_pd_gpu import write_weights

    folder = write_weights(write_model(str(tmp_path / "tp"), tiny=True), "float32", seed=3)
    tensors = load_file(str(tmp_path / "tp" / "model.safetensors"))
    # the file's dtype; the reference path keeps the nn.Linear weights (the CPU fast path packs them)
    llm = LLM(folder, num_gpu_blocks_override=64, max_model_len=256, dtype="float32", kernels="reference")
    try:
        model = llm.engine.runner.model
        assert torch.equal(model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
        assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    finally:
        llm.shutdown()

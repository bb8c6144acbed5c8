"""The GPU run script's model folder: the word-level tokenizer maps text and token ids one to one
(the greedy check reads ids back from completions text). The script itself runs on the GPU
machine; `--device cpu --tiny` smoke-runs every part (minutes: not in CI)."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.tokenizer import Tokenizer
from pdserve.services.bench_pd_model import ids_of, write_model


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
    from pdserve.services.bench_pd_model import write_weights

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


def test_tp_layouts_on_two_gpus_one_gpu_per_rank_or_decode_beside_prefill():
    """2 GPUs: 1:1 on its own GPUs over nccl; the others skipped, or with --tp-share-gpus decode's
    ranks on the last GPUs over ucx; and each worker's --device puts rank r on the placement's GPU
    (tp_workers.rank_device, as the worker process computes it)."""
    from pdserve.common.engine.tp_workers import rank_device
    from pdserve.services.bench_pd_tp import place_layout

    shared = {x: place_layout(x, 2, share=True) for x in ("1:1", "2:1", "1:2", "2:2")}
    assert [(p.prefill_gpus, p.decode_gpus, p.kv_transport, p.shared) for p in shared.values()] == [
        ((0,), (1,), "nccl", False), ((0, 1), (1,), "ucx", True), ((0,), (0, 1), "ucx", True),
        ((0, 1), (0, 1), "ucx", True)]
    for p in shared.values():
        for role, gpus in (("prefill", p.prefill_gpus), ("decode", p.decode_gpus)):
            assert [rank_device(p.device(role, gpu=True), r) for r in range(len(gpus))] == [f"cuda:{g}" for g in gpus]
            assert p.device(role, gpu=False) == "cpu"
    alone = place_layout("2:1", 2, share=False)
    assert alone.skipped and "3 GPUs" in alone.skipped and not alone.prefill_gpus
    assert place_layout("3:1", 2, share=True).skipped.startswith("needs 3 GPUs even beside each other")
    assert place_layout("2:2", 4, share=True).decode_gpus == (2, 3)  # enough GPUs: never shared
    with pytest.raises(ValueError, match="--tp-layouts"):
        place_layout("2-1", 2, share=True)

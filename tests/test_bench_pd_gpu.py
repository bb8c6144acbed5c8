"""The GPU run script's model folder: the word-level tokenizer maps text and token ids one to one
(the greedy check reads ids back from completions text). The script itself runs on the GPU
machine; `--device cpu --tiny` smoke-runs every part (minutes: not in CI)."""

from __future__ import annotations

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

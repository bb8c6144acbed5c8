"""The GGUF header parser agrees with the `gguf` package's reader: every metadata value, every
tensor's name, shape, type, offset and bytes; the file is parsed once per process."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.common.config import ConfigError
from pdserve.common.models import gguf_header
from pdserve.common.models.gguf_header import StringArray, read_header, tensor_data


def write_gguf(path) -> None:
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("some.flag", True)
    w.add_string("general.name", "tiny ünïcode")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)] + ["é", ""])
    w.add_array("tokenizer.ggml.token_type", list(range(302)))
    w.add_uint64("big.number", 1 << 40)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((4, 64)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_header_matches_the_gguf_reader(tmp_path):
    import gguf
    path = tmp_path / "t.gguf"
    write_gguf(path)
    ours, theirs = read_header(str(path)), gguf.GGUFReader(str(path))
    theirs_fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # its file-level ones
    assert set(ours.fields) == set(theirs_fields)
    for key, f in theirs_fields.items():
        value = ours.fields[key]
        if isinstance(value, StringArray):
            assert len(value) == len(f.data) == 302
        elif isinstance(value, np.ndarray):
            assert value.tolist() == list(f.contents())
        else:
            assert value == pytest.approx(f.contents()) if isinstance(value, float) else value == f.contents(), key
    assert ours.fields["general.name"] == "tiny ünïcode" and ours.fields["big.number"] == 1 << 40
    data = np.memmap(path, dtype=np.uint8, mode="r")
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert (list(mine.shape), mine.ggml_type, mine.offset) == (ref.shape.tolist(), int(ref.tensor_type), ref.data_offset)
        raw = tensor_data(data, mine)
        assert raw.dtype == ref.data.dtype and raw.shape == ref.data.shape and np.array_equal(raw, ref.data)


def test_parsed_once_and_bad_files_are_config_errors(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path)
    gguf_header._read_header.cache_clear()
    assert read_header(str(path)) is read_header(str(path))
    assert gguf_header._read_header.cache_info().hits == 1
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a valid GGUF file: truncated header"):
        read_header(str(truncated))
    with pytest.raises(ConfigError, match="model file not found"):
        read_header(str(tmp_path / "missing.gguf"))

"""A GGUF file's header (metadata and tensor table), read once per process and fast.

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (u64 length + utf-8) | value type u32 | value     (arrays: type u32, count u64, items)
    tensors:   name | n_dims u32 | dims u64[n_dims] (innermost first) | ggml type u32 | offset u64
    padding to general.alignment (32) | tensor data (offsets relative to here)

`gguf.GGUFReader` parses every metadata item into numpy views one element at a time: on the
packaged SmolLM2 (49,152 vocabulary strings, 48,900 merges) that took ~60% of a server's start.
Here string arrays are only walked (their items are not needed to load a model; the tokenizer is
converted by transformers in its own process, common/tokenizer.py), numeric arrays are one
`np.frombuffer`, and the result is cached by (path, size, mtime), so the architecture read and
the weight load share one parse. Tensor bytes are mapped only while the weights load
(`tensor_data`), never kept.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

import numpy as np

from pdserve.common.config import ConfigError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class StringArray:
    """A metadata array of strings, walked but not decoded: its length is what loading needs."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    fields: dict  # key -> int | float | bool | str | np.ndarray | StringArray
    tensors: tuple[TensorInfo, ...]

    def field(self, key: str, default=None):
        return self.fields.get(key, default)


def read_header(path: str) -> GGUFHeader:
    """The header of `path` (ConfigError if it is missing or not GGUF); parsed once per file
    version in this process."""
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError(f"model file not found: {path}") from None
    return _read_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as f:
        buf = f.read(min(size, 1 << 20))
        reader = _Reader(buf, f, size)
        try:
            return reader.header(path)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise ConfigError(f"{path} is not a valid GGUF file: {e}") from None


class _Reader:
    """Little-endian reads over a buffer that grows from the file as the parse needs."""

    def __init__(self, buf: bytes, f, size: int):
        self.buf, self.f, self.size, self.pos = buf, f, size, 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            if self.pos + n > self.size:
                raise ValueError("truncated header")
            more = max(self.pos + n - len(self.buf), len(self.buf))  # at least double
            self.buf += self.f.read(more)

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self._need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self._need(8)
            (n,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8 + n
        self._need(0)

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype == STRING:
                self.skip_strings(count)
                return StringArray(count)
            if itype not in _NUMPY:
                raise ValueError(f"array of value type {itype}")
            dtype = np.dtype(_NUMPY[itype]).newbyteorder("<")
            self._need(count * dtype.itemsize)
            arr = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr
        if vtype not in _SCALARS:
            raise ValueError(f"metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])

    def header(self, path: str) -> GGUFHeader:
        self._need(4)
        if self.buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        self.pos = 4
        version = self.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read; a big-endian file is not)")
        num_tensors, num_fields = self.scalar("<Q"), self.scalar("<Q")
        fields = {}
        for _ in range(num_fields):
            key = self.string()
            fields[key] = self.value(self.scalar("<I"))
        infos = []
        for _ in range(num_tensors):
            name = self.string()
            dims = tuple(self.scalar("<Q") for _ in range(self.scalar("<I")))
            infos.append((name, dims, self.scalar("<I"), self.scalar("<Q")))
        alignment = int(fields.get("general.alignment", 32))
        start = -(-self.pos // alignment) * alignment
        tensors = tuple(TensorInfo(name, dims, ggml_type, start + offset) for name, dims, ggml_type, offset in infos)
        return GGUFHeader(path, version, fields, tensors)


def tensor_data(data: np.memmap, t: TensorInfo) -> np.ndarray:
    """The raw array of one tensor from a read-only map of its file (the shape gguf's dequantize
    expects: float types as their dtype, quantized types as uint8 rows of blocks)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape
    qtype = GGMLQuantizationType(t.ggml_type)
    n_elems = int(np.prod(t.shape))
    np_shape = tuple(reversed(t.shape))  # outermost first
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if qtype in plain:
        return np.frombuffer(data, plain[qtype], n_elems, t.offset).reshape(np_shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = n_elems * type_size // block_size
    return np.frombuffer(data, np.uint8, n_bytes, t.offset).reshape(quant_shape_to_byte_shape(np_shape, qtype))

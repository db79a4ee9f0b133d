"""A small GGUF reader: the metadata as Python values and the tensors as numpy views of the
memory-mapped file, in the layout `gguf.quants.dequantize` takes.

`gguf.GGUFReader` builds a numpy view per metadata item, which for a tokenizer's ~49k
tokens and ~48k merges costs ~1.8 s; this parser reads the same header with `struct` in a
fraction of that. It handles GGUF versions 2 and 3 (little-endian), which is what llama.cpp
writes. Torch-free.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}
_PLAIN[28] = np.float64
"""ggml types stored as plain arrays (F32, F16, I8..I64, F64); every other type is bytes."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    """GGUF order: the fastest-varying dimension first."""
    tensor_type: int
    data: np.ndarray[Any, Any]
    """Plain types: values shaped reversed(shape); quantized: bytes shaped (rows, row bytes)."""


class GGUFReader:
    """Metadata (`fields`: key -> int/float/bool/str or list) and tensors of a GGUF file."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._mm
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        self._pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ttype, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), ttype, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._mm, self._pos)
        start = self._pos + 8
        self._pos = start + n
        return self._mm[start : self._pos].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._unpack("<IQ")
            if itype == _STRING:
                return [self._string() for _ in range(count)]
            if itype in _SCALARS:
                return list(self._unpack(f"<{count}{_SCALARS[itype]}"))
            return [self._value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self._unpack("<" + _SCALARS[vtype])[0]

    def _tensor(
        self, start: int, name: str, dims: tuple[int, ...], ttype: int, offset: int
    ) -> GGUFTensor:
        n = int(np.prod(dims))
        rows = tuple(reversed(dims))
        if ttype in _PLAIN:
            data = np.frombuffer(self._mm, _PLAIN[ttype], n, start + offset).reshape(rows)
        else:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            if dims[0] % block:
                raise ValueError(f"tensor {name}: {dims[0]} is not a multiple of {block}")
            row_bytes = dims[0] // block * size
            data = np.frombuffer(self._mm, np.uint8, n // block * size, start + offset)
            data = data.reshape(*rows[:-1], row_bytes)
        return GGUFTensor(name, dims, ttype, data)

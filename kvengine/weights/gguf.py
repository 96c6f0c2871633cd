"""GGUF files: metadata and tensors. The container is parsed here (memory-mapped, every read bounds-checked);
the `gguf` package (llama.cpp's) supplies the quantization constants and the dequantizers.

Our own parser exists for speed on large vocabularies (Gemma 3's 262k strings): the `gguf` package's reader
builds numpy views for every string, where a plain loop over the length-prefixed strings does far less work.
This module knows the container, not any architecture: name mapping and layout fixes (such as undoing
the Q/K row permutation of Llama) belong to the model file that owns those tensors.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvengine.errors import ModelLoadError

# Quantized and float formats we dequantize (the gguf package handles each of these).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                   "Q2_K", "Q3_K")
VERSIONS = (2, 3)  # v1 used 32-bit counts and lengths; nothing current writes it
DEFAULT_ALIGNMENT = 32

# GGUF value type id -> little-endian struct format (scalars) / numpy dtype (arrays of scalars).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALARS.items()}
_U32, _U64 = _STRUCTS[4], _STRUCTS[10]
# Tensor types stored as plain elements (the rest are blocks of bytes that gguf.quants dequantizes).
_ELEMENT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


class _Corrupt(Exception):
    """A structural problem inside the file; GGUFFile turns it into a one-line ModelLoadError."""


@dataclass(slots=True)
class GGUFTensor:
    """One tensor as stored: `shape` in PyTorch order (rows first), `raw` the on-disk blocks (memory-mapped)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    raw: np.ndarray

    def dequantize(self) -> torch.Tensor:
        """The tensor in float32, shape `self.shape`."""
        import gguf

        if self.qtype not in SUPPORTED_TYPES:
            raise ModelLoadError(f"tensor '{self.name}' has GGUF type {self.qtype}, which kvengine cannot read "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if self.qtype == "F32":
            array = np.array(self.raw, dtype=np.float32)  # copy: the memory map is read-only
        else:
            array = gguf.quants.dequantize(_merged_rows(self.raw), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(self.shape))


def _merged_rows(raw: np.ndarray, target_bytes: int = 1 << 15) -> np.ndarray:
    """The same bytes viewed as fewer, longer rows (2-D). gguf.quants dequantizes 16 rows per numpy call,
    which is slow for tensors of many short rows (an embedding of 262k rows); blocks never straddle rows
    and are independent, so merging consecutive rows changes nothing but the number of calls."""
    if raw.ndim < 2:
        return raw
    rows = int(np.prod(raw.shape[:-1], dtype=np.int64))
    merge = 1
    while rows % (merge * 2) == 0 and merge * 2 * raw.shape[-1] <= target_bytes:
        merge *= 2
    return raw.reshape(rows // merge, merge * raw.shape[-1])


@dataclass(slots=True)
class _TensorInfo:
    name: str
    qtype: str
    dims: tuple[int, ...]  # GGUF order: innermost (row length) first
    offset: int  # absolute, in the file
    n_bytes: int


class _Reader:
    """A bounds-checked little-endian cursor over the memory-mapped file."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def skip(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise _Corrupt(f"a value at byte {start} runs past the end of the file")
        self.pos = start + n
        return start

    def scalar(self, vtype: int) -> Any:
        s = _STRUCTS[vtype]
        return s.unpack_from(self.buf, self.skip(s.size))[0]

    def string(self) -> str:
        n = self.scalar(10)
        return str(self.buf[self.skip(n):self.pos], "utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALARS:
            raise _Corrupt(f"unknown value type {vtype} at byte {self.pos}")
        return self.scalar(vtype)

    def array(self) -> list[Any]:
        item_type, count = self.scalar(4), self.scalar(10)
        if item_type in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item_type])
            start = self.skip(count * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if count > (self.end - self.pos) // 8:  # every element takes at least 8 bytes
            raise _Corrupt(f"an array of {count} elements at byte {self.pos} cannot fit in the file")
        if item_type == _STRING:
            return self._strings(count)
        return [self.value(item_type) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings: the hot loop for vocabularies, kept free of method calls."""
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise _Corrupt("a string array runs past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise _Corrupt("a string array runs past the end of the file")
            out.append(str(buf[pos:pos + n], "utf-8"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file opened read-only. Raises ModelLoadError (one line) for a missing, truncated or corrupt file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file '{self.path}' does not exist")
        with self.path.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelLoadError(f"'{self.path}' is not a GGUF file (bad magic {magic!r})")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self._infos = self._parse(_Reader(memoryview(self._map)))
        except (_Corrupt, struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise ModelLoadError(f"'{self.path}' is truncated or corrupt: {e}") from None
        self._check_extent()

    def _parse(self, r: _Reader) -> tuple[dict[str, Any], list[_TensorInfo]]:
        """Header, key/value metadata, tensor infos; tensor offsets made absolute."""
        r.skip(4)
        version = r.scalar(4)
        if version & 0xFFFF == 0:
            raise ModelLoadError(f"'{self.path}' is a big-endian GGUF, which kvengine cannot read")
        if version not in VERSIONS:
            raise ModelLoadError(f"'{self.path}' is GGUF version {version}; kvengine reads versions 2 and 3")
        n_tensors, n_kv = r.scalar(10), r.scalar(10)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if key in meta:
                raise _Corrupt(f"metadata key '{key}' appears twice")
            meta[key] = r.value(r.scalar(4))
        infos = [self._tensor_info(r) for _ in range(n_tensors)]
        if len({t.name for t in infos}) != len(infos):
            raise _Corrupt("a tensor name appears twice")
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-r.pos // alignment) * alignment
        for t in infos:
            t.offset += data_start
        return meta, infos

    @staticmethod
    def _tensor_info(r: _Reader) -> _TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        name = r.string()
        n_dims = r.scalar(4)
        if n_dims > 8:
            raise _Corrupt(f"tensor '{name}' claims {n_dims} dimensions")
        dims = tuple(r.scalar(10) for _ in range(n_dims))
        type_id, offset = r.scalar(4), r.scalar(10)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _Corrupt(f"tensor '{name}' has unknown GGUF type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise _Corrupt(f"tensor '{name}' rows of {dims[0]} are not whole {qtype.name} blocks of {block}")
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        return _TensorInfo(name, qtype.name, dims, offset, n_bytes)

    def _check_extent(self) -> None:
        size = len(self._map)
        for t in self._infos:
            if t.offset + t.n_bytes > size:
                raise ModelLoadError(f"'{self.path}' is truncated: tensor '{t.name}' runs past the end of the file")

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def tensors(self) -> Iterator[GGUFTensor]:
        for t in self._infos:
            shape = tuple(reversed(t.dims))  # PyTorch order
            element = _ELEMENT_TYPES.get(t.qtype)
            if element is not None:
                raw = np.frombuffer(self._map, element, t.n_bytes // np.dtype(element).itemsize, t.offset)
                raw = raw.reshape(shape)
            else:  # rows of quantized blocks, as gguf.quants.dequantize expects: [..., bytes per row]
                row_bytes = t.n_bytes // max(1, int(np.prod(shape[:-1], dtype=np.int64)))
                raw = np.frombuffer(self._map, np.uint8, t.n_bytes, t.offset).reshape(*shape[:-1], row_bytes)
            yield GGUFTensor(name=t.name, qtype=t.qtype, shape=shape, raw=raw)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._infos]

    def tensor_bytes(self) -> dict[str, int]:
        """Each tensor's stored size in bytes."""
        return {t.name: t.n_bytes for t in self._infos}


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"

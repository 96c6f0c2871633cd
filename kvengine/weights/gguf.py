"""GGUF files: metadata and tensors, read through the `gguf` package (llama.cpp's reader/dequantizer).

This module knows the container, not any architecture: name mapping and layout fixes (such as undoing
the Q/K row permutation of Llama) belong to the model file that owns those tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvengine.errors import ModelLoadError

# Quantized and float formats we dequantize (the gguf package handles each of these).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                   "Q2_K", "Q3_K")


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
            array = gguf.quants.dequantize(self.raw, gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(self.shape))


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
        try:
            from gguf import GGUFReader

            self._reader = GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
            raise ModelLoadError(f"'{self.path}' is truncated or corrupt: {type(e).__name__}: {e}") from None
        self._check_extent()

    def _check_extent(self) -> None:
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelLoadError(f"'{self.path}' is truncated: tensor '{t.name}' runs past the end of the file")

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair decoded to Python values (strings, numbers, lists)."""
        out: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                out[key] = field.contents()
            except Exception as e:
                raise ModelLoadError(f"'{self.path}': metadata key '{key}' is corrupt ({e})") from None
        return out

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def tensors(self) -> Iterator[GGUFTensor]:
        for t in self._reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            yield GGUFTensor(name=t.name, qtype=t.tensor_type.name, shape=shape, raw=t.data)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"

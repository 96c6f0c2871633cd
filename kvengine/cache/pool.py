"""KVPool: the one preallocated KV tensor, sized once from a byte budget, and its per-layer views.

Layout: [num_layers, 2 (K, V), kv_heads, num_slots, head_dim] with num_slots = num_blocks x block_size.
Slot s belongs to block s // block_size. Keeping heads outermost makes a run of consecutive slots one
contiguous [kv_heads, n, head_dim] view per head, which is what attention reads.

Only this module allocates KV memory. Quantized KV dtypes provide their own LayerKV (same methods).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from kvengine.cache.spec import KVCacheSpec
from kvengine.errors import ConfigError

DEFAULT_BUDGET_CAP = 4 << 30  # bytes: the default pool never takes more than this unless asked
FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LayerKV:
    """One layer's K and V slots in the pool. k, v: [kv_heads, num_slots, head_dim] views."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
        self.k = k
        self.v = v
        self.block_size = block_size

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots [T], k/v [T, kv_heads, head_dim]."""
        self.k.index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v.index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def read(self, index: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one sequence's first `length` tokens: each [kv_heads, length, head_dim].

        `index` is what `sequence_index` returned: a start slot (the sequence's blocks are consecutive,
        the usual case for one request: a zero-copy view) or the slot of every position ([length] int64).
        """
        if isinstance(index, int):
            return self.k[:, index:index + length], self.v[:, index:index + length]
        # index_select, not advanced indexing: on this strided view the latter is ~1000x slower on CPU
        return self.k.index_select(1, index), self.v.index_select(1, index)

    def read_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather arbitrary slots for a padded batch: slots [B, L] -> k, v each [B, kv_heads, L, head_dim]."""
        shape = (self.k.shape[0], *slots.shape, self.k.shape[2])  # [Hkv, B, L, D]
        flat = slots.reshape(-1)
        k = self.k.index_select(1, flat).view(shape).transpose(0, 1)
        v = self.v.index_select(1, flat).view(shape).transpose(0, 1)
        return k, v


def sequence_index(block_table: list[int], length: int, block_size: int,
                   device: torch.device | str) -> int | torch.Tensor:
    """How to find a sequence's first `length` positions in the pool: its start slot when its blocks are
    consecutive, else the flat slot of every position ([length] int64). Computed once per step."""
    n = -(-length // block_size)
    first = block_table[0]
    if block_table[n - 1] == first + n - 1 and all(block_table[i] == first + i for i in range(1, n - 1)):
        return first * block_size
    blocks = torch.tensor(block_table[:n], dtype=torch.int64, device=device)  # [n]
    offsets = torch.arange(block_size, dtype=torch.int64, device=device)  # [block_size]
    return (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:length]


@dataclass(slots=True)
class KVPool:
    """The KV pool: `num_blocks` blocks of `spec.block_size` token slots for every layer."""

    spec: KVCacheSpec
    num_blocks: int
    kv: torch.Tensor  # [num_layers, 2, kv_heads, num_blocks * block_size, head_dim]
    layers: list[LayerKV]

    @staticmethod
    def allocate(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> KVPool:
        """The pool for `spec` (its dtype decides the storage), `num_blocks` blocks, on `device`."""
        if num_blocks < 1:
            raise ConfigError("the KV cache budget holds no block; raise kv_cache_memory")
        if spec.dtype not in FLOAT_STORAGE:
            raise ConfigError(f"KV cache dtype '{spec.dtype}' is not available in this build "
                              f"(available: {', '.join(FLOAT_STORAGE)})")
        slots = num_blocks * spec.block_size
        # torch.empty: pages are committed as they are written, so a large budget costs nothing until used.
        # Nothing reads a slot before it is written (padding in batched decode points at written slots).
        kv = torch.empty(spec.num_layers, 2, spec.num_kv_heads, slots, spec.head_dim, dtype=FLOAT_STORAGE[spec.dtype],
                         device=device)  # [layers, 2, kv_heads, slots, head_dim]
        layers = [LayerKV(kv[i, 0], kv[i, 1], spec.block_size) for i in range(spec.num_layers)]
        return KVPool(spec=spec, num_blocks=num_blocks, kv=kv, layers=layers)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, i: int) -> LayerKV:
        return self.layers[i]


def available_memory(device: torch.device | str) -> int:
    """Bytes free for the KV pool on `device` right now."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


def num_blocks_for_budget(spec: KVCacheSpec, budget: float | int | None, device: torch.device | str,
                          wanted_tokens: int) -> int:
    """Blocks that fit the KV budget: bytes (> 1), a fraction of free memory (<= 1), or None (default:
    room for `wanted_tokens`, capped at a quarter of free memory and DEFAULT_BUDGET_CAP)."""
    if budget is None:
        cap = min(available_memory(device) // 4, DEFAULT_BUDGET_CAP)
        nbytes = min(wanted_tokens * spec.bytes_per_token, cap)
    elif budget <= 1:
        nbytes = budget * available_memory(device)
    else:
        nbytes = float(budget)
    return int(nbytes // spec.bytes_per_block)

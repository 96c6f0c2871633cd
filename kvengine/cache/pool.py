"""KVPool: the one preallocated KV tensor, sized once from a byte budget, and its per-layer views.

Layout: [layers_per_group, 2 (K, V), kv_heads, num_slots, head_dim] with num_slots = num_blocks x block_size.
Slot s belongs to block s // block_size. Keeping heads outermost makes a run of consecutive slots one
contiguous [kv_heads, n, head_dim] view per head, which is what attention reads. With one KV group (the
usual case) layers_per_group is every layer; with several (cache/retention.py) a block is a page for one
group's layers, and the j-th layer of every group uses row j of the tensor at its own group's blocks.

Only this module allocates KV memory. Quantized KV dtypes (fp8, int8, int4) keep the same slot layout in codes
plus scales, behind LayerKV subclasses with the same methods: `write` quantizes, `read`/`read_slots` return
dequantized keys and values in the dtype that was written, so attention is the same for every KV dtype.
Their tensors hold exactly the bytes that KVCacheSpec counts (kvengine/cache/quant.py has the formats).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from kvengine.cache import quant
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

    def fresh_view(self) -> LayerKV:
        """Another LayerKV over the same tensors (for a layer of another group)."""
        return LayerKV(self.k, self.v, self.block_size)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots [T], k/v [T, kv_heads, head_dim]."""
        self.k.index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v.index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def read(self, index: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one sequence's first `length` tokens: each [kv_heads, length, head_dim].

        `index` is what `sequence_indexes` gave it: a start slot (the sequence's blocks are consecutive,
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


class QuantLayerKV(LayerKV):
    """A quantized layer: subclasses say how to store a step's K/V (`write`) and how to dequantize any slots
    (`_load`); reads of a start slot, a slot list or a padded batch all go through `_load`."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self._device = device
        self.out_dtype = torch.float32  # becomes the dtype of the keys written (the model's compute dtype)

    def _load(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [N] -> dequantized k, v float32 [kv_heads, N, head_dim]."""
        raise NotImplementedError

    def read(self, index: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, int):
            index = torch.arange(index, index + length, device=self._device)  # [length]
        k, v = self._load(index)
        return k.to(self.out_dtype), v.to(self.out_dtype)

    def read_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._load(slots.reshape(-1))  # [Hkv, B * L, D] each
        shape = (k.shape[0], *slots.shape, k.shape[-1])  # [Hkv, B, L, D]
        return (k.view(shape).transpose(0, 1).to(self.out_dtype),  # [B, Hkv, L, D]
                v.view(shape).transpose(0, 1).to(self.out_dtype))


class ScaledLayerKV(QuantLayerKV):
    """fp8 or int8 K and V: codes [2, kv_heads, num_slots, head_dim] (fp8 bits kept as uint8) and one float16
    scale per token and head, scales [2, kv_heads, num_slots]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> None:
        super().__init__(block_size, codes.device)
        self.codes, self.scales = codes, scales
        self.fp8 = codes.dtype == torch.uint8

    def fresh_view(self) -> ScaledLayerKV:
        return ScaledLayerKV(self.codes, self.scales, self.block_size)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.out_dtype = k.dtype
        kv = torch.stack((k, v)).transpose(1, 2)  # [2, Hkv, T, D]
        codes, scale = quant.quantize_fp8(kv) if self.fp8 else quant.quantize_int8(kv)
        self.codes.index_copy_(2, slots, codes.view(self.codes.dtype))
        self.scales.index_copy_(2, slots, scale)

    def _load(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codes.index_select(2, slots)  # [2, Hkv, N, D]
        kv = quant.dequantize_scaled(codes.view(torch.float8_e4m3fn) if self.fp8 else codes,
                                     self.scales.index_select(2, slots))
        return kv[0], kv[1]


class ChannelKeyLayerKV(QuantLayerKV):
    """int8 / int4 K and V in KIVI's layout: uint8 codes [2, kv_heads, num_slots, head_dim] (4 bits: two per byte,
    head_dim // 2); keys per channel over each block, key_stats [2 (scale, minimum), kv_heads, num_blocks,
    head_dim]; values per token in groups of channels, value_stats [2 (scale, minimum), kv_heads, num_slots, groups].

    A block's key range covers the tokens it holds so far. Each write re-quantizes the blocks it touches over
    their old and new tokens together, so a block filled by one prefill chunk is quantized once over all its
    tokens, and a block filled by decode keeps a range that grows with it (codes are re-mapped when it grows).
    This relies on the block manager's invariant: a sequence writes its positions in order, into blocks it
    holds alone, and a fresh block's first write starts at its first slot.
    """

    def __init__(self, codes: torch.Tensor, key_stats: torch.Tensor, value_stats: torch.Tensor, block_size: int,
                 bits: int) -> None:
        super().__init__(block_size, codes.device)
        self.codes, self.key_stats, self.value_stats, self.bits = codes, key_stats, value_stats, bits
        self.group = key_stats.shape[-1] // value_stats.shape[-1]  # value channels per group

    def fresh_view(self) -> ChannelKeyLayerKV:
        return ChannelKeyLayerKV(self.codes, self.key_stats, self.value_stats, self.block_size, self.bits)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.out_dtype = k.dtype
        codes, scale, lo = quant.quantize_groups(v.transpose(0, 1), self.group, self.bits)  # [Hkv, T, ...]
        self.codes[1].index_copy_(1, slots, codes)
        self.value_stats.index_copy_(2, slots, torch.stack((scale, lo)))
        self._write_keys(slots, k)

    def _write_keys(self, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Re-quantize every block that `slots` touch, over its earlier tokens and the new ones. k [T, Hkv, D]."""
        bs = self.block_size
        blocks, offsets = slots // bs, slots % bs  # [T] each
        touched, which = torch.unique(blocks, return_inverse=True)  # [U], [T]
        last = torch.zeros_like(touched).scatter_reduce_(0, which, offsets, "amax")  # [U] last offset written
        block_slots = (touched[:, None] * bs + torch.arange(bs, device=slots.device)).reshape(-1)  # [U * bs]
        n_heads, dim = k.shape[1], k.shape[2]
        keys = self._load_keys(block_slots).view(n_heads, len(touched), bs, dim)  # [Hkv, U, bs, D]
        keys[:, which, offsets] = k.transpose(0, 1).float()
        valid = torch.arange(bs, device=slots.device)[None, :] <= last[:, None]  # [U, bs]: written so far
        codes, scale, lo = quant.quantize_channels(keys, valid[None, :, :, None], self.bits)
        self.codes[0].index_copy_(1, block_slots, codes.flatten(1, 2))  # [Hkv, U * bs, code bytes]
        self.key_stats.index_copy_(2, touched, torch.stack((scale, lo)))  # [2, Hkv, U, D]

    def _load_keys(self, slots: torch.Tensor) -> torch.Tensor:
        stats = self.key_stats.index_select(2, slots // self.block_size)  # [2, Hkv, N, D]: each slot's block
        return quant.dequantize_uniform(self.codes[0].index_select(1, slots), stats[0], stats[1], self.bits)

    def _load(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.value_stats.index_select(2, slots)  # [2, Hkv, N, G]
        v = quant.dequantize_uniform(self.codes[1].index_select(1, slots), stats[0], stats[1], self.bits)
        return self._load_keys(slots), v  # [Hkv, N, D] each


def step_scratch(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> LayerKV:
    """K/V slots for one step's own tokens, outside the pool: a no-cache step that runs through an op writing and
    reading K/V slots (the fused layer op) uses them one layer at a time and drops them with the step, so the
    no-cache baseline still computes every token's keys and values at every step and keeps none."""
    kv = torch.empty(2, num_kv_heads, num_tokens, head_dim, dtype=dtype, device=device)  # [2, Hkv, T, D]
    return LayerKV(kv[0], kv[1], num_tokens)


def sequence_indexes(block_tables: list[list[int]], lengths: list[int], block_size: int,
                     device: torch.device | str, as_slots: bool = False) -> list[int | torch.Tensor]:
    """How to find each sequence's first `lengths[i]` positions in the pool: its start slot when its blocks are
    consecutive (unless `as_slots`), else the flat slot of every position ([length] int64, a row of one tensor
    built for all such sequences at once). Computed once per step."""
    out: list[int | torch.Tensor | None] = []
    for table, length in zip(block_tables, lengths, strict=True):
        n, first = -(-length // block_size), table[0]
        consecutive = table[n - 1] == first + n - 1 and all(table[i] == first + i for i in range(1, n - 1))
        out.append(first * block_size if consecutive and not as_slots else None)
    scattered = [i for i, index in enumerate(out) if index is None]
    if scattered:
        counts = [-(-lengths[i] // block_size) for i in scattered]
        width = max(counts)
        blocks = torch.tensor([block_tables[i][:n] + [block_tables[i][0]] * (width - n)
                               for i, n in zip(scattered, counts, strict=True)],
                              dtype=torch.int64, device=device)  # [S, width]
        offsets = torch.arange(block_size, dtype=torch.int64, device=device)  # [block_size]
        slots = (blocks[:, :, None] * block_size + offsets).reshape(len(scattered), -1)  # [S, width * block_size]
        for row, i in enumerate(scattered):
            out[i] = slots[row, :lengths[i]]
    return out  # type: ignore[return-value]  (every None was filled)


def slot_list(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The pool slots of positions start .. end - 1 of a sequence, as Python ints (`slots_of` for tensors)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slots_of(block_table: list[int], positions: torch.Tensor, block_size: int,
             device: torch.device | str) -> torch.Tensor:
    """The pool slot of each of `positions` ([L] int64, each in a block the table holds) -> [L] int64."""
    table = torch.tensor(block_table, dtype=torch.int64)  # [blocks]
    return (table[positions // block_size] * block_size + positions % block_size).to(device)


def plain_kv_dtype(spec: KVCacheSpec) -> torch.dtype | None:
    """The element dtype of a pool for `spec` when every layer's K/V are plain float tensors (`LayerKV.k` / `.v`, no
    codes or scales) in one group that keeps every token, known before the pool is allocated. None otherwise."""
    return FLOAT_STORAGE[spec.dtype] if spec.kv_dtype.is_float and spec.prefix_cacheable else None


@dataclass(slots=True)
class KVPool:
    """The KV pool: `num_blocks` blocks of `spec.block_size` token slots for every layer."""

    spec: KVCacheSpec
    num_blocks: int
    kv: torch.Tensor  # [layers_per_group, 2, kv_heads, num_slots, head_dim] values or codes (int4: D // 2 bytes)
    layers: list[LayerKV]  # one per model layer
    scales: tuple[torch.Tensor, ...] = ()  # quantized dtypes: their scale tensors (shapes in _allocate_quantized)
    group_of: tuple[int, ...] = ()  # per model layer: its KV group (index into spec.groups)

    @staticmethod
    def allocate(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> KVPool:
        """The pool for `spec` (its dtype decides the storage), `num_blocks` blocks, on `device`."""
        if num_blocks < 1:
            raise ConfigError("the KV cache budget holds no block; raise kv_cache_memory")
        if not spec.kv_dtype.is_float:
            pool = _allocate_quantized(spec, num_blocks, device)
        else:
            slots = num_blocks * spec.block_size
            # torch.empty: pages are committed as they are written, so a large budget costs nothing until used.
            # Nothing reads a slot before it is written (padding in batched decode points at written slots).
            kv = torch.empty(spec.layers_per_group, 2, spec.num_kv_heads, slots, spec.head_dim,
                             dtype=FLOAT_STORAGE[spec.dtype], device=device)  # [layers/group, 2, Hkv, slots, D]
            rows = [LayerKV(kv[j, 0], kv[j, 1], spec.block_size) for j in range(spec.layers_per_group)]
            pool = KVPool(spec=spec, num_blocks=num_blocks, kv=kv, layers=rows)
        pool._spread_over_layers()
        return pool

    def _spread_over_layers(self) -> None:
        """`layers` built per tensor row -> one LayerKV per model layer (its group's row; own object, as a
        quantized LayerKV keeps per-layer state)."""
        rows, group_of = self.layers, [0] * self.spec.num_layers
        layers = [rows[0]] * self.spec.num_layers  # every entry replaced below
        for g, group in enumerate(self.spec.groups):
            for j, layer in enumerate(group.layers):
                group_of[layer] = g
                layers[layer] = rows[j] if g == 0 else rows[j].fresh_view()
        self.layers = layers
        self.group_of = tuple(group_of)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, *self.scales))

    def layer(self, i: int) -> LayerKV:
        return self.layers[i]

    def plain_dtype(self) -> torch.dtype | None:
        """plain_kv_dtype of the pool's spec: what ops reading its tensors directly (the fused layer op) need."""
        return plain_kv_dtype(self.spec)

    # ---- whole blocks (the disk tier) ---------------------------------------------------------------
    # Every pool tensor keeps slots (or, for per-block key scales, blocks) on axis 3: a block's bytes are its
    # rows on that axis in each of (kv, *scales).

    def _rows(self, t: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        """Axis-3 indices of `block_ids` in tensor `t`: their slots, or the blocks themselves. [n * rows]"""
        blocks = torch.tensor(block_ids, dtype=torch.int64, device=t.device)  # [n]
        if t.shape[3] == self.num_blocks:
            return blocks
        bs = self.spec.block_size
        return (blocks[:, None] * bs + torch.arange(bs, device=t.device)[None, :]).reshape(-1)  # [n * bs]

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Copies of the blocks' contents, one tensor per pool tensor, the blocks in order on axis 3."""
        return [t.index_select(3, self._rows(t, block_ids)) for t in (self.kv, *self.scales)]

    def write_blocks(self, block_ids: list[int], parts: list[torch.Tensor]) -> None:
        """Put what `read_blocks` returned for as many blocks back, into `block_ids`."""
        for t, part in zip((self.kv, *self.scales), parts, strict=True):
            t.index_copy_(3, self._rows(t, block_ids), part.to(t.device))

    def block_part_shapes(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each tensor `read_blocks` returns for one block."""
        out = []
        for t in (self.kv, *self.scales):
            rows = 1 if t.shape[3] == self.num_blocks else self.spec.block_size
            out.append((t.dtype, (*t.shape[:3], rows, *t.shape[4:])))
        return out


def _allocate_quantized(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> KVPool:
    """Codes and scales for fp8 / int8 / int4, exactly the bytes KVCacheSpec counts."""
    n, h, d, bs = spec.layers_per_group, spec.num_kv_heads, spec.head_dim, spec.block_size
    slots, fmt = num_blocks * bs, spec.kv_dtype
    if fmt.block_channel_scale_bytes:  # int8, int4: keys per channel per block, values per token
        groups = d // fmt.group(d)
        codes = torch.empty(n, 2, h, slots, d * fmt.element_bits // 8, dtype=torch.uint8,
                            device=device)  # [layers/group, 2, Hkv, slots, D * bits / 8]
        key_stats = torch.empty(n, 2, h, num_blocks, d, dtype=quant.SCALE_DTYPE,
                                device=device)  # [layers/group, 2 (scale, min), Hkv, blocks, D]
        value_stats = torch.empty(n, 2, h, slots, groups, dtype=quant.SCALE_DTYPE,
                                  device=device)  # [layers/group, 2 (scale, min), Hkv, slots, groups]
        layers: list[LayerKV] = [ChannelKeyLayerKV(codes[i], key_stats[i], value_stats[i], bs, fmt.element_bits)
                                 for i in range(n)]
        return KVPool(spec, num_blocks, codes, layers, (key_stats, value_stats))
    code_dtype = torch.uint8 if spec.dtype == "fp8" else torch.int8  # fp8 bits are stored as uint8
    codes = torch.empty(n, 2, h, slots, d, dtype=code_dtype, device=device)  # [layers/group, 2, Hkv, slots, D]
    scales = torch.empty(n, 2, h, slots, dtype=quant.SCALE_DTYPE, device=device)  # [layers/group, 2, Hkv, slots]
    layers = [ScaledLayerKV(codes[i], scales[i], bs) for i in range(n)]
    return KVPool(spec, num_blocks, codes, layers, (scales,))


def available_memory(device: torch.device | str) -> int:
    """Bytes free for the KV pool on `device` right now."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


def num_blocks_for_budget(spec: KVCacheSpec, budget: float | int | None, device: torch.device | str,
                          wanted_blocks: int) -> int:
    """Blocks that fit the KV budget: bytes (> 1), a fraction of free memory (<= 1), or None (default:
    `wanted_blocks`, capped at a quarter of free memory and DEFAULT_BUDGET_CAP)."""
    if budget is None:
        cap = min(available_memory(device) // 4, DEFAULT_BUDGET_CAP)
        nbytes = min(wanted_blocks * spec.bytes_per_block, cap)
    elif budget <= 1:
        nbytes = budget * available_memory(device)
    else:
        nbytes = float(budget)
    return int(nbytes // spec.bytes_per_block)

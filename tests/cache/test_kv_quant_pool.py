"""The KV pool with quantized dtypes: exactly the bytes KVCacheSpec counts, and write/read through every
read path (start slot, slot list, padded batch) returning the stored keys and values within each format's error."""

from __future__ import annotations

import pytest
import torch

from kvengine.cache.pool import ChannelKeyLayerKV, KVPool, LayerKV, ScaledLayerKV, num_blocks_for_budget
from kvengine.cache.spec import KVCacheSpec

QUANTIZED = ["fp8", "int8", "int8-token", "int4"]
ALL = ["float32", "bfloat16", "float16", *QUANTIZED]
# max |error| / max |value| of one head's keys or values, per format (values with outlier channels)
REL_TOL = {"float32": 0.0, "bfloat16": 1 / 128, "float16": 1 / 1024, "fp8": 1 / 16, "int8-token": 1 / 200,
           "int8": 1 / 200, "int4": 1 / 12}


def kv_like(n: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [n, heads, dim]; keys with two outlier channels (one offset), like a real model's."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, heads, dim, generator=gen)
    k[..., 1] = 12 + 3 * k[..., 1]
    k[..., dim // 2] *= 8
    return k, torch.randn(n, heads, dim, generator=gen)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("geometry", [(2, 2, 16, 8), (3, 3, 64, 16), (1, 2, 80, 4)])
def test_pool_holds_exactly_the_spec_bytes(name, geometry):
    layers, heads, dim, bs = geometry
    spec = KVCacheSpec(layers, heads, dim, name, bs)
    pool = KVPool.allocate(spec, 7, "cpu")
    assert pool.nbytes == 7 * spec.bytes_per_block
    assert isinstance(pool.layer(0), LayerKV) and len(pool.layers) == layers


def test_layer_classes_and_budget():
    spec = KVCacheSpec(2, 2, 64, "int4", 16)
    assert isinstance(KVPool.allocate(spec, 2, "cpu").layer(1), ChannelKeyLayerKV)
    assert isinstance(KVPool.allocate(KVCacheSpec(2, 2, 64, "fp8", 16), 2, "cpu").layer(0), ScaledLayerKV)
    budget = 10 << 20
    blocks = {d: num_blocks_for_budget(KVCacheSpec(2, 2, 64, d, 16), budget, "cpu", 0) for d in ALL}
    assert blocks["bfloat16"] == budget // (16 * 2 * 2 * 2 * 64 * 2)
    for d in QUANTIZED:  # a smaller block fits more of them in the same bytes
        assert blocks[d] == int(budget // KVCacheSpec(2, 2, 64, d, 16).bytes_per_block) > blocks["bfloat16"]


@pytest.mark.parametrize("name", ALL)
def test_write_then_every_read_path(name):
    bs, heads, dim = 8, 3, 64
    pool = KVPool.allocate(KVCacheSpec(1, heads, dim, name, bs), 6, "cpu")
    layer = pool.layer(0)
    k, v = kv_like(20, heads, dim)
    table = [4, 1, 5]  # a sequence of 20 tokens in non-consecutive blocks
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(20)])
    layer.write(slots[:13], k[:13], v[:13])  # a prefill chunk that ends inside a block
    for p in range(13, 20):  # then decode, one token at a time
        layer.write(slots[p:p + 1], k[p:p + 1], v[p:p + 1])
    k_read, v_read = layer.read(slots, 20)  # [Hkv, 20, D]
    assert k_read.shape == v_read.shape == (heads, 20, dim)
    assert k_read.dtype == (torch.float32 if name in QUANTIZED else pool.kv.dtype)  # quantized: the dtype written
    assert rel_err(k_read, k.transpose(0, 1)) <= REL_TOL[name]
    assert rel_err(v_read, v.transpose(0, 1)) <= REL_TOL[name]
    # a padded batch of two sequences: the same slots, and the first 9 again (padding repeats slot 0)
    batch = torch.stack([slots, torch.cat([slots[:9], slots[:1].expand(11)])])  # [2, 20]
    kb, vb = layer.read_slots(batch)  # [2, Hkv, 20, D]
    assert torch.equal(kb[0], k_read) and torch.equal(vb[0], v_read)
    assert torch.equal(kb[1, :, :9], k_read[:, :9])


@pytest.mark.parametrize("name", ALL)
def test_start_slot_read_equals_slot_list_read(name):
    pool = KVPool.allocate(KVCacheSpec(1, 2, 32, name, 4), 8, "cpu")
    k, v = kv_like(10, 2, 32, seed=1)
    layer = pool.layer(0)
    layer.write(torch.arange(8, 18), k, v)  # blocks 2, 3, 4 (consecutive)
    by_start = layer.read(8, 10)
    by_slots = layer.read(torch.arange(8, 18), 10)
    assert all(torch.equal(a, b) for a, b in zip(by_start, by_slots, strict=True))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_block_keys_do_not_depend_on_chunking_at_block_boundaries(name):
    """A block written whole is quantized once over its tokens, whichever block-aligned chunks wrote it."""
    spec = KVCacheSpec(1, 2, 64, name, 8)
    k, v = kv_like(32, 2, 64, seed=2)
    reads = []
    for chunk in (32, 16, 8):
        layer = KVPool.allocate(spec, 4, "cpu").layer(0)
        for s in range(0, 32, chunk):
            layer.write(torch.arange(s, s + chunk), k[s:s + chunk], v[s:s + chunk])
        reads.append(layer.read(0, 32))
    assert all(torch.equal(r[0], reads[0][0]) and torch.equal(r[1], reads[0][1]) for r in reads)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_decode_filled_block_keeps_its_range_and_other_blocks(name):
    """Token-by-token writes grow the block's range; neighbouring blocks are untouched; the result stays within
    about two quantization steps of a one-shot quantization."""
    spec = KVCacheSpec(1, 2, 64, name, 8)
    k, v = kv_like(16, 2, 64, seed=3)
    layer = KVPool.allocate(spec, 3, "cpu").layer(0)
    layer.write(torch.arange(0, 8), k[:8], v[:8])  # block 0 whole
    before = layer.read(0, 8)
    for p in range(8, 16):
        layer.write(torch.tensor([p]), k[p:p + 1], v[p:p + 1])
        assert torch.equal(layer.read(0, 8)[0], before[0])  # block 0 never re-quantized
        k_now, _ = layer.read(torch.arange(8, p + 1), p - 7)
        assert rel_err(k_now, k[8:p + 1].transpose(0, 1)) <= 2 * REL_TOL[name]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_reused_block_forgets_its_previous_owner(name):
    """A freed block's next owner starts at its first slot: the old keys (here 1000x larger) must not widen the
    new range."""
    layer = KVPool.allocate(KVCacheSpec(1, 1, 32, name, 8), 2, "cpu").layer(0)
    k, v = kv_like(8, 1, 32, seed=4)
    layer.write(torch.arange(8, 16), 1000 * k, v)  # block 1, first owner, full
    layer.write(torch.arange(8, 11), k[:3], v[:3])  # block 1 again: a new sequence's first 3 tokens
    k_read, _ = layer.read(8, 3)
    assert rel_err(k_read, k[:3].transpose(0, 1)) <= REL_TOL[name]


@pytest.mark.parametrize("name", QUANTIZED)
def test_reads_come_back_in_the_written_dtype(name):
    layer = KVPool.allocate(KVCacheSpec(1, 2, 32, name, 4), 2, "cpu").layer(0)
    k, v = kv_like(5, 2, 32)
    layer.write(torch.arange(5), k.bfloat16(), v.bfloat16())
    k_read, v_read = layer.read(0, 5)
    assert k_read.dtype == v_read.dtype == torch.bfloat16
    assert layer.read_slots(torch.arange(5)[None])[0].dtype == torch.bfloat16

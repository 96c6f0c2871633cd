"""KV quantization formats (kvengine/cache/quant.py) and their byte math (KVCacheSpec): round-trip error bounds
per format, packing, and bytes per token that count every scale."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache import quant
from kvengine.cache.spec import KV_DTYPES, KVCacheSpec, kv_dtype
from kvengine.errors import ConfigError


def keys_with_outliers(*shape: int, seed: int = 0) -> torch.Tensor:
    """[..., D] values like a model's keys: most channels O(1), two channels O(30) with an offset."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., 3] = 30 + 5 * x[..., 3]
    x[..., 17] *= 20
    return x


def test_int8_token_error_is_at_most_half_a_step():
    x = keys_with_outliers(50, 3, 64)
    codes, scale = quant.quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (50, 3)
    err = (quant.dequantize_scaled(codes, scale) - x).abs()
    assert (err <= scale.float()[..., None] / 2 + 1e-6).all()
    assert (codes.abs().amax(-1) >= 126).all()  # each vector's largest element uses (almost) the full range


def test_fp8_error_is_relative():
    x = keys_with_outliers(50, 3, 64)
    codes, scale = quant.quantize_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn
    back = quant.dequantize_scaled(codes, scale)
    # e4m3 keeps 3 mantissa bits: half a unit in the last place is 1/16 of the value; subnormals below 2**-6
    bound = x.abs() / 16 + scale.float()[..., None] * 2.0**-10
    assert ((back - x).abs() <= bound + 1e-6).all()
    assert (back.abs().amax(-1) <= quant.FP8_MAX * scale.float() * (1 + 1e-3)).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [8, 32, 64])
def test_uniform_groups_error_is_at_most_half_a_step(bits, group):
    x = keys_with_outliers(40, 2, 64)
    codes, scale, lo = quant.quantize_groups(x, group, bits)
    assert codes.shape == (40, 2, 64 * bits // 8) and scale.shape == lo.shape == (40, 2, 64 // group)
    back = quant.dequantize_uniform(codes, scale, lo, bits)
    step = scale.float().repeat_interleave(group, -1)  # [..., D]: each channel's group step
    rounding = (lo.float().abs().repeat_interleave(group, -1) + 2**bits * step) * 2.0**-10  # float16 stats
    assert ((back - x).abs() <= step / 2 + rounding + 1e-6).all()


def test_per_channel_ranges_ignore_invalid_rows():
    x = keys_with_outliers(2, 16, 64)  # [Hkv, N, D]
    valid = (torch.arange(16) < 9)[None, :, None]  # rows 0..8 written
    codes, scale, lo = quant.quantize_channels(x, valid, 4)
    garbage = x.clone()
    garbage[:, 9:] = torch.nan  # unwritten rows may hold anything (torch.empty)
    codes2, scale2, lo2 = quant.quantize_channels(garbage, valid, 4)
    assert torch.equal(scale, scale2) and torch.equal(lo, lo2)
    assert torch.equal(quant.unpack_int4(codes)[:, :9], quant.unpack_int4(codes2)[:, :9])
    back = quant.dequantize_uniform(codes, scale[:, None, :].expand(2, 16, 64), lo[:, None, :].expand(2, 16, 64), 4)
    step = scale.float()[:, None, :]
    assert ((back - x)[:, :9].abs() <= step / 2 + (lo.float().abs()[:, None, :] + 16 * step) * 2.0**-10).all()
    assert torch.allclose(lo.float(), x[:, :9].amin(1), rtol=1e-3)  # the range is the valid rows' own


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    """Why int4 keys are per channel (KIVI): two outlier channels flatten every other channel of a per-token
    group, while a per-channel range follows each channel."""
    x = keys_with_outliers(16, 64)  # one block of 16 tokens
    codes, scale, lo = quant.quantize_channels(x, torch.ones(16, 1, dtype=torch.bool), 4)
    per_channel = quant.dequantize_uniform(codes, scale.expand(16, 64), lo.expand(16, 64), 4)
    per_token = quant.dequantize_uniform(*quant.quantize_groups(x, 32, 4), 4)
    assert (per_channel - x).pow(2).mean() < 0.25 * (per_token - x).pow(2).mean()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_int4_pack_round_trip(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (len(values) // 2,)
    assert torch.equal(quant.unpack_int4(packed), codes)


def test_zero_vectors_stay_finite():
    x = torch.zeros(4, 64)
    for back in (quant.dequantize_scaled(*quant.quantize_int8(x)), quant.dequantize_scaled(*quant.quantize_fp8(x)),
                 quant.dequantize_uniform(*quant.quantize_groups(x, 32, 4), 4)):
        assert torch.equal(back, x)


# -- bytes per token: KVCacheSpec counts every scale ------------------------------------------------------------
SMOLLM2 = dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)


@pytest.mark.parametrize("name, per_token_head", [
    ("float32", 2 * 64 * 4),
    ("bfloat16", 2 * 64 * 2),
    ("fp8", 2 * 64 + 2 * 2),  # codes + one float16 scale for K and one for V
    ("int8-token", 2 * 64 + 2 * 2),
    ("int8", 2 * 64 + 4 * 64 / 16 + 4),  # K: scale + min per channel per 16-token block; V: scale + min per token
    ("int4", 2 * 32 + 4 * 64 / 16 + 2 * 4),  # V: scale + min per group of 32 channels
])
def test_bytes_per_token_count_scales(name, per_token_head):
    spec = KVCacheSpec(dtype=name, **SMOLLM2)
    assert spec.bytes_per_token == 30 * 3 * per_token_head
    assert spec.bytes_per_block == 16 * spec.bytes_per_token


def test_compact_dtypes_against_bf16():
    bf16 = KVCacheSpec(dtype="bfloat16", **SMOLLM2).bytes_per_token
    ratio = {name: KVCacheSpec(dtype=name, **SMOLLM2).bytes_per_token / bf16 for name in ("fp8", "int8", "int4")}
    assert ratio == {"fp8": 132 / 256, "int8": 148 / 256, "int4": 88 / 256}
    # larger blocks amortize int8/int4's per-block key scales further
    assert KVCacheSpec(dtype="int4", **{**SMOLLM2, "block_size": 32}).bytes_per_token / bf16 == 80 / 256


def test_value_groups_divide_head_dim():
    assert KV_DTYPES["int4"].group(64) == 32
    assert KV_DTYPES["int4"].group(80) == 16  # 80 is not a multiple of 32
    assert KV_DTYPES["int4"].group(16) == 16
    assert KV_DTYPES["int8"].group(64) == 64  # one group: per token and head


def test_int4_needs_an_even_head_dim_and_names_are_checked():
    with pytest.raises(ConfigError, match="even head_dim"):
        KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=63, dtype="int4")
    with pytest.raises(ConfigError, match="unknown KV cache dtype 'int3'.*int4"):
        kv_dtype("int3")
    assert kv_dtype("e4m3").name == "fp8" and not kv_dtype("int8").is_float and kv_dtype("bf16").is_float

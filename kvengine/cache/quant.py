"""Quantize / dequantize K and V for the compact KV dtypes: pure tensor functions, no pool, no state.

Every function works on the last axis (a head's `head_dim` channels) and keeps the leading axes, so the pool
can quantize a step's [T, kv_heads, head_dim] keys and dequantize a gathered [kv_heads, L, head_dim] run alike.

- fp8: e4m3 with one scale per vector (amax / 448): the vector's largest element lands on e4m3's largest value;
- int8: symmetric, one scale per vector (amax / 127);
- uniform (int8 and int4 codes): asymmetric, 2**bits levels between a minimum and a maximum, either per vector in
  groups of channels, or per channel over a run of tokens (KIVI's layout for keys, whose outliers sit in a few
  channels: one range per channel keeps them from flattening the other channels). 4-bit codes are packed two
  per byte.

Scales and minima are stored as float16 (their bytes are what KVCacheSpec counts); arithmetic is float32.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
SCALE_MIN = 2.0**-24  # smallest positive float16: an all-zero vector gets a tiny, finite scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes, scale, minimum)


def _absmax_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """x [..., D] -> float16 scale [...] with x / scale inside [-qmax, qmax] (after float16 rounding)."""
    scale = (x.abs().amax(-1).float() / qmax).clamp(SCALE_MIN, torch.finfo(SCALE_DTYPE).max)
    return scale.to(SCALE_DTYPE)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes float8_e4m3fn [..., D], scale float16 [...])."""
    scale = _absmax_scale(x, FP8_MAX)
    codes = (x.float() / scale.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes int8 [..., D] in [-127, 127], scale float16 [...])."""
    scale = _absmax_scale(x, INT8_MAX)
    codes = (x.float() / scale.float()[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_scaled(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 or int8 codes [..., D] and scale [...] -> float32 [..., D]."""
    return codes.float() * scale.float()[..., None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., D] in 0..15 (D even) -> uint8 [..., D // 2]: channel 2i in the low nibble, 2i+1 high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D // 2] -> codes uint8 [..., D]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def uniform_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise minimum and maximum -> (scale, minimum), float16: codes 0 .. 2**bits - 1 span [lo, hi]."""
    scale = ((hi.float() - lo.float()) / (2**bits - 1)).clamp(SCALE_MIN, torch.finfo(SCALE_DTYPE).max)
    return scale.to(SCALE_DTYPE), lo.to(SCALE_DTYPE)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """x and its (broadcast) scale and minimum -> uint8 codes; 4-bit codes are packed (last axis halved)."""
    codes = ((x.float() - lo.float()) / scale.float()).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return pack_int4(codes) if bits == 4 else codes


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (4 bits: packed [..., D // 2]), scale and minimum [..., G] (G groups of D // G
    channels; G = D when each channel has its own) -> float32 [..., D]."""
    values = (unpack_int4(codes) if bits == 4 else codes).float().unflatten(-1, (scale.shape[-1], -1))
    return (values * scale.float()[..., None] + lo.float()[..., None]).flatten(-2)  # [..., G, D // G] -> [..., D]


def quantize_groups(x: torch.Tensor, group: int, bits: int) -> Quantized:
    """Per vector, in groups of `group` channels: x [..., D] -> (codes uint8 [..., D] (4 bits: [..., D // 2]),
    scale float16 [..., D // group], minimum float16 [..., D // group])."""
    g = x.float().unflatten(-1, (-1, group))  # [..., G, group]
    scale, lo = uniform_range(g.amin(-1), g.amax(-1), bits)  # [..., G] each
    return uniform_codes(g, scale[..., None], lo[..., None], bits).flatten(-2), scale, lo


def quantize_channels(x: torch.Tensor, valid: torch.Tensor, bits: int) -> Quantized:
    """Per channel over the rows of x that are valid: x [..., N, D], valid bool [..., N, 1] ->
    (codes uint8 [..., N, D] (4 bits: [..., N, D // 2]), scale float16 [..., D], minimum float16 [..., D]).

    Invalid rows do not move the range; they get codes too (clamped), which nobody reads."""
    x = torch.where(valid, x.float(), 0.0)  # [..., N, D]: stale or unwritten rows may hold anything
    lo = torch.where(valid, x, torch.inf).amin(-2)  # [..., D]
    hi = torch.where(valid, x, -torch.inf).amax(-2)  # [..., D]
    scale, lo = uniform_range(lo, hi, bits)
    return uniform_codes(x, scale[..., None, :], lo[..., None, :], bits), scale, lo

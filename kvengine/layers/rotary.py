"""Rotary position embedding (RoPE), in the rotate-half layout Hugging Face uses, with llama3/linear scaling.

cos/sin tables are precomputed once for every position up to the model's limit and indexed by the
step's positions, so a step with any mix of positions costs one gather.
"""

from __future__ import annotations

import math

import torch

from kvengine.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair inverse frequencies, float64 for accuracy. [head_dim // 2]"""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, blended, out)


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to q and k given each token's position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        inv = inv_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)  # [max_positions, D/2]
        # The rotate-half layout pairs channel i with i + D/2: duplicate the table across both halves.
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype), persistent=False)  # [P, D]
        self.register_buffer("sin", torch.cat([freqs.sin(), freqs.sin()], -1).to(dtype), persistent=False)  # [P, D]
        self.max_positions = max_positions

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated q, k (same shapes)."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)  # [T, 1, D]
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin

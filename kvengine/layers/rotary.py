"""Rotary position embedding (RoPE), in the rotate-half layout Hugging Face uses, with llama3/linear scaling.

cos/sin tables are precomputed once for every position up to the model's limit and indexed by the
step's positions, so a step with any mix of positions costs one gather. Positions past the table (a
bounded KV cache lets generation run past the model's context) are computed on the fly, in float64.
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
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)  # [P, D/2]
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)  # [P, D/2]
        self.register_buffer("inv_freq", inv, persistent=False)  # [D/2] float64
        self.max_positions = max_positions

    def table(self, positions: torch.Tensor, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions, each [T, 1, D]; computed once per step, shared by all layers.
        `end` (one past the largest position, when known) says whether the table covers them.
        The rotate-half layout pairs channel i with i + D/2, so both halves use the same angle."""
        if end is not None and end > self.max_positions:
            freqs = torch.outer(positions.to(torch.float64), self.inv_freq.double())  # [T, D/2]
            cos, sin = freqs.cos().to(self.cos.dtype), freqs.sin().to(self.sin.dtype)
        else:
            cos, sin = self.cos[positions], self.sin[positions]  # [T, D/2]
        return torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([sin, sin], -1).unsqueeze(1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated q, k (same shapes)."""
        cos, sin = self.table(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by per-token cos/sin [T, 1, D] in the rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)

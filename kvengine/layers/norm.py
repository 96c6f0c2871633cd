"""RMSNorm: x / rms(x) * weight, computed in float32 and cast back (as the reference implementations do).

`offset` = 1.0 gives Gemma's variant, which scales by (1 + weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)  # [dim]
        self.eps = eps
        self.offset = offset
        self.dim = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset:
            # one fused kernel; it normalizes in float32 for bf16/fp16 inputs as the reference does, and rounds
            # once at the end (the reference rounds before the weight multiply: a last-bit difference)
            return F.rms_norm(x, self.dim, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)

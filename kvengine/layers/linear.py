"""Linear layers: y = x W^T (+ b). Weight storage formats (float, int8, int4) swap in behind one module type.

The model builds `Linear` modules with float weights; quantization replaces their weights later, so the
model code never branches on the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear(torch.nn.Module):
    """A float linear layer, weight [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={bias}, dtype={self.weight.dtype}"

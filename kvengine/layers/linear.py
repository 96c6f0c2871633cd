"""Linear layers: y = x W^T (+ b), with the weight stored as float, int8 or int4.

The model builds float `Linear` modules; `quantize_linears` swaps them for `Int8Linear` / `Int4Linear`
(a module swap, so the model code never branches on the format). The quantized forms run PyTorch's
packed CPU kernels: `_weight_int8pack_mm` (per-output-channel scales) and `_weight_int4pack_mm_for_cpu`
(asymmetric groups of `group_size` along the input dimension, the layout of GGUF's Q4_1 blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvengine.errors import ConfigError

INT4_GROUP = 32  # weights per int4 scale/zero group; Q4_1 uses 32, so its blocks map one to one


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

    def dequantized(self) -> torch.Tensor:
        return self.weight.detach()

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={bias}, dtype={self.weight.dtype}"


class PackedLinear(torch.nn.Module):
    """Common part of the quantized forms: the packed kernel wins while a step has few rows (decode reads each
    weight once for few tokens); for many rows (prefill, large batches) it is compute-bound and slower than a
    dense matmul, so with `dense_above` set, batches of more rows use a dense copy of the same (dequantized)
    weight in the compute dtype instead."""

    dense: torch.Tensor | None
    bias: torch.Tensor | None

    def _init_dense(self, act_dtype: torch.dtype, dense_above: int | None) -> None:
        self.dense_above = dense_above
        dense = self.dequantized().to(act_dtype).contiguous() if dense_above is not None else None  # [N, K]
        self.register_buffer("dense", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]"""
        if self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x, self.dense, self.bias)
        y = self.packed_mm(x)
        return y if self.bias is None else y + self.bias

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(PackedLinear):
    """Symmetric int8 weight with one scale per output row: W[n] = q[n] * scale[n]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 dense_above: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q)  # [N, K] int8
        self.register_buffer("scales", scale.to(act_dtype))  # [N]
        self.register_buffer("bias", bias.to(act_dtype) if bias is not None else None)
        self._init_dense(act_dtype, dense_above)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear(PackedLinear):
    """Asymmetric int4 weight in groups along K: W[n, g*G + i] = (q - 8) * scale[g, n] + zero[g, n]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 group_size: int = INT4_GROUP, dense_above: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group_size = group_size
        q, scale_zero = quantize_int4(weight, group_size)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [N, K/2] uint8
        self.register_buffer("scale_zero", scale_zero.to(act_dtype))  # [K/G, N, 2]
        self.register_buffer("bias", bias.to(act_dtype) if bias is not None else None)
        self._init_dense(act_dtype, dense_above)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scale_zero)

    def dequantized(self) -> torch.Tensor:
        """The float weight the kernel multiplies by, recovered through the kernel itself. [N, K]"""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scale_zero).t()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scale [N] float32) with w ~= q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int32 in 0..15, scale_zero [K/G, N, 2] float32).

    Each group of G weights gets scale = (max - min) / 15 and q = round((w - min) / scale); the kernel
    computes (q - 8) * scale + zero, so zero = min + 8 * scale. A GGUF Q4_1 block (w = d*q + m with
    m its minimum and d*15 + m its maximum) comes back with the same q, d and m.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo = g.amin(dim=-1, keepdim=True)
    scale = ((g.amax(dim=-1, keepdim=True) - lo) / 15.0).clamp(min=1e-12)  # [N, K/G, 1]
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)  # [N, K]
    zero = lo + 8.0 * scale
    scale_zero = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return q, scale_zero


def int4_compatible(module: Linear, group_size: int = INT4_GROUP) -> bool:
    return module.out_features % 16 == 0 and module.in_features % group_size == 0


def quantize_linears(model: torch.nn.Module, fmt: str, act_dtype: torch.dtype,
                     dense_above: int | None = None) -> dict[str, str]:
    """Replace every float Linear in `model` by its `fmt` ("int8" or "int4") form, in place.

    int4 layers whose shape the kernel cannot take (out % 16, in % group) and the LM head use int8.
    Returns {module name: format chosen} so the run summary can say what ran.
    """
    if fmt not in ("int8", "int4"):
        raise ConfigError(f"unknown quantized weights format '{fmt}' (int8 or int4)")
    chosen: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        use = "int4" if fmt == "int4" and int4_compatible(module) and not name.endswith("lm_head") else "int8"
        weight, bias = module.weight.detach(), module.bias.detach() if module.bias is not None else None
        new = (Int4Linear(weight, bias, act_dtype, dense_above=dense_above) if use == "int4"
               else Int8Linear(weight, bias, act_dtype, dense_above))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        chosen[name] = use
    return chosen

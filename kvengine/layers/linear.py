"""Linear layers: y = x W^T (+ b), with the weight stored as float, int8 or int4.

The model builds float `Linear` modules; `quantize_linears` swaps them for `Int8Linear` / `Int4Linear`
(a module swap, so the model code never branches on the format). Int8 keeps one scale per output row; int4
keeps asymmetric groups of `group_size` along the input dimension (the layout of GGUF's Q4_1 blocks). With the
activation dtype of the kernel tier chosen for this CPU (layers/native.py: fp32, bf16 for the avx512 tier
forced with KVENGINE_ISA=avx512) they run kvengine's own kernels: on int8-quantized activations for shapes that
fit their 16-row tiles (the rule for every layer of the supported models); the avx512 tier also on bf16
activations otherwise (faster than PyTorch's at decode: docs/benchmarks.md, "Kernel measurements"). Elsewhere
PyTorch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), with a dense copy for large
steps. Each module stores its weight in the layouts of the kernels it runs, and the tier it runs them on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvengine.errors import ConfigError
from kvengine.layers import native

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

    def row_read_bytes(self) -> int:
        """Weight bytes one decode row reads (each stored weight once)."""
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={bias}, dtype={self.weight.dtype}"


class PackedLinear(torch.nn.Module):
    """Common part of the quantized forms. Where the layer runs kvengine's kernels and its shape fits their
    tiles, every step multiplies a tiled copy of the codes by int8-quantized activations (`gemm`,
    csrc/vnni_mm.cpp): ~1.6x a dense bf16 matmul at 32 rows, ~1.2x the bf16 row kernel at batch-1 decode, and
    each row's result is the same whatever else is in the batch. Otherwise the packed kernel (`packed_mm`:
    kvengine's row kernel on bf16 activations, or PyTorch's), with, where `dense_above` is set, a dense copy of
    the dequantized weight in the compute dtype for steps of more rows (where those kernels are slower)."""

    dense: torch.Tensor | None
    bias: torch.Tensor | None
    wtiles: torch.Tensor | None
    tier: str | None = None  # the kernel tier (layers/native.py) whose ops it runs; None: PyTorch's

    @property
    def native(self) -> bool:
        return self.tier is not None

    def _init_batched(self, act_dtype: torch.dtype, dense_above: int | None,
                      tiles: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """`tiles`: (codes, scales) in the gemm kernel's layout, or None where it does not apply; then a dense
        copy for steps of more than `dense_above` rows (None: no copy)."""
        self.dense_above = dense_above
        self.register_buffer("wtiles", tiles[0] if tiles else None)
        self.register_buffer("stiles", tiles[1] if tiles else None)
        dense = (self.dequantized().to(act_dtype).contiguous()  # [N, K]
                 if dense_above is not None and tiles is None else None)
        self.register_buffer("dense", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]"""
        if self.wtiles is not None:
            y = self.gemm(x)
        elif self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x, self.dense, self.bias)
        else:
            y = self.packed_mm(x)
        return y if self.bias is None else y + self.bias

    def row_read_bytes(self) -> int:
        """Weight bytes one decode row reads: the codes and scales its kernel runs on, not the dense copy that
        only steps of many rows use."""
        return sum(b.nbytes for name, b in self.named_buffers(recurse=False) if b is not None and name != "dense")

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tile_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tiled codes, scales) as the gemm kernel takes them, for ops that call it from C++; None where the
        layer has no tiles or has a bias."""
        return (self.wtiles, self.stiles) if self.wtiles is not None and self.bias is None else None

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(PackedLinear):
    """Symmetric int8 weight with one scale per output row: W[n] = q[n] * scale[n].

    Layouts: kvengine's tiles (`wtiles` [N/16, K/4, 64] uint8, q + 128, native.tile_int8; `stiles` the [N]
    fp32 scales) where they fit and `act_int8`; else kvengine's row kernel (`qweight` [N, K] int8, `scales` [N]
    fp32); else PyTorch's (`qweight`, `scales` in the activation dtype)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 dense_above: int | None = None, act_int8: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, scale = quantize_int8(weight)
        self.tier, tiled = kernel_tier(self, act_dtype, act_int8, self.in_features % 16 == 0)
        tiles = (native.tile_int8(q), scale) if tiled else None
        self.register_buffer("qweight", q if tiles is None else None)  # [N, K] int8
        self.register_buffer("scales", None if tiles else scale if self.native else scale.to(act_dtype))  # [N]
        self.register_buffer("bias", bias.to(act_dtype) if bias is not None else None)
        self._init_batched(act_dtype, dense_above, tiles)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.tier is not None:
            return native.ops(self.tier).q8_mm(x, self.qweight, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        assert self.tier is not None
        return native.ops(self.tier).q8_gemm(x, self.wtiles, self.stiles)

    def dequantized(self) -> torch.Tensor:
        if self.wtiles is not None:
            return native.untile_int8(self.wtiles).float() * self.stiles[:, None]
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear(PackedLinear):
    """Int4 weight in groups along K: W[n, g*G + i] = q * scale[n, g] + lo[n, g], q in 0..15 (`int4_codes`:
    symmetric, lo = -8 scale, where the weight lies on GGUF Q4_0's grid; else asymmetric).

    Layouts: kvengine's tiles (`wtiles` [N/16, K/32, 4, 64] uint8, native.tile_int4; `stiles` [N/16, K/32, 2, 16]
    fp16 scale and lo, or for symmetric weights on the tiers that take them [N/16, K/32, 16], the scales alone:
    18 bytes per 32 weights instead of 20) where they fit and `act_int8`; else kvengine's row kernel (`qweight`
    [N, K/2] uint8, native.pack_int4; `dm` [N, 2, K/G] float16); else PyTorch's (its packed `qweight`,
    `scale_zero` [K/G, N, 2] in the activation dtype, for its form (q - 8) * scale + zero, zero = lo + 8 * scale).
    kvengine's layouts hold scale and lo at float16 precision: GGUF Q4_1's d and m, and Q4_0's d, exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 group_size: int = INT4_GROUP, dense_above: int | None = None, act_int8: bool = True,
                 codes: Int4Codes | None = None) -> None:
        """`codes`: int4_codes(weight, group_size) where the caller has them already."""
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group_size = group_size
        c = codes or int4_codes(weight, group_size)
        assert c is not None
        q, scale, lo = c.q, c.scale, c.lo
        self.symmetric = c.symmetric
        self.tier, tiled = kernel_tier(self, act_dtype, act_int8, group_size == 32 and self.in_features % 64 == 0
                                       and self.in_features <= 16384)
        dm = torch.stack([scale, lo], dim=1).half()  # [N, 2, K/G]
        tiles = None
        if tiled:
            scales_only = c.symmetric and native.tier(self.tier).symmetric_int4
            tiles = (native.tile_int4(q), native.tile_int4_scales(scale if scales_only else dm))
            self.register_buffer("qweight", None)  # the tiles are the only copy of the codes
            self.register_buffer("dm", None)
        elif self.native:
            self.register_buffer("qweight", native.pack_int4(q))  # [N, K/2] uint8
            self.register_buffer("dm", dm)
        else:
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [N, K/2]
            zero = lo + 8.0 * scale
            self.register_buffer("scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                                 .contiguous().to(act_dtype))  # [K/G, N, 2]
        self.register_buffer("bias", bias.to(act_dtype) if bias is not None else None)
        self._init_batched(act_dtype, dense_above, tiles)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.tier is not None:
            return native.ops(self.tier).q4_mm(x, self.qweight, self.dm)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scale_zero)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        assert self.tier is not None
        return native.ops(self.tier).q4_gemm(x, self.wtiles, self.stiles)

    def dequantized(self) -> torch.Tensor:
        """The float weight the kernel multiplies by. [N, K]"""
        if self.native:
            tiled = self.wtiles is not None
            dm = native.untile_int4_scales(self.stiles) if tiled else self.dm.float()  # [N, 2, K/G]
            d, m = dm.repeat_interleave(self.group_size, dim=2).unbind(1)  # [N, K] each
            q = native.untile_int4(self.wtiles) if tiled else native.unpack_int4(self.qweight)  # [N, K]
            return q.float() * d + m
        # recovered through PyTorch's kernel itself (its packed layout is its own)
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scale_zero).t()


def tiles_fit(layer: PackedLinear) -> bool:
    """Whether the gemm kernels take the layer's shape (16 outputs per tile, activations in groups of 32)."""
    return layer.out_features % 16 == 0 and layer.in_features % 32 == 0


def kernel_tier(layer: PackedLinear, act_dtype: torch.dtype, act_int8: bool,
                shape_ok: bool) -> tuple[str | None, bool]:
    """(the kernel tier a quantized layer runs, whether on the tile kernels): the tier chosen for this CPU
    (native.tier_for) where it takes `act_dtype` activations and `shape_ok` (the format's kernels take the
    shape), on its tiles where they fit (and `act_int8`), else on its row kernels (avx512 only); else
    (None, False): PyTorch's."""
    t = native.tier_for(act_dtype)
    if t is None or not shape_ok:
        return None, False
    if act_int8 and tiles_fit(layer):
        return t.name, True
    return (t.name if t.row_kernels else None), False


def describe_kernels(model: torch.nn.Module, act_dtype: torch.dtype) -> str:
    """Which kernels the quantized layers of `model` run, and why not kvengine's where they do not."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    n_native = sum(m.native for m in layers)
    tier = next((m.tier for m in layers if m.tier is not None), None)
    if layers and n_native == len(layers):
        untiled = sum(m.wtiles is None for m in layers)
        rest = f"; bf16 activations for {untiled} layers whose shape the tiles do not fit" if untiled else ""
        return f"kvengine {tier} kernels (int8 activations in groups of 32{rest})"
    chosen = native.chosen()
    why = native.reason() or (f"they need {str(chosen.act_dtype).removeprefix('torch.')} activations"
                              if chosen is not None and act_dtype != chosen.act_dtype else "shapes they do not take")
    if n_native:
        return f"kvengine {tier} kernels for {n_native} of {len(layers)} layers, PyTorch's for the rest ({why})"
    return f"PyTorch packed kernels (not kvengine's: {why})"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scale [N] float32) with w ~= q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int32 in 0..15, scale [N, K/G], lo [N, K/G] float32), w ~= q * scale + lo.

    Each group of G weights gets scale = (max - min) / 15, lo = min and q = round((w - min) / scale). A GGUF
    Q4_1 block (w = d*q + m with m its minimum and d*15 + m its maximum) comes back with the same q, d and m.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo = g.amin(dim=-1, keepdim=True)
    scale = ((g.amax(dim=-1, keepdim=True) - lo) / 15.0).clamp(min=1e-12)  # [N, K/G, 1]
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)  # [N, K]
    return q, scale[..., 0], lo[..., 0]


def quantize_int4_symmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w [N, K] float -> (q [N, K] int32 in 0..15, scale [N, K/G] float32) with w = (q - 8) * scale exactly and
    every scale a float16 value; None where w is off that grid.

    That is GGUF Q4_0's grid: a block's scale d is its value of largest magnitude over -8, stored as float16, so
    that value dequantizes to -8 d (q = 0) and a Q4_0 source comes back with its own codes and scales. Weights from
    any other source take quantize_int4's asymmetric groups (a block's minimum and maximum both on the grid).
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    mid = native.INT4_MIDPOINT
    scale = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)) / -mid  # [N, K/G, 1]
    if not torch.equal(scale.half().float(), scale):
        return None
    q = torch.round(g / torch.where(scale == 0, 1.0, scale)) + mid  # [N, K/G, G]
    if q.min() < 0 or q.max() > 15 or not torch.equal((q - mid) * scale, g):
        return None
    return q.to(torch.int32).reshape(n, k), scale[..., 0]


@dataclass(frozen=True, slots=True)
class Int4Codes:
    """A weight [N, K] in int4 groups of G: w ~= q * scale + lo (q [N, K] int32 in 0..15; scale, lo [N, K/G]
    float32). `symmetric`: w lies exactly on Q4_0's grid and lo = -8 scale."""

    q: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor
    symmetric: bool


def int4_codes(w: torch.Tensor, group_size: int, symmetric_only: bool = False) -> Int4Codes | None:
    """The symmetric codes where w lies on Q4_0's grid (quantize_int4_symmetric), else the asymmetric ones (None
    with `symmetric_only`)."""
    grid = quantize_int4_symmetric(w, group_size)
    if grid is not None:
        return Int4Codes(grid[0], grid[1], native.symmetric_lo(grid[1]), True)
    return None if symmetric_only else Int4Codes(*quantize_int4(w, group_size), False)


def int4_compatible(module: Linear, group_size: int = INT4_GROUP) -> bool:
    return module.out_features % 16 == 0 and module.in_features % group_size == 0


def quantize_linears(model: torch.nn.Module, fmt: str, act_dtype: torch.dtype,
                     dense_above: int | None = None) -> dict[str, str]:
    """Replace every float Linear in `model` by its `fmt` ("int8" or "int4") form, in place.

    int4 layers whose shape the kernel cannot take (out % 16, in % group) use int8, and so does the LM head unless
    its weight lies on Q4_0's grid (a Q4_0 source's head: int4 holds it exactly; requantized to int4, SmolLM2's
    8-bit head raised perplexity 4.5%). Returns {module name: format chosen} so the run summary can say what ran
    ("int4 Q4_0-grid" for the symmetric int4 layers).
    """
    if fmt not in ("int8", "int4"):
        raise ConfigError(f"unknown quantized weights format '{fmt}' (int8 or int4)")
    chosen: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        weight, bias = module.weight.detach(), module.bias.detach() if module.bias is not None else None
        codes = (int4_codes(weight, INT4_GROUP, symmetric_only=name.endswith("lm_head"))
                 if fmt == "int4" and int4_compatible(module) else None)
        if codes is not None:
            new: PackedLinear = Int4Linear(weight, bias, act_dtype, dense_above=dense_above, codes=codes)
            use = "int4 Q4_0-grid" if codes.symmetric else "int4"
        else:
            new, use = Int8Linear(weight, bias, act_dtype, dense_above), "int8"
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        chosen[name] = use
    return chosen

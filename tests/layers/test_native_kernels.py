"""kvengine's own kernels: the packed and tiled layouts round-trip; q4_mm / q8_mm / bf16_mm (layers/csrc/packed_mm.cpp,
bf16 activations) equal a float matmul by the weight they store, for every number of rows (1..8 run together,
more in chunks of 8) and for output sizes that are not a multiple of the kernels' 4-row tiles; q4_gemm /
q8_gemm (vnni_mm.cpp, int8 activations) equal a float matmul of the activations as they quantize them, and
stay within a stated distance of the exact product, row by row whatever the batch; a layer whose shape fits the
tiles runs the gemm for any number of rows.

On a CPU with the instructions the kernels must build and load (a failed build fails here, rather than
silently leaving the PyTorch fallback in place); elsewhere these tests are skipped."""

from __future__ import annotations

import pytest
import torch

from kvengine.layers import native
from kvengine.layers.linear import Int4Linear, Int8Linear, quantize_int4

needs_cpu = pytest.mark.skipif(bool(native.missing_cpu_flags()),
                               reason="CPU without AVX-512 BF16/VNNI: the native kernels do not apply")


def test_pack_int4_round_trip():
    q = torch.randint(0, 16, (12, 192), generator=torch.Generator().manual_seed(0))
    packed = native.pack_int4(q)
    assert packed.shape == (12, 96) and packed.dtype == torch.uint8
    assert torch.equal(native.unpack_int4(packed), q)


def test_tile_layouts():
    q = torch.randint(0, 16, (32, 96), generator=torch.Generator().manual_seed(0))
    tiles = native.tile_int4(q)
    assert tiles.shape == (2, 3, 4, 64) and tiles.dtype == torch.uint8
    assert torch.equal(native.untile_int4(tiles), q)
    # byte 4l + b of chunk j: row l, inputs 8j + b (low nibble) and 8j + 4 + b (high nibble)
    assert tiles[1, 2, 3, 4 * 5 + 2].item() == q[16 + 5, 64 + 24 + 2] | (q[16 + 5, 64 + 28 + 2] << 4)
    q8 = torch.randint(-127, 128, (16, 8), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    t8 = native.tile_int8(q8)
    assert t8.shape == (1, 2, 64)
    assert t8[0, 1, 4 * 3 + 1].item() == q8[3, 4 + 1].item() + 128
    assert torch.equal(native.untile_int8(t8), q8)
    dm = torch.randn(32, 2, 3).half()  # scale, lo of 32 rows x 3 groups
    sc = native.tile_int4_scales(dm)
    assert sc.shape == (2, 3, 2, 16) and sc[1, 2, 1, 5].item() == dm[16 + 5, 1, 2].item()
    assert torch.equal(native.untile_int4_scales(sc), dm.float())


@needs_cpu
def test_native_kernels_build_and_load():
    assert native.available(), native.reason()


# bf16 activations times exact weights, accumulated in fp32 (the reference in float64): the difference is
# the rounding of the bf16 output, at most 2^-8 of the largest output.
REL_TOL = 2 ** -8


@needs_cpu
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("shape", [(100, 64), (96, 576), (64, 1536)])
def test_q4_mm_equals_matmul_by_its_weight(rows, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(rows)
    layer = Int4Linear(torch.randn(n, k, generator=gen) * 0.05, None, torch.bfloat16, act_int8=False)
    assert layer.native and layer.wtiles is None
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()  # [rows, n]
    got = layer.packed_mm(x)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@needs_cpu
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_q8_mm_equals_matmul_by_its_weight(rows):
    gen = torch.Generator().manual_seed(rows)
    layer = Int8Linear(torch.randn(250, 576, generator=gen), None, torch.bfloat16)  # 250 rows: no tiles
    assert layer.native and layer.wtiles is None
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()
    got = layer.packed_mm(x)
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@needs_cpu
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_bf16_mm_equals_matmul(rows):
    """Unquantized bf16 weights (decode_layer's few-row product): exact products, fp32 sums, one rounding."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 576, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ w.double().t()  # [rows, 100]
    got = torch.ops.kvengine.bf16_mm(x, w)
    assert got.shape == (rows, 100) and got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()
    with pytest.raises(RuntimeError, match="bf16_mm: w must be \\[N, K\\] bfloat16 with K a multiple of 32"):
        torch.ops.kvengine.bf16_mm(x[:, :48], w[:, :48])


def int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the gemm kernels quantize it, back in float: per group of 32, codes round(x * 127 / max|x|)
    times max|x| / 127 (fp32 arithmetic, ties to even, as the kernel rounds)."""
    g = x.float().reshape(x.shape[0], -1, 32)  # [M, K/32, 32]
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # (127 / t is 127 * (1 / t) in torch)
    return (torch.round(g * inv) * (amax / 127.0)).reshape(x.shape)


# The int8 codes' rounding, against the exact product: measured ~0.55% rms of the output on random rows
# (1/254 of each group's largest value per input); bound at 1%.
QUANT_RMS_TOL = 0.01


@needs_cpu
@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 70])
def test_gemm_equals_matmul_of_its_quantized_activations(cls, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = cls(torch.randn(96, 576, generator=gen) * 0.05, None, torch.bfloat16)
    assert layer.native and layer.wtiles is not None and layer.dense is None
    assert layer.qweight is None  # the tiles are the only copy of the codes
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    x[0, :32] = 0  # an all-zero group quantizes to zeros, not NaN
    w = layer.dequantized().double()
    got = layer(x)  # tiles fit: the gemm kernel, for any number of rows
    assert torch.equal(got, layer.gemm(x)) and got.shape == (rows, 96) and got.dtype == torch.bfloat16
    ref = int8_groups(x).double() @ w.t()  # [rows, 96]
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()
    exact = x.double() @ w.t()
    assert ((got.double() - exact).norm() / exact.norm()).item() <= QUANT_RMS_TOL
    # each row's result is the same whatever rows it is multiplied with (batch invariance)
    assert all(torch.equal(got[i:i + 1], layer(x[i:i + 1])) for i in range(rows))


@needs_cpu
def test_native_int4_keeps_q4_1_scales_exactly():
    """Both native layouts store each group's scale and minimum at float16 precision, GGUF Q4_1's own, so a
    weight already on a Q4_1 grid (fp16 d and m) comes back exactly."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 128), generator=gen)
    q[:, ::32] = 0  # every group has its minimum and maximum on the grid, as Q4_1's quantizer makes them
    q[:, 1::32] = 15
    d = (torch.rand(32, 4, generator=gen) * 0.01 + 0.001).half().float()
    m = (-torch.rand(32, 4, generator=gen) * 0.1).half().float()
    w = (q.view(32, 4, 32) * d[..., None] + m[..., None]).view(32, 128)
    for act_int8 in (True, False):  # the tiled layout and the row one
        layer = Int4Linear(w, None, torch.bfloat16, act_int8=act_int8)
        assert layer.native and (layer.wtiles is not None) == act_int8 and torch.equal(layer.dequantized(), w)
    q2, scale, lo = quantize_int4(w, 32)
    assert torch.equal(q2, q.int())


def test_bad_inputs_get_clear_errors():
    if native.missing_cpu_flags() or not native.available():
        pytest.skip("native kernels not loaded")
    with pytest.raises(RuntimeError, match="q4_mm: x must be \\[M, K\\] bfloat16"):
        torch.ops.kvengine.q4_mm(torch.zeros(1, 64), torch.zeros(4, 32, dtype=torch.uint8),
                                 torch.zeros(4, 2, 2, dtype=torch.half))
    with pytest.raises(RuntimeError, match="q4_mm: K must be a multiple of 64"):
        torch.ops.kvengine.q4_mm(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.uint8),
                                 torch.zeros(4, 2, 1, dtype=torch.half))
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q4_gemm: x must be \\[M, K\\] bfloat16 with K a multiple of 32"):
        torch.ops.kvengine.q4_gemm(x[:, :48], torch.zeros(1, 2, 4, 64, dtype=torch.uint8), torch.zeros(64))
    with pytest.raises(RuntimeError, match="q4_gemm: w must be \\[N/16, K/32, 4, 64\\] uint8"):
        torch.ops.kvengine.q4_gemm(x, torch.zeros(1, 3, 4, 64, dtype=torch.uint8), torch.zeros(96))
    with pytest.raises(RuntimeError, match="q4_gemm: dm must be \\[N/16, K/32, 2, 16\\] float32"):
        torch.ops.kvengine.q4_gemm(x, torch.zeros(1, 2, 4, 64, dtype=torch.uint8), torch.zeros(64).half())
    with pytest.raises(RuntimeError, match="q8_gemm: scale must be \\[N\\] float32"):
        torch.ops.kvengine.q8_gemm(x, torch.zeros(1, 16, 64, dtype=torch.uint8), torch.zeros(15))


def test_run_summary_names_the_kernels():
    """The weights line says which kernels ran: PyTorch's for fp32 activations (and why), kvengine's for bf16
    where the CPU has the instructions."""
    from kvtest import tiny_pair

    from kvengine.layers.linear import describe_kernels, quantize_linears

    for dtype in (torch.float32, torch.bfloat16):
        model, _ = tiny_pair("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2)
        quantize_linears(model.to(dtype), "int4", dtype)
        text = describe_kernels(model, dtype)
        if dtype == torch.float32:
            assert text == "PyTorch packed kernels (not kvengine's: they need bfloat16 activations)"
        elif not native.available():  # e.g. an AVX2-only CPU: the line names the instructions it lacks
            assert native.reason()
            assert text == f"PyTorch packed kernels (not kvengine's: {native.reason()})"
        else:
            assert text == "kvengine AVX-512 kernels (int8 activations in groups of 32)"

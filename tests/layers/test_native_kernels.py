"""kvengine's own decode kernels (layers/csrc/packed_mm.cpp): the packed layout round-trips, and q4_mm / q8_mm
equal a float matmul by the weight they store, for every number of rows (1..8 run together, more in chunks of 8)
and for output sizes that are not a multiple of the kernels' 4-row tiles.

On a CPU with the instructions the kernels must build and load (a failed build fails here, rather than
silently leaving the PyTorch fallback in place); elsewhere these tests are skipped."""

from __future__ import annotations

import pytest
import torch

from kvengine.layers import native
from kvengine.layers.linear import Int4Linear, Int8Linear, quantize_int4

needs_cpu = pytest.mark.skipif(bool(native.missing_cpu_flags()),
                               reason="CPU without AVX-512 BF16: the native kernels do not apply")


def test_pack_int4_round_trip():
    q = torch.randint(0, 16, (12, 192), generator=torch.Generator().manual_seed(0))
    packed = native.pack_int4(q)
    assert packed.shape == (12, 96) and packed.dtype == torch.uint8
    assert torch.equal(native.unpack_int4(packed), q)


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
    layer = Int4Linear(torch.randn(n, k, generator=gen) * 0.05, None, torch.bfloat16)
    assert layer.native
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()  # [rows, n]
    got = layer(x)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@needs_cpu
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_q8_mm_equals_matmul_by_its_weight(rows):
    gen = torch.Generator().manual_seed(rows)
    layer = Int8Linear(torch.randn(250, 576, generator=gen), None, torch.bfloat16)
    assert layer.native
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()
    got = layer(x)
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@needs_cpu
def test_native_int4_keeps_q4_1_scales_exactly():
    """The native layout stores each group's scale and minimum in float16, GGUF Q4_1's own precision, so a
    weight already on a Q4_1 grid (fp16 d and m) comes back exactly."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 128), generator=gen)
    q[:, ::32] = 0  # every group has its minimum and maximum on the grid, as Q4_1's quantizer makes them
    q[:, 1::32] = 15
    d = (torch.rand(32, 4, generator=gen) * 0.01 + 0.001).half().float()
    m = (-torch.rand(32, 4, generator=gen) * 0.1).half().float()
    w = (q.view(32, 4, 32) * d[..., None] + m[..., None]).view(32, 128)
    layer = Int4Linear(w, None, torch.bfloat16)
    assert layer.native and torch.equal(layer.dequantized(), w)
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
        elif not native.missing_cpu_flags():
            assert text == "kvengine AVX-512 BF16 kernels"

"""kvengine's own kernels, on every kernel tier this CPU runs (layers/native.py; the `kernel_tier` fixture forces
each with KVENGINE_ISA): the packed and tiled layouts round-trip; q4_gemm / q8_gemm (int8 activations in groups
of 32; avx512: vnni_mm.cpp on bf16, avx2 and portable: fp32_mm.cpp on fp32) equal a float matmul of the
activations as they quantize them, and stay within 1% rms of the exact product, row by row whatever the batch;
a layer whose shape fits the tiles runs the gemm for any number of rows. The avx512 tier's row kernels q4_mm /
q8_mm / bf16_mm (packed_mm.cpp, bf16 activations) equal a float matmul by the weight they store, for every number
of rows (1..8 run together, more in chunks of 8) and for output sizes that are not a multiple of their 4-row
tiles. A KVENGINE_ISA the CPU cannot run is one clear error naming the tiers it can.

A failed build fails here, rather than silently leaving a slower tier or PyTorch's kernels in place; the avx512
tests are skipped only on CPUs without AVX-512 BF16/VNNI, where that tier cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvtest import q4_0_grid

from kvengine.errors import ConfigError
from kvengine.layers import native
from kvengine.layers.linear import Int4Linear, Int8Linear, quantize_int4, quantize_int4_symmetric

AVX512 = native.tier("avx512")


@pytest.fixture
def avx512(monkeypatch):
    """The avx512 tier forced, where the CPU runs it (its row kernels exist in no other tier)."""
    if AVX512 not in native.cpu_tiers():
        pytest.skip("CPU without AVX-512 BF16/VNNI: the avx512 tier cannot run here")
    monkeypatch.setenv("KVENGINE_ISA", "avx512")
    assert native.loaded(AVX512), native.reason()
    return AVX512


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
    d = dm[:, 0]  # symmetric weights' scales alone: [32, 3] -> [2, 3, 16], lo = -8 scale coming back
    sd = native.tile_int4_scales(d)
    assert sd.shape == (2, 3, 16) and sd[1, 2, 5].item() == d[16 + 5, 2].item()
    assert torch.equal(native.untile_int4_scales(sd), torch.stack([d.float(), -8 * d.float()], dim=1))


def test_kernel_tiers_build_and_load(kernel_tier):
    assert native.available() and native.chosen() == kernel_tier
    assert hasattr(native.ops(kernel_tier.name), "decode_layer")


def test_the_fastest_tier_runs_by_default(monkeypatch):
    monkeypatch.delenv("KVENGINE_ISA", raising=False)
    assert native.requested() == native.cpu_tiers()[0] and native.cpu_tiers()[-1].name == "portable"
    monkeypatch.setenv("KVENGINE_NATIVE", "0")
    assert native.requested() is None and not native.available() and native.reason() == "KVENGINE_NATIVE=0"


def test_unknown_or_unrunnable_tier_is_one_clear_error(monkeypatch):
    runs = ", ".join(t.name for t in native.cpu_tiers())
    monkeypatch.setenv("KVENGINE_ISA", "sse9")
    with pytest.raises(ConfigError, match="^KVENGINE_ISA=sse9 is not a kernel tier \\(amx, avx512vnni, avx512, "
                                          f"avxvnni, avx2, portable\\); this CPU runs {runs}$"):
        native.requested()
    missing = [t for t in native.TIERS if t not in native.cpu_tiers()]
    if missing:  # an AVX2 host asked for avx512
        monkeypatch.setenv("KVENGINE_ISA", missing[0].name)
        with pytest.raises(ConfigError, match=f"^KVENGINE_ISA={missing[0].name}: this CPU cannot run the "
                                              f"{missing[0].name} kernels; it runs {runs}$"):
            native.requested()


def test_amx_runs_where_the_cpu_has_it_and_the_os_allows_it(monkeypatch):
    """The amx tier is offered where /proc/cpuinfo lists AMX-INT8 and Linux grants this process AMX's tile state;
    where Linux refuses (kernels before 5.16; its answer stubbed here: bookkeeping only), the CPU's AMX flags are
    dropped and the avx512vnni tier comes first."""
    listed = "amx_int8" in Path("/proc/cpuinfo").read_text()
    assert (native.tier("amx") in native.cpu_tiers()) == (listed and native._amx_granted())
    native.cpu_flags.cache_clear()
    monkeypatch.setattr(native, "_amx_granted", lambda: False)
    try:
        assert not {"amx_tile", "amx_int8"} & native.cpu_flags()
        assert native.tier("amx") not in native.cpu_tiers()
    finally:
        native.cpu_flags.cache_clear()


def test_a_failed_build_says_why_and_what_runs_instead(monkeypatch, capsys):
    """A tier whose build fails is one line on stderr (the compiler's error, the slower path that runs), and
    the next tier down is tried; with none left, PyTorch's kernels run and the run summary says why."""
    def fail(tier: native.Tier) -> None:
        raise RuntimeError(f"Error building extension '{tier.namespace}_kernels':\nx.cpp:1:1: error: no compiler"
                           "\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(native, "_build", fail)
    monkeypatch.delenv("KVENGINE_ISA", raising=False)
    native.loaded.cache_clear()
    try:
        assert native.chosen() is None and not native.available()
        names = [t.name for t in native.cpu_tiers()]
        want = [f"kvengine: building the {a} kernels failed (x.cpp:1:1: error: no compiler); the {b} kernels run "
                "instead" for a, b in zip(names, names[1:], strict=False)]
        want.append("kvengine: building the portable kernels failed (x.cpp:1:1: error: no compiler); PyTorch's "
                    "kernels run instead")
        assert capsys.readouterr().err.strip().splitlines() == want
        assert native.reason() == "building the portable kernels failed (x.cpp:1:1: error: no compiler)"
    finally:
        native.loaded.cache_clear()


# bf16 activations times exact weights, accumulated in fp32 (the reference in float64): the difference is
# the rounding of the bf16 output, at most 2^-8 of the largest output (avx512). The fp32 tiers' outputs differ
# from the float64 reference by fp32 rounding of the per-group sums: bound at 2^-16 of the largest output.
REL_TOL = 2 ** -8
TIER_TOL = {torch.bfloat16: REL_TOL, torch.float32: 2 ** -16}


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("shape", [(100, 64), (96, 576), (64, 1536)])
def test_q4_mm_equals_matmul_by_its_weight(avx512, rows, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(rows)
    layer = Int4Linear(torch.randn(n, k, generator=gen) * 0.05, None, torch.bfloat16, act_int8=False)
    assert layer.native and layer.wtiles is None
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()  # [rows, n]
    got = layer.packed_mm(x)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_q8_mm_equals_matmul_by_its_weight(avx512, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = Int8Linear(torch.randn(250, 576, generator=gen), None, torch.bfloat16)  # 250 rows: no tiles
    assert layer.native and layer.wtiles is None
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ layer.dequantized().double().t()
    got = layer.packed_mm(x)
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_bf16_mm_equals_matmul(avx512, rows):
    """Unquantized bf16 weights (decode_layer's few-row product): exact products, fp32 sums, one rounding."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 576, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ w.double().t()  # [rows, 100]
    got = native.ops("avx512").bf16_mm(x, w)
    assert got.shape == (rows, 100) and got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= REL_TOL * ref.abs().max()
    with pytest.raises(RuntimeError, match="bf16_mm: w must be \\[N, K\\] bfloat16 with K a multiple of 32"):
        native.ops("avx512").bf16_mm(x[:, :48], w[:, :48])


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


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 70])
def test_gemm_equals_matmul_of_its_quantized_activations(kernel_tier, cls, rows):
    gen = torch.Generator().manual_seed(rows)
    act = kernel_tier.act_dtype
    layer = cls(torch.randn(96, 576, generator=gen) * 0.05, None, act)
    assert layer.tier == kernel_tier.name and layer.wtiles is not None and layer.dense is None
    assert layer.qweight is None  # the tiles are the only copy of the codes
    x = torch.randn(rows, 576, generator=gen).to(act)
    x[0, :32] = 0  # an all-zero group quantizes to zeros, not NaN
    w = layer.dequantized().double()
    got = layer(x)  # tiles fit: the gemm kernel, for any number of rows
    assert torch.equal(got, layer.gemm(x)) and got.shape == (rows, 96) and got.dtype == act
    ref = int8_groups(x).double() @ w.t()  # [rows, 96]
    assert (got.double() - ref).abs().max() <= TIER_TOL[act] * ref.abs().max()
    exact = x.double() @ w.t()
    assert ((got.double() - exact).norm() / exact.norm()).item() <= QUANT_RMS_TOL
    # each row's result is the same whatever rows it is multiplied with (batch invariance)
    assert all(torch.equal(got[i:i + 1], layer(x[i:i + 1])) for i in range(rows))


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_gemm_result_does_not_depend_on_the_thread_count(kernel_tier, cls):
    """The gemms cut their (row chunk, weight tile) items into one run per thread by rows x tiles, and each run into
    pieces that any thread may take once its own are done (tier.h's for_tiles): whatever the cut and whichever
    thread takes a piece, every item is computed once and alike, so 1, 2 and 3 threads give equal results,
    at row counts whose last chunk of 64 is full, short or a few rows, with an even and an odd number of tiles.
    Before each call a freed block of NaN of the output's size leaves NaN where the allocator hands it back, so an
    item no run took would show."""
    gen = torch.Generator().manual_seed(11)
    act = kernel_tier.act_dtype
    threads = torch.get_num_threads()
    try:
        for outputs in (96, 112):
            layer = cls(torch.randn(outputs, 576, generator=gen) * 0.05, None, act)
            assert layer.wtiles is not None
            for rows in (3, 64, 70, 131):
                x = torch.randn(rows, 576, generator=gen).to(act)
                results = {}
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    poison = torch.full((rows, outputs), float("nan"), dtype=act)
                    del poison
                    results[n] = layer.gemm(x)
                assert not results[1].isnan().any()
                assert all(torch.equal(results[n], results[1]) for n in (2, 3)), (outputs, rows)
    finally:
        torch.set_num_threads(threads)


FP32_TIERS_BESIDE_AVX2 = [t.name for t in native.TIERS if t.act_dtype == torch.float32 and t.name not in
                          ("avx2", "portable")]


@pytest.mark.parametrize("tier_name", FP32_TIERS_BESIDE_AVX2)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 64, 65, 70])
@pytest.mark.parametrize("outputs", [96, 112])
def test_fp32_tiers_equal_avx2_bit_for_bit(tier_name, rows, outputs, monkeypatch):
    """avxvnni's 256-bit and avx512vnni's 512-bit VPDPBUSD and amx's tile multiplies sum the same integers as
    avx2's VPMADDUBSW + VPMADDWD, and the fp32 steps after are the same: their gemm results equal the avx2 tier's
    exactly (int8, int4 with scales and minimums, int4 on Q4_0's grid), for one row, blocks shorter than amx's
    kAmxRows, blocks that end inside a 16-row tile, a full block of 64 and more (a last block of one row), with an
    even number of tiles (avx512vnni's and amx's kernels take them two at a time: fp32_mm.h's kTileSpan) and an
    odd one (one at a time)."""
    runs = [t.name for t in native.cpu_tiers()]
    if tier_name not in runs:
        pytest.skip(f"this CPU cannot run the {tier_name} kernels (it runs {', '.join(runs)})")
    monkeypatch.setenv("KVENGINE_ISA", "avx2")  # layers tiled for the fp32 tiers (the tiles are every tier's)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen)
    layers = [cls(torch.randn(outputs, 576, generator=gen) * 0.05, None, torch.float32)
              for cls in (Int4Linear, Int8Linear)]
    layers.append(Int4Linear(q4_0_grid(outputs, 576, gen), None, torch.float32))
    assert layers[-1].symmetric and not layers[0].symmetric
    for layer in layers:
        w, s = layer.wtiles, layer.stiles
        op = "q4_gemm" if isinstance(layer, Int4Linear) else "q8_gemm"
        assert native.loaded(native.tier(tier_name)) and native.loaded(native.tier("avx2"))
        got, want = getattr(native.ops(tier_name), op)(x, w, s), getattr(native.ops("avx2"), op)(x, w, s)
        assert torch.equal(got, want), (op, (got - want).abs().max().item())


def test_native_int4_keeps_q4_1_scales_exactly(kernel_tier):
    """Both native layouts store each group's scale and minimum at float16 precision, GGUF Q4_1's own, so a
    weight already on a Q4_1 grid (fp16 d and m) comes back exactly."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 128), generator=gen)
    q[:, ::32] = 0  # every group has its minimum and maximum on the grid, as Q4_1's quantizer makes them
    q[:, 1::32] = 15
    d = (torch.rand(32, 4, generator=gen) * 0.01 + 0.001).half().float()
    m = (-torch.rand(32, 4, generator=gen) * 0.1).half().float()
    w = (q.view(32, 4, 32) * d[..., None] + m[..., None]).view(32, 128)
    for act_int8 in (True, False) if kernel_tier.row_kernels else (True,):  # the tiled layout and the row one
        layer = Int4Linear(w, None, kernel_tier.act_dtype, act_int8=act_int8)
        assert layer.native and (layer.wtiles is not None) == act_int8 and torch.equal(layer.dequantized(), w)
    q2, scale, lo = quantize_int4(w, 32)
    assert torch.equal(q2, q.int())


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_q4_0_grid_weights_run_exactly_and_symmetric(kernel_tier, rows):
    """Weights on Q4_0's grid keep their codes and scales exactly (symmetric int4); the tiers that take scales
    alone store them so and multiply as the expanded form (scale, -8 scale) does, within fp32 rounding; batch
    invariance holds. Weights off the grid stay asymmetric."""
    gen = torch.Generator().manual_seed(rows)
    w = q4_0_grid(96, 576, gen)
    layer = Int4Linear(w, None, kernel_tier.act_dtype)
    assert layer.symmetric and torch.equal(layer.dequantized(), w)
    assert layer.stiles.dim() == (3 if kernel_tier.symmetric_int4 else 4)
    x = torch.randn(rows, 576, generator=gen).to(kernel_tier.act_dtype)
    got = layer(x)
    ref = int8_groups(x).double() @ w.double().t()  # [rows, 96]
    assert (got.double() - ref).abs().max() <= TIER_TOL[kernel_tier.act_dtype] * ref.abs().max()
    assert all(torch.equal(got[i:i + 1], layer(x[i:i + 1])) for i in range(rows))
    if kernel_tier.symmetric_int4:
        dm = torch.stack([layer.stiles.float(), -8 * layer.stiles.float()], dim=2).half()  # [N/16, K/32, 2, 16]
        expanded = native.ops(kernel_tier.name).q4_gemm(x, layer.wtiles, dm)
        assert (got.double() - expanded.double()).abs().max() <= 1e-5 * ref.abs().max()
    off = w.clone()
    off[5, 7] += 1e-3
    assert quantize_int4_symmetric(off, 32) is None and not Int4Linear(off, None, kernel_tier.act_dtype).symmetric


def test_row_kernels_reject_bad_inputs(avx512):
    ops = native.ops("avx512")
    with pytest.raises(RuntimeError, match="q4_mm: x must be \\[M, K\\] bfloat16"):
        ops.q4_mm(torch.zeros(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, 2, dtype=torch.half))
    with pytest.raises(RuntimeError, match="q4_mm: K must be a multiple of 64"):
        ops.q4_mm(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.uint8),
                  torch.zeros(4, 2, 1, dtype=torch.half))


def test_gemm_rejects_bad_inputs(kernel_tier):
    ops, act = native.ops(kernel_tier.name), str(kernel_tier.act_dtype).removeprefix("torch.")
    x = torch.zeros(2, 64, dtype=kernel_tier.act_dtype)
    with pytest.raises(RuntimeError, match=f"q4_gemm: x must be \\[M, K\\] {act} with K a multiple of 32"):
        ops.q4_gemm(x[:, :48], torch.zeros(1, 2, 4, 64, dtype=torch.uint8), torch.zeros(64))
    other = torch.float32 if kernel_tier.act_dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match=f"q8_gemm: x must be \\[M, K\\] {act}"):
        ops.q8_gemm(x.to(other), torch.zeros(1, 16, 64, dtype=torch.uint8), torch.zeros(16))
    with pytest.raises(RuntimeError, match="q4_gemm: w must be \\[N/16, K/32, 4, 64\\] uint8"):
        ops.q4_gemm(x, torch.zeros(1, 3, 4, 64, dtype=torch.uint8), torch.zeros(96))
    with pytest.raises(RuntimeError, match="q4_gemm: dm must be \\[N/16, K/32, 2, 16\\] float16"):
        ops.q4_gemm(x, torch.zeros(1, 2, 4, 64, dtype=torch.uint8), torch.zeros(64))
    symmetric = "\\(or \\[N/16, K/32, 16\\]: the scales of symmetric weights\\)"
    with pytest.raises(RuntimeError, match=symmetric if kernel_tier.symmetric_int4 else "float16$"):
        ops.q4_gemm(x, torch.zeros(1, 2, 4, 64, dtype=torch.uint8), torch.zeros(48, dtype=torch.half))
    with pytest.raises(RuntimeError, match="q8_gemm: scale must be \\[N\\] float32"):
        ops.q8_gemm(x, torch.zeros(1, 16, 64, dtype=torch.uint8), torch.zeros(15))


def test_run_summary_names_the_kernels(kernel_tier):
    """The weights line names the tier whose kernels ran for activations of its dtype, and says why PyTorch's ran
    for the other dtype."""
    from kvtest import tiny_pair

    from kvengine.layers.linear import describe_kernels, quantize_linears

    for dtype in (torch.float32, torch.bfloat16):
        model, _ = tiny_pair("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2)
        quantize_linears(model.to(dtype), "int4", dtype)
        text = describe_kernels(model, dtype)
        if dtype == kernel_tier.act_dtype:
            assert text == f"kvengine {kernel_tier.name} kernels (int8 activations in groups of 32)"
        else:
            act = str(kernel_tier.act_dtype).removeprefix("torch.")
            assert text == f"PyTorch packed kernels (not kvengine's: they need {act} activations)"

"""The native kernels (csrc/*.cpp) in ISA tiers: each tier compiled with its own flags into its own extension, one
chosen once per process from the CPU's flags, built on first use, loaded as torch ops, or none at all.

Tiers, fastest first (TIERS; adding one is a source file and a line here):
  amx      AVX-512 VNNI + AMX-INT8 (fp32_mm.cpp with amx_tiles.cpp, fp32_layer.cpp; Intel Xeon Sapphire Rapids and
           later): the avx512vnni tier, whose blocks of 16 or more rows take their integer products from AMX tile
           multiplies (16 rows x 16 outputs x 32 inputs each) instead of VPDPBUSD; the same sums, so the same
           results bit for bit. Decode of one sequence is avx512vnni's.
  avx512vnni  AVX-512 + VNNI (fp32_mm.cpp with avx512_tiles.cpp, fp32_layer.cpp): the avx2 tier's fp32
           activations and operands, each 512-bit VPDPBUSD advancing a whole 16-row tile by 4 inputs; the same
           integer sums as avx2, so the same results. First on every AVX-512 VNNI CPU, BF16 or not: on an AMD
           EPYC Zen 5 with AVX-512 BF16 it ran 1.1-1.35x the avx512 tier's prefill and 32-request rates
           (docs/benchmarks.md), with fp32 activations and Q4_0's grid kept.
  avx512   AVX-512 BF16 + VNNI (packed_mm.cpp, vnni_mm.cpp, decode_layer.cpp; KVENGINE_ISA=avx512): bf16
           activations (a bf16 KV cache: half the fp32 tiers' bytes per token). `q4_gemm` / `q8_gemm` multiply
           activations quantized to int8 in groups of 32 by int4 / int8 weight tiles (VPDPBUSD); `q4_mm` /
           `q8_mm` / `bf16_mm` take bf16 activations for shapes the tiles do not fit; `decode_layer` runs a whole
           Llama-family layer per op.
  avx2     AVX2 + FMA + F16C (fp32_mm.cpp with avx2_tiles.cpp, fp32_layer.cpp): fp32 activations, the same int8
           codes and weight tiles multiplied with VPMADDUBSW / VPMADDWD; `q4_gemm`, `q8_gemm`, `decode_layer`.
           Its `decode_layer` (and avx512vnni's, avxvnni's, portable's) keeps K/V in an fp32, bf16 or fp16 cache
           (`narrow_kv`); the engine's "auto" KV dtype is bf16 there (engine/assembly.py `fast_kv_dtype`).
  avxvnni  the avx2 sources compiled with -mavxvnni: AVX-VNNI's 256-bit VPDPBUSD in place of each VPMADDUBSW /
           VPMADDWD chain (CPUs with AVX-VNNI but no AVX-512 VNNI); the same integer sums, so the same results.
  portable plain C++ any compiler builds and vectorizes (portable_tiles.cpp instead of avx2_tiles.cpp).
A tier's ops live in the namespace torch.ops.kvengine_<tier> (`ops(name)`), so one process can load several: the
run uses `chosen()`, the tests run every tier in `cpu_tiers()`. KVENGINE_ISA=amx|avx512|avx512vnni|avxvnni|avx2|portable
forces a tier the CPU can run (others are a ConfigError naming the ones it can); KVENGINE_NATIVE=0 turns them all off.
A tier is compiled with the machine's g++ the first time it is used (scripts/setup does it ahead; ~30-60 s,
then cached by torch under ~/.cache/torch_extensions), saying so on stderr; a failed build says why in one line
and the next tier down runs instead. Where none loads, layers/linear.py keeps PyTorch's packed kernels and
`reason()` says why, for the run summary. The matmuls have shape functions, so compiled graphs call them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from kvengine.errors import ConfigError

CSRC = Path(__file__).parent / "csrc"
COMMON_CFLAGS = ("-O3", "-fopenmp")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    cpu_flags: tuple[str, ...]  # what /proc/cpuinfo must list for the CPU to run it
    cflags: tuple[str, ...]
    sources: tuple[str, ...]  # files of csrc/
    act_dtype: torch.dtype  # the activations its ops take and return
    row_kernels: bool = False  # q4_mm / q8_mm / bf16_mm for shapes the tiles do not fit
    head_dim_step: int = 2  # decode_layer takes head_dim a multiple of this (its operand check, layer_flow.h)
    symmetric_int4: bool = False  # q4_gemm also takes scales alone for weights on Q4_0's grid (tile_int4_scales)
    # decode_layer's KV caches besides act_dtype: narrower floats (half the bytes a token) it rounds K/V to as it
    # writes them and widens as it reads
    narrow_kv: tuple[torch.dtype, ...] = ()

    def reads_kv(self, dtype: torch.dtype | None) -> bool:
        """Whether decode_layer takes caches of `dtype`."""
        return dtype == self.act_dtype or dtype in self.narrow_kv

    @property
    def namespace(self) -> str:
        return f"kvengine_{self.name}"


HALF = (torch.bfloat16, torch.float16)  # the fp32 tiers' narrow KV caches (fp32_attention.h)
TIERS = (
    Tier("amx", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8", "f16c", "fma"),
         ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-mavx2", "-mf16c",
          "-mfma"),
         ("fp32_mm.cpp", "amx_tiles.cpp", "fp32_layer.cpp"), torch.float32, symmetric_int4=True, narrow_kv=HALF),
    Tier("avx512vnni", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"),
         ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mf16c", "-mfma"),
         ("fp32_mm.cpp", "avx512_tiles.cpp", "fp32_layer.cpp"), torch.float32, symmetric_int4=True, narrow_kv=HALF),
    Tier("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma"),
         ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma"),
         ("packed_mm.cpp", "vnni_mm.cpp", "decode_layer.cpp"), torch.bfloat16, row_kernels=True, head_dim_step=16),
    Tier("avxvnni", ("avx2", "fma", "f16c", "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni"),
         ("fp32_mm.cpp", "avx2_tiles.cpp", "fp32_layer.cpp"), torch.float32, symmetric_int4=True, narrow_kv=HALF),
    Tier("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"),
         ("fp32_mm.cpp", "avx2_tiles.cpp", "fp32_layer.cpp"), torch.float32, symmetric_int4=True, narrow_kv=HALF),
    Tier("portable", (), (), ("fp32_mm.cpp", "portable_tiles.cpp", "fp32_layer.cpp"), torch.float32,
         symmetric_int4=True, narrow_kv=HALF),
)
_status: dict[str, str] = {}


@cache
def cpu_flags() -> set[str]:
    """The CPU's flags in /proc/cpuinfo, less AMX's where the OS does not let this process use it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if "amx_tile" in flags and not _amx_granted():
        flags -= {"amx_tile", "amx_int8", "amx_bf16"}
    return flags


def _amx_granted() -> bool:
    """Linux (5.16 and later) gives a process AMX's tile registers only once asked: arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA), process-wide; amx_tiles.cpp asks again before its first tile multiply."""
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64 Linux's numbers
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def tier(name: str) -> Tier:
    return next(t for t in TIERS if t.name == name)


def cpu_tiers() -> list[Tier]:
    """The tiers this CPU can run, fastest first (portable always)."""
    return [t for t in TIERS if all(f in cpu_flags() for f in t.cpu_flags)]


def requested() -> Tier | None:
    """The tier this process should run, from the CPU and KVENGINE_ISA / KVENGINE_NATIVE, without building it;
    None with KVENGINE_NATIVE=0. A KVENGINE_ISA the CPU cannot run is a ConfigError naming the ones it can."""
    if os.environ.get("KVENGINE_NATIVE", "1") == "0":
        return None
    runnable = cpu_tiers()
    name = os.environ.get("KVENGINE_ISA", "").strip().lower()
    if not name:
        return runnable[0]
    for t in runnable:
        if t.name == name:
            return t
    runs = ", ".join(t.name for t in runnable)
    if name not in {t.name for t in TIERS}:
        raise ConfigError(f"KVENGINE_ISA={name} is not a kernel tier ({', '.join(t.name for t in TIERS)}); "
                          f"this CPU runs {runs}")
    raise ConfigError(f"KVENGINE_ISA={name}: this CPU cannot run the {name} kernels; it runs {runs}")


def chosen() -> Tier | None:
    """The tier whose ops this process runs, built and loaded (once); a tier that fails to build says why in one
    line and the next one down is tried. None (with `reason()`) where none loads or KVENGINE_NATIVE=0."""
    first = requested()
    if first is None:
        _status["reason"] = "KVENGINE_NATIVE=0"
        return None
    for t in cpu_tiers()[cpu_tiers().index(first):]:
        if loaded(t):
            _status["reason"] = ""
            return t
    return None


def available() -> bool:
    """True once the chosen tier's ops are loaded (building them if needed)."""
    return chosen() is not None


def tier_for(act_dtype: torch.dtype) -> Tier | None:
    """The chosen tier if its ops take `act_dtype` activations, else None (PyTorch's kernels run)."""
    t = chosen()
    return t if t is not None and t.act_dtype == act_dtype else None


def reason() -> str:
    return _status.get("reason", "")


@cache
def ops(name: str) -> torch._ops._OpNamespace:
    """torch.ops.kvengine_<name>: the ops of a loaded tier."""
    return getattr(torch.ops, tier(name).namespace)


@cache
def loaded(t: Tier) -> bool:
    """Build (first use) and load tier `t`; False, saying why on stderr once, where that fails."""
    slower = next((s.name for s in cpu_tiers() if TIERS.index(s) > TIERS.index(t)), None)
    try:
        _build(t)
    except Exception as e:  # a compiler or ninja missing, a failed build: fall back, say why once
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = next((ln.strip() for ln in lines if "error:" in ln), lines[-1])[:200]
        instead = f"the {slower} kernels run instead" if slower else "PyTorch's kernels run instead"
        _status["reason"] = f"building the {t.name} kernels failed ({why})"
        print(f"kvengine: building the {t.name} kernels failed ({why}); {instead}", file=sys.stderr)
        return False
    return True


def _build(t: Tier) -> None:
    from torch.utils.cpp_extension import _get_build_directory, load

    # torch runs `ninja` from PATH; the one pip installed beside this interpreter counts even when the
    # environment is not activated
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    name = f"{t.namespace}_kernels"
    if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
        print(f"kvengine: compiling the {t.name} kernels for this CPU (first use, about a minute; cached after)",
              file=sys.stderr)
    load(name=name, sources=[str(CSRC / s) for s in t.sources],
         extra_cflags=[*COMMON_CFLAGS, *t.cflags, f"-DKV_OPS={t.namespace}"], extra_ldflags=["-fopenmp"],
         extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False)
    ns = t.namespace

    def gemm_shape(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], 16 * w.shape[0])  # [M, N]

    torch.library.register_fake(f"{ns}::q4_gemm", gemm_shape)
    torch.library.register_fake(f"{ns}::q8_gemm", gemm_shape)
    if t.row_kernels:
        def rows_shape(x: torch.Tensor, q: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
            return x.new_empty(x.shape[0], q.shape[0])  # [M, N]

        for op in ("q4_mm", "q8_mm", "bf16_mm"):
            torch.library.register_fake(f"{ns}::{op}", rows_shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers 0..15 -> [N, K/2] uint8 in q4_mm's order (K a multiple of 64).

    The kernel splits 32 bytes into their low and high nibbles (64 values Z) and interleaves them with a
    constant byte per 128-bit lane; so that the first 32 words are group g in order and the next 32 group g+1,
    Z[16L + t] = q_g[8L + t] and Z[16L + 8 + t] = q_g+1[8L + t] (L the lane, t < 8), and byte i = Z[i] | Z[32+i] << 4.
    """
    n, k = q.shape
    z = q.to(torch.uint8).reshape(n, k // 64, 2, 4, 8).transpose(2, 3).reshape(n, k // 64, 64)  # [N, K/64, 64]
    return (z[..., :32] | (z[..., 32:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [N, K/2] uint8 -> [N, K] int64 in 0..15."""
    n, half = packed.shape
    b = packed.reshape(n, half // 32, 32).long()  # [N, K/64, 32]
    z = torch.cat([b & 15, b >> 4], dim=-1)  # [N, K/64, 64]
    return z.reshape(n, half // 32, 4, 2, 8).transpose(2, 3).reshape(n, half * 2)


def tile_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers 0..15 -> [N/16, K/32, 4, 64] uint8 in q4_gemm's tile order (N a multiple of 16, K of 32).

    Byte 4l + b of w[t, g, j] holds q[16t + l, 32g + 8j + b] in its low nibble and q[16t + l, 32g + 8j + 4 + b]
    in its high one: the kernel's two VPDPBUSD operands for inputs 8j..8j+3 and 8j+4..8j+7 of group g.
    """
    n, k = q.shape
    z = q.to(torch.uint8).reshape(n // 16, 16, k // 32, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)  # [T, G, 4, 2, 16, 4]
    z = z.reshape(n // 16, k // 32, 4, 2, 64)
    return (z[..., 0, :] | (z[..., 1, :] << 4)).contiguous()


INT4_MIDPOINT = 8  # the code of a zero weight in symmetric int4 (GGUF Q4_0: w = (q - 8) d, q in 0..15)


def symmetric_lo(scale: torch.Tensor) -> torch.Tensor:
    """The lo (w at code 0) of symmetric int4 groups with these scales: -8 scale."""
    return -INT4_MIDPOINT * scale


def tile_int4_scales(dm: torch.Tensor) -> torch.Tensor:
    """dm [N, 2, K/32] (scale, lo per group) -> [N/16, K/32, 2, 16] float16, q4_gemm's order: for each tile and
    group, the 16 rows' scales, then their los. Symmetric weights (lo = -8 scale, Q4_0's grid), on the tiers that
    take them (Tier.symmetric_int4): the scales alone, [N, K/32] -> [N/16, K/32, 16]."""
    if dm.dim() == 2:
        n, g = dm.shape
        return dm.half().reshape(n // 16, 16, g).permute(0, 2, 1).contiguous()
    n, _, g = dm.shape
    return dm.half().reshape(n // 16, 16, 2, g).permute(0, 3, 2, 1).contiguous()


def untile_int4_scales(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4_scales`: [N/16, K/32, 2, 16] -> [N, 2, K/32] float32 (from [N/16, K/32, 16], with
    lo = -8 scale)."""
    t, g = tiles.shape[:2]
    if tiles.dim() == 3:
        d = tiles.permute(0, 2, 1).reshape(16 * t, g).float()  # [N, K/32]
        return torch.stack([d, symmetric_lo(d)], dim=1)
    return tiles.permute(0, 3, 2, 1).reshape(16 * t, 2, g).float()


def untile_int4(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4`: [N/16, K/32, 4, 64] uint8 -> [N, K] int64 in 0..15."""
    t, g = w.shape[:2]
    z = torch.stack([w & 15, w >> 4], dim=3).long().reshape(t, g, 4, 2, 16, 4)  # [T, G, 4, 2, 16, 4]
    return z.permute(0, 4, 1, 2, 3, 5).reshape(16 * t, 32 * g)


def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 -> [N/16, K/4, 64] uint8 in q8_gemm's tile order: byte 4l + b of w[t, c] is
    q[16t + l, 4c + b] + 128."""
    n, k = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)  # [N, K]
    return u.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).reshape(n // 16, k // 4, 64).contiguous()


def untile_int8(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int8`: [N/16, K/4, 64] uint8 -> [N, K] int8."""
    t, c = w.shape[:2]
    return (w.reshape(t, c, 16, 4).permute(0, 2, 1, 3).reshape(16 * t, 4 * c).to(torch.int16) - 128).to(torch.int8)


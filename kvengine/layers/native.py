"""The native kernels (csrc/*.cpp): built on first use, loaded as torch ops, or not at all.

`kvengine::q4_gemm` and `kvengine::q8_gemm` (vnni_mm.cpp) multiply activations, quantized to int8 in groups of
32, by int4 / int8 weights in a tiled layout on x86 CPUs with AVX-512 VNNI; `kvengine::q4_mm` and
`kvengine::q8_mm` (packed_mm.cpp) multiply bf16 activations by the same weights in a row layout, for shapes the
tiles do not fit (each file's header says how); `kvengine::decode_layer` (decode_layer.cpp) runs a whole
Llama-family layer for a decode step on the tile kernels (models/llama.py). They are compiled with the
machine's g++ the first time a quantized model is built (~30 s, then cached by torch under
~/.cache/torch_extensions) and registered as torch ops; the matmuls have shape functions, so compiled decode
graphs call them directly. Where the CPU lacks the instructions, the build fails, or KVENGINE_NATIVE=0 is set,
`available()` is False and layers/linear.py keeps PyTorch's packed kernels; `reason()` says why, for the run
summary.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "packed_mm.cpp", CSRC / "vnni_mm.cpp", CSRC / "decode_layer.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma")
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma"]
_status: dict[str, str] = {}


@cache
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def missing_cpu_flags() -> list[str]:
    """The instructions the kernels need that this CPU lacks (empty where they apply)."""
    return [f for f in CPU_FLAGS if f not in cpu_flags()]


@cache
def available() -> bool:
    """True once the ops are loaded (building them if needed); False, with `reason()`, where they cannot be."""
    if os.environ.get("KVENGINE_NATIVE", "1") == "0":
        _status["reason"] = "KVENGINE_NATIVE=0"
        return False
    missing = missing_cpu_flags()
    if missing:
        _status["reason"] = f"the CPU lacks {', '.join(missing)}"
        return False
    try:
        _build()
    except Exception as e:  # a compiler or ninja missing, a failed build: fall back, say why once
        _status["reason"] = f"building the kernels failed ({str(e).strip().splitlines()[-1][:200]})"
        print(f"kvengine: native kernels unavailable, using PyTorch's: {_status['reason']}", file=sys.stderr)
        return False
    return True


def reason() -> str:
    return _status.get("reason", "")


def _build() -> None:
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH; the one pip installed beside this interpreter counts even when the
    # environment is not activated
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    load(name="kvengine_kernels", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
         extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False)

    @torch.library.register_fake("kvengine::q4_mm")
    def _q4_shape(x: torch.Tensor, q: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0])  # [M, N]

    @torch.library.register_fake("kvengine::q8_mm")
    def _q8_shape(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0])  # [M, N]

    @torch.library.register_fake("kvengine::bf16_mm")
    def _bf16_shape(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])  # [M, N]

    @torch.library.register_fake("kvengine::q4_gemm")
    @torch.library.register_fake("kvengine::q8_gemm")
    def _gemm_shape(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], 16 * w.shape[0])  # [M, N]


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


def tile_int4_scales(dm: torch.Tensor) -> torch.Tensor:
    """dm [N, 2, K/32] (scale, lo per group) -> [N/16, K/32, 2, 16] float32, q4_gemm's order: for each tile and
    group, the 16 rows' scales, then their los."""
    n, _, g = dm.shape
    return dm.float().reshape(n // 16, 16, 2, g).permute(0, 3, 2, 1).contiguous()


def untile_int4_scales(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4_scales`: [N/16, K/32, 2, 16] -> [N, 2, K/32]."""
    t, g = tiles.shape[:2]
    return tiles.permute(0, 3, 2, 1).reshape(16 * t, 2, g)


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


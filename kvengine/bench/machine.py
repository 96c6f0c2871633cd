"""The machine a benchmark ran on: CPU model, cores, memory, torch version and threads, GPU.

Every bench result carries this block, because a number without its machine cannot be compared.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

# CPU flags worth naming beside a CPU result (wide vectors and the bf16/int8 dot products).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


@dataclass(slots=True)
class MachineInfo:
    cpu_model: str
    physical_cores: int | None
    logical_cores: int | None
    cpu_flags: list[str]
    memory_bytes: int
    os: str
    python: str
    torch_version: str
    torch_threads: int
    gpu: str | None  # name of the first CUDA device, or None
    gpu_memory_bytes: int | None
    cuda_version: str | None
    kvengine_version: str

    def describe(self) -> str:
        """One line for tables and plot titles."""
        gib = self.memory_bytes / 2**30
        line = (f"{self.cpu_model}, {self.physical_cores or '?'} cores / {self.logical_cores or '?'} threads, "
                f"{gib:.0f} GiB, torch {self.torch_version} ({self.torch_threads} threads)")
        if self.gpu:
            line += f", GPU {self.gpu}"
        return line

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.describe()
        return data


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in NOTABLE_FLAGS if f in have]
    return []


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second that summing an `n_bytes` float32 array reads, best of `repeats`, on PyTorch's current
    threads: the ceiling for a decode step that reads every weight once."""
    import time

    x = torch.ones(n_bytes // 4)  # [n_bytes / 4] float32, touched once before timing
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def machine_info() -> MachineInfo:
    """Describe this machine now (torch threads as currently set)."""
    from kvengine import __version__ as kv_version

    gpu = gpu_mem = cuda = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, gpu_mem, cuda = props.name, int(props.total_memory), torch.version.cuda
    return MachineInfo(
        cpu_model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count(),
        cpu_flags=_cpu_flags(),
        memory_bytes=int(psutil.virtual_memory().total),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        gpu=gpu,
        gpu_memory_bytes=gpu_mem,
        cuda_version=cuda,
        kvengine_version=kv_version,
    )

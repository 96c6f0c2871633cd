"""ResourceSampler: a background thread that samples CPU utilisation and memory while a run goes on.

CPU: this process's CPU time as a percentage of all logical cores (100% = every core busy with us) and
the whole machine's, so a noisy neighbour shows up. Memory: the process's resident set size (RSS).
On CUDA also the GPU: utilisation (when the NVML bindings are installed) and the bytes torch holds
allocated and reserved on the device. The seed 000 charts (GPU utilisation and memory over time) are
drawn from these samples.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

DEFAULT_INTERVAL_S = 0.1


@dataclass(slots=True)
class Sample:
    t_s: float  # seconds since the sampler started
    cpu_percent: float  # this process, % of all logical cores
    machine_cpu_percent: float  # every process on the machine, % of all logical cores
    rss_bytes: int
    gpu_percent: float | None = None
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None


@dataclass(slots=True)
class SampleSeries:
    """The samples of one run, with a few summaries for tables."""

    interval_s: float
    samples: list[Sample] = field(default_factory=list)

    def peak_rss(self) -> int:
        return max((s.rss_bytes for s in self.samples), default=0)

    def mean_cpu(self) -> float:
        return sum(s.cpu_percent for s in self.samples) / len(self.samples) if self.samples else 0.0

    def peak_gpu_allocated(self) -> int | None:
        values = [s.gpu_allocated_bytes for s in self.samples if s.gpu_allocated_bytes is not None]
        return max(values) if values else None

    def summary(self) -> dict[str, Any]:
        return {"samples": len(self.samples), "interval_s": self.interval_s, "mean_cpu_percent": self.mean_cpu(),
                "peak_rss_bytes": self.peak_rss(), "peak_gpu_allocated_bytes": self.peak_gpu_allocated()}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "series": [asdict(s) for s in self.samples]}


def _gpu_percent() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except Exception:  # no NVML bindings, or a device that does not report it
        return None


class ResourceSampler:
    """Use as a context manager around one run; `series` holds the samples afterwards."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, cuda: bool | None = None) -> None:
        self.interval_s = interval_s
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.series = SampleSeries(interval_s)
        self._proc = psutil.Process()
        self._cores = psutil.cpu_count(logical=True) or 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> ResourceSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._proc.cpu_percent(None)  # the first call only sets the reference point
        psutil.cpu_percent(None)
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvengine-bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()  # the state at the very end of the run

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> Sample:
        s = Sample(
            t_s=time.perf_counter() - self._t0,
            cpu_percent=self._proc.cpu_percent(None) / self._cores,
            machine_cpu_percent=psutil.cpu_percent(None),
            rss_bytes=int(self._proc.memory_info().rss),
        )
        if self.cuda:
            s.gpu_percent = _gpu_percent()
            s.gpu_allocated_bytes = int(torch.cuda.memory_allocated())
            s.gpu_reserved_bytes = int(torch.cuda.memory_reserved())
        self.series.samples.append(s)
        return s

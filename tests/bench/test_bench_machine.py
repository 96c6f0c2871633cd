"""The machine block and the resource sampler every bench records."""

from __future__ import annotations

import time

import psutil
import torch

from kvengine.bench.machine import machine_info
from kvengine.bench.sampler import ResourceSampler


def test_machine_info_describes_this_machine():
    info = machine_info()
    assert info.logical_cores == psutil.cpu_count(logical=True)
    assert info.memory_bytes == psutil.virtual_memory().total
    assert info.torch_version == torch.__version__ and info.torch_threads == torch.get_num_threads()
    assert (info.gpu is None) == (not torch.cuda.is_available())
    line = info.describe()
    assert info.cpu_model in line and f"torch {torch.__version__}" in line
    assert info.to_dict()["summary"] == line


def test_sampler_records_cpu_and_memory_over_time():
    with ResourceSampler(interval_s=0.02, cuda=False) as sampler:
        start = time.perf_counter()  # keep one core busy for 0.2 s and until 5 samples (a loaded machine is slow)
        while (time.perf_counter() - start < 0.2 or len(sampler.series.samples) < 5) \
                and time.perf_counter() - start < 10:
            sum(range(1000))
    s = sampler.series.samples
    assert len(s) >= 5
    assert [x.t_s for x in s] == sorted(x.t_s for x in s) and s[-1].t_s >= 0.2
    # (no upper bound: CPU time advances in clock ticks, so one short interval can show more than it used)
    assert all(x.cpu_percent >= 0 and x.rss_bytes > 0 for x in s)
    assert all(x.gpu_percent is None and x.gpu_allocated_bytes is None for x in s)
    summary = sampler.series.summary()
    assert summary["samples"] == len(s) and summary["peak_rss_bytes"] == max(x.rss_bytes for x in s)
    assert sampler.series.mean_cpu() > 0

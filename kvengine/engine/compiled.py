"""CompiledDecode: decode steps through torch.compile (optional, `compile=True` / `--compile`).

A decode step of a small model is hundreds of tiny ops, and in eager PyTorch their dispatch costs more than
their arithmetic. Compiling the model's forward for the steps that dominate generation (every sequence
computes one new token) fuses the norms, RoPE, residual adds and attention glue into a few generated
kernels. Context lengths and the number of sequences are symbolic sizes, so a few compilations serve every
step: one sequence, several sequences (one padded gather), and a third once a step has more rows than
`dense_above` (the dense weight copies of PyTorch's packed kernels, layers/linear.py). The model reads
`StepBatch.max_context_len`, never the per-sequence lists, and the runner gives compiled steps slot lists, never
start slots (engine/runner.py), so the graphs depend on neither. Prefill, mixed steps and windowed layouts run
eagerly, and so do the decode steps of a model that runs them as one op per layer (the fused layer op,
models/llama.py `enable_fused_layers`: then nothing is compiled). Inductor caches the compiled code on disk
(`inductor_cache_dir`: one folder per ATen CPU capability); Dynamo's tracing is paid again in every process.
`first_call_s` records what the first call of each kind took here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.weights.catalog import kvengine_home


class CompiledDecode:
    def __init__(self, model: torch.nn.Module) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
        # size_asserts off: Inductor's generated code otherwise checks every input's sizes and strides on every call
        # (~500 Python calls a step for a 30-layer model); the step's shapes are checked by Dynamo's guards anyway
        self._fn = torch.compile(model.forward, dynamic=True, options={"size_asserts": False})
        self.first_call_s: dict[str, float] = {}  # "batch-1" / "batched": the first call of each, compile included
        self._told: set[str] = set()

    @property
    def compile_seconds(self) -> float | None:
        """What the first compiled decode step took here (tracing and compiling, or loading Inductor's cache):
        batch-1's, else the first batched one's; None while none ran (a model whose decode steps run its fused
        op, models/llama.py, compiles none)."""
        return self.first_call_s.get("batch-1", self.first_call_s.get("batched"))

    def untold_first_calls(self) -> dict[str, float]:
        """First calls no run summary has mentioned yet (each is said once: it slowed exactly one run)."""
        new = {k: v for k, v in self.first_call_s.items() if k not in self._told}
        self._told.update(new)
        return new

    @staticmethod
    def applies(batch: StepBatch) -> bool:
        # every sequence computes one new token; one KV group, keeping every token (windowed layouts run eagerly)
        return batch.kv is not None and batch.is_decode and len(batch.kv) == 1 and batch.kv[0].window is None

    def __call__(self, batch: StepBatch, pool: KVPool) -> torch.Tensor:
        kind = "batch-1" if batch.num_seqs == 1 else "batched"
        if kind in self.first_call_s:
            return self._fn(batch, pool)
        start = time.perf_counter()
        out = self._fn(batch, pool)
        self.first_call_s[kind] = time.perf_counter() - start
        return out


def inductor_cache_dir() -> Path:
    """Where Inductor caches compiled steps: $TORCHINDUCTOR_CACHE_DIR (set by the user, or by Inductor itself once
    it has run in this process), else $KVENGINE_HOME/inductor, with a folder per ATen CPU capability under it
    (cpu-avx512, cpu-avx2, ...). Inductor's cache keys do not tell them apart: code compiled under
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 host, reused by a later run at the host's own capability, aborted that
    run ("double free or corruption")."""
    base = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or kvengine_home() / "inductor")
    folder = f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    return base if base.name == folder else base / folder

"""CompiledDecode: the batch-1 decode step through torch.compile (optional, `compile=True` / `--compile`).

A decode step of a small model is hundreds of tiny ops, and in eager PyTorch their dispatch costs more than
their arithmetic. Compiling the model's forward for the one shape that dominates single-user generation
(one sequence, one new token) fuses the norms, RoPE, residual adds and attention glue into a few generated
kernels. The context length is a symbolic size, so one compilation serves every step. Other batch shapes
run eagerly. Compiled code is cached on disk by Inductor (under $KVENGINE_HOME/inductor), so the cost is
paid once per machine, not once per process; `compile_seconds` records what the first call took here.
"""

from __future__ import annotations

import os
import time

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.weights.catalog import kvengine_home


class CompiledDecode:
    def __init__(self, model: torch.nn.Module) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(kvengine_home() / "inductor"))
        self._fn = torch.compile(model.forward, dynamic=True)
        self.compile_seconds: float | None = None

    @staticmethod
    def applies(batch: StepBatch) -> bool:
        # one sequence, one new token, one KV group that keeps every token (windowed layouts run eagerly)
        return (batch.kv is not None and batch.num_seqs == 1 and batch.num_tokens == 1 and len(batch.kv) == 1
                and batch.kv[0].kv_positions[0] is None)

    def __call__(self, batch: StepBatch, pool: KVPool) -> torch.Tensor:
        if self.compile_seconds is None:
            start = time.perf_counter()
            out = self._fn(batch, pool)
            self.compile_seconds = time.perf_counter() - start
            return out
        return self._fn(batch, pool)

"""The attention backend protocol: each way a step's attention reads the KV cache is one backend.

The runner picks one backend per KV group per step (engine/runner.py `ModelRunner._backend_for`, the only place
that chooses) and calls its `plan` once; the view of that group (batch.KVView) then carries the backend and its
metadata, and every layer of the group attends through `backend.attend` (layers/backends `attend`). Each backend
keeps its own small metadata dataclass; KVView holds only what every path shares. Without a cache there is no
view: `NoCacheBackend` attends over the step's own tokens.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV


class AttentionBackend(Protocol):
    name: str
    # True when the model runs each whole layer as one op with this metadata (the fused layer op); `attend` is then
    # the same attention in PyTorch, for reference
    runs_whole_layers: bool

    def plan(self, batch: StepBatch, view: KVView) -> Any:
        """This step's metadata for one KV group, made once before the forward pass."""
        ...

    def attend(self, q: torch.Tensor, layer_kv: LayerKV, view: KVView, batch: StepBatch, scale: float,
               q_sink: torch.Tensor | None) -> torch.Tensor:
        """q [T, Hq, D] of the step's new tokens, whose K/V are already in `layer_kv`, against the keys each reads
        (the view and `view.metadata` say which) -> [T, Hq, D]. `q_sink` [T, Hq, D]: the queries rotated at their
        cache positions, for scores against sink keys (cache/retention.py), or None."""
        ...

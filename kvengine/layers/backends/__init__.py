"""Attention backends, one per way a step attends (base.py says how they are chosen and planned):

- no cache (no_cache.py): the seeds' baseline, each sequence over its own tokens;
- paged (paged.py): per sequence over the paged pool, any step;
- paged batched decode (paged_decode.py): one new token per sequence, one padded gather and one SDPA call;
- the fused layer op (fused_layers.py): the model runs whole layers as one op.

`attend` is what a model's attention layer calls: it writes the new K/V and hands over to the view's backend.
"""

from __future__ import annotations

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV
from kvengine.layers.backends.base import AttentionBackend
from kvengine.layers.backends.fused_layers import FUSED_LAYERS, FusedLayersMetadata, no_cache_rows
from kvengine.layers.backends.no_cache import NO_CACHE
from kvengine.layers.backends.paged import PAGED, PagedMetadata
from kvengine.layers.backends.paged_decode import PAGED_DECODE, PagedDecodeMetadata

__all__ = ["FUSED_LAYERS", "NO_CACHE", "PAGED", "PAGED_DECODE", "AttentionBackend", "FusedLayersMetadata",
           "PagedDecodeMetadata", "PagedMetadata", "attend", "no_cache_rows"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: LayerKV | None, view: KVView | None,
           batch: StepBatch, scale: float, window: int | None = None,
           q_sink: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the step's new tokens -> attention output [T, Hq, D].

    Without a cache, `window` is the layer's own sliding window; with one, the view says what is kept and which
    backend attends. `q_sink` [T, Hq, D]: the queries rotated at their cache positions, for scores against sink
    keys."""
    if layer_kv is None or view is None:
        return NO_CACHE.attend(q, k, v, batch, scale, window)
    layer_kv.write(view.slot_mapping, k, v)
    assert view.backend is not None, "the runner plans every view before the forward pass"
    return view.backend.attend(q, layer_kv, view, batch, scale, q_sink)

"""No cache (the seeds' baseline): every sequence's whole text is in the step; causal attention over it."""

from __future__ import annotations

import torch

from kvengine.batch import StepBatch
from kvengine.layers.attention import causal_mask, sdpa_gqa


class NoCacheBackend:
    """The step's own tokens are the keys: nothing to plan and nothing kept, so there is no view and no metadata;
    the layer's own sliding window (None = all) bounds what a query sees."""

    name = "no-cache"
    runs_whole_layers = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float,
               window: int | None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], each sequence over its own tokens."""
        out = torch.empty_like(q)  # [T, Hq, D]
        for i in range(batch.num_seqs):
            start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            mask = causal_mask(end - start, end - start, window, q.device)
            k_i = k[start:end].transpose(0, 1)  # [Hkv, L, D]
            v_i = v[start:end].transpose(0, 1)  # [Hkv, L, D]
            out[start:end] = sdpa_gqa(q[start:end], k_i, v_i, scale, mask)
        return out


NO_CACHE = NoCacheBackend()

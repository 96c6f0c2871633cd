"""CausalLM: everything the engine, the loader and the presets may call on a model, whatever its family.

A family's model class is a `torch.nn.Module` that subclasses this protocol explicitly (after the Module), so it
inherits the defaults of the optional members: a family without the fused layer op or random weights writes
nothing for them. Everything outside models/ calls these members, never `hasattr` / `getattr` on a model.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.models.config_parse import GGUFMetadata


class CausalLM(Protocol):
    config: ModelConfig

    # -- the family's config: each family reads its own (models/registry.py picks the family) ------------------
    @staticmethod
    def config_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
        """A ModelConfig from a Hugging Face config.json dict of one of the family's `model_type`s."""
        ...

    @staticmethod
    def config_from_gguf(meta: GGUFMetadata, name: str) -> ModelConfig:
        """A ModelConfig from the GGUF metadata of one of the family's `general.architecture`s."""
        ...

    # -- weights (weights/loader.py) ----------------------------------------------------------------------------
    @staticmethod
    def gguf_to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor] | None:
        """A GGUF tensor as (Hugging Face name, tensor in HF layout); None for tensors the model does not use."""
        ...

    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Copy one checkpoint tensor (HF name) into its parameter; returns the region it filled."""
        ...

    def expected_weights(self) -> set[str]:
        """Every region load_weight must fill."""
        ...

    @classmethod
    def random(cls, config: ModelConfig, seed: int) -> CausalLM | None:
        """A float32 model of `config` with the family's own random initialisation from `seed` (random-weight
        presets, weights/preset.py); None where the family has none (then nothing is allocated)."""
        return None

    # -- running (engine/runner.py) -----------------------------------------------------------------------------
    def forward(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        """Logits [N, vocab] float32 of the rows `batch.logits_indices`; `kv` None runs without a cache."""
        ...

    def __call__(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        ...

    # -- optional: whole decoder layers as one kernel op ----------------------------------------------------------
    def enable_fused_layers(self, kv_dtype: torch.dtype | None) -> str | None:
        """Run the steps it can (decode steps, prefill steps of short prompts) as one kvengine op per decoder layer,
        reading the engine's pool, whose plain dtype (cache/pool.py plain_kv_dtype, asked before the pool is
        allocated) is `kv_dtype`. Returns "" when enabled, else why not (for the run summary); None where the family
        has no such path and nothing to say about it."""
        return None

    @property
    def fused_layers_enabled(self) -> bool:
        """Whether enable_fused_layers enabled that path (the runner then plans the steps it takes)."""
        return False

    def fused_layers_read(self, pool: KVPool) -> bool:
        """Whether that path is enabled and its op reads `pool` (a runner's pool may not be the engine's)."""
        return False

"""DecoderLM: the decoder loop every family shares, and Ropes, the RoPE tables a step hands to each layer.

forward embeds the step's tokens, runs every layer as `layer(x, batch, kv, rope)`, normalizes the rows that are
sampled and projects them to logits. A family subclasses DecoderLM, builds `layers`, `norm` and `lm_head`, and
overrides the hooks where it differs: `embed` (Gemma's scale, GPT-2's learned positions), `layer_ropes` (none,
one base, or Gemma's local and global bases) and `logits` (Gemma's soft-capping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.layers.linear import Linear
from kvengine.layers.rotary import RotaryEmbedding
from kvengine.models.common import CheckpointWeights
from kvengine.models.protocol import CausalLM

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, head_dim] for the step's positions


@dataclass(slots=True)
class Ropes:
    """One RoPE base's tables for a step: at the tokens' text positions, and (with attention sinks) at their
    cache positions, for the scores against sink keys (cache/retention.py)."""

    text: Rope
    cache: Rope | None = None

    @staticmethod
    def for_batch(rotary: RotaryEmbedding, batch: StepBatch) -> Ropes:
        end = batch.max_context_len
        cache = rotary.table(batch.sink_positions, end) if batch.sink_positions is not None else None
        return Ropes(rotary.table(batch.positions, end), cache)


def tied_head(config: ModelConfig, embed: torch.nn.Embedding, dtype: torch.dtype) -> Linear:
    """The LM head [vocab, hidden]: sharing the token embeddings' weight where the config ties them."""
    head = Linear(config.hidden_size, config.vocab_size, False, dtype)
    if config.tie_word_embeddings:
        head.weight = embed.weight
    return head


class DecoderLM(CheckpointWeights, torch.nn.Module, CausalLM):
    """forward(batch, kv) -> logits of the rows `batch.logits_indices`: [N, vocab]."""

    embed_tokens: torch.nn.Embedding  # [vocab, hidden]
    layers: torch.nn.ModuleList  # each called as layer(x [T, hidden], batch, kv, rope) -> [T, hidden]
    norm: torch.nn.Module  # the final norm
    lm_head: Linear

    def forward(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        x = self.embed(batch)  # [T, hidden]
        for layer, rope in zip(self.layers, self.layer_ropes(batch), strict=True):
            x = layer(x, batch, kv, rope)
        x = self.norm(x[batch.logits_indices])  # [N, hidden]: only rows that are sampled
        return self.logits(x)  # [N, vocab]

    def embed(self, batch: StepBatch) -> torch.Tensor:
        """The step's tokens as vectors [T, hidden]."""
        return self.embed_tokens(batch.input_ids)

    def layer_ropes(self, batch: StepBatch) -> Sequence[Ropes | None]:
        """Per layer, the RoPE tables it rotates q and k with (made once per step); None without RoPE."""
        return [None] * len(self.layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized rows [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(x).float()

"""Teacher-forced perplexity through the engine's cached path, for any KV dtype.

The token stream is prefilled chunk by chunk into a paged pool of the chosen KV dtype (blocks from the
BlockManager, the forward from the ModelRunner), so every chunk attends over keys and values that went
through the quantized store. Row i of a chunk's logits predicts the token after position start + i.
`chunk_size=1` is the decode path: every token is predicted by a query that reads only stored K/V.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.batch import StepBatch
from kvengine.cache.block_manager import BlockManager
from kvengine.cache.pool import KVPool, sequence_index
from kvengine.engine.runner import ModelRunner
from kvengine.errors import ConfigError

DEFAULT_CHUNK = 256


@dataclass(slots=True)
class Perplexity:
    kv_dtype: str
    tokens: int  # predicted tokens (the stream's length - 1)
    nll: float  # summed negative log-likelihood, nats

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def chunk_logits(model: torch.nn.Module, token_ids: Sequence[int], kv_dtype: str, chunk_size: int = DEFAULT_CHUNK,
                 block_size: int = 16, device: torch.device | str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """(start, logits float32 [n, vocab]) for each chunk of `token_ids`, prefilled through a `kv_dtype` pool."""
    if len(token_ids) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be at least 1, got {chunk_size}")
    limit = model.config.max_position_embeddings
    if len(token_ids) > limit:
        raise ConfigError(f"{len(token_ids)} tokens exceed the model's context of {limit}")
    spec = kv_cache_spec_for(model.config, kv_dtype, block_size)
    bm = BlockManager(-(-len(token_ids) // block_size), block_size, enable_prefix_caching=False)
    bm.allocate(0, token_ids)
    table = bm.block_table(0)
    runner = ModelRunner(model, KVPool.allocate(spec, bm.num_blocks, device), bm, device)
    dev = torch.device(device)
    for start in range(0, len(token_ids), chunk_size):
        end = min(start + chunk_size, len(token_ids))
        n = end - start
        index = sequence_index(table, end, block_size, dev)
        batch = StepBatch(
            input_ids=torch.tensor(token_ids[start:end], dtype=torch.int64, device=dev),  # [n]
            positions=torch.arange(start, end, dtype=torch.int64, device=dev),  # [n]
            query_start_loc=[0, n],
            context_lens=[end],
            logits_indices=torch.arange(n, dtype=torch.int64, device=dev),  # [n]: every row is scored
            slot_mapping=torch.tensor([bm.slot(0, p) for p in range(start, end)], dtype=torch.int64,
                                      device=dev),  # [n]
            block_tables=[table],
            kv_index=[index],
        )
        yield start, runner.run(batch)


def chunk_nll(logits: torch.Tensor, token_ids: Sequence[int], start: int) -> torch.Tensor:
    """Negative log-likelihood of each next token a chunk's logits predict: [n] (the stream's last row has no
    next token and is dropped)."""
    targets = torch.tensor(token_ids[start + 1:start + 1 + logits.shape[0]], dtype=torch.int64,
                           device=logits.device)  # [m <= n]
    logp = torch.log_softmax(logits[:len(targets)].float(), dim=-1)  # [m, vocab]
    return -logp.gather(1, targets[:, None])[:, 0]


def perplexity(model: torch.nn.Module, token_ids: Sequence[int], kv_dtype: str, chunk_size: int = DEFAULT_CHUNK,
               block_size: int = 16, device: torch.device | str = "cpu") -> Perplexity:
    """Perplexity of `model` on `token_ids` with its KV cache stored as `kv_dtype`."""
    nll = 0.0
    for start, logits in chunk_logits(model, token_ids, kv_dtype, chunk_size, block_size, device):
        nll += float(chunk_nll(logits, token_ids, start).sum())
    return Perplexity(kv_dtype, len(token_ids) - 1, nll)

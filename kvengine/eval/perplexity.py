"""Teacher-forced perplexity through the engine's cached path, for any KV dtype.

The token stream is prefilled chunk by chunk into a paged pool of the chosen KV dtype (`ModelRunner.for_scoring`
and `score_chunk`: the engine's block tables and forward), so every chunk attends over keys and values that went
through the quantized store. Row i of a chunk's logits predicts the token after position start + i.
`chunk_size=1` is the decode path: every token is predicted by a query that reads only stored K/V.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.cache.retention import max_blocks
from kvengine.engine.runner import ModelRunner
from kvengine.engine.sequence import Sequence as Seq
from kvengine.errors import ConfigError
from kvengine.sampling import SamplingParams

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
                 block_size: int = 16, device: torch.device | str = "cpu", kv_window: int | None = None,
                 sink_tokens: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, logits float32 [n, vocab]) for each chunk of `token_ids`, prefilled through a `kv_dtype` pool."""
    for step in score_chunks(model, token_ids, kv_dtype, chunk_size, block_size, device, kv_window, sink_tokens):
        yield step.start, step.logits


@dataclass(slots=True)
class ScoredChunk:
    start: int  # the chunk's first position
    logits: torch.Tensor  # [n, vocab] float32: row i predicts the token after position start + i
    blocks_held: int  # KV blocks the sequence holds after the chunk
    kv_bytes: float  # what those blocks take
    seconds: float  # the chunk's forward pass


def score_chunks(model: torch.nn.Module, token_ids: Sequence[int], kv_dtype: str, chunk_size: int = DEFAULT_CHUNK,
                 block_size: int = 16, device: torch.device | str = "cpu", kv_window: int | None = None,
                 sink_tokens: int = 0) -> Iterator[ScoredChunk]:
    """Prefill `token_ids` chunk by chunk through a pool of `kv_dtype` and the engine's block tables; with
    `kv_window` (and `sink_tokens`) the cache is bounded as in the engine and the text may outrun the model's
    context. Yields each chunk's logits with the blocks held and the time taken."""
    if len(token_ids) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be at least 1, got {chunk_size}")
    limit = model.config.max_position_embeddings
    if kv_window is None and len(token_ids) > limit:
        raise ConfigError(f"{len(token_ids)} tokens exceed the model's context of {limit}")
    spec = replace(kv_cache_spec_for(model.config, kv_dtype, block_size), kv_window=kv_window,
                   sink_tokens=sink_tokens)
    runner = ModelRunner.for_scoring(model, spec, max_blocks(spec.groups, len(token_ids), chunk_size, block_size),
                                     device)  # a pool sized for the whole text
    seq = Seq(0, list(token_ids), SamplingParams(max_tokens=1))
    for start in range(0, len(token_ids), chunk_size):
        t0 = time.perf_counter()
        logits = runner.score_chunk(seq, min(chunk_size, len(token_ids) - start))
        seconds = time.perf_counter() - t0
        held = runner.block_tables.num_held(seq.seq_id)
        yield ScoredChunk(start, logits, held, held * spec.bytes_per_block, seconds)


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

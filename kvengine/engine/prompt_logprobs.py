"""Prompt log-probabilities (SamplingParams.prompt_logprobs, the completions API's `echo` with `logprobs`).

Prefill computes every prompt position's hidden state anyway; only the sampled row usually goes through the LM
head. A request that asks for prompt log-probabilities has its prompt rows go through it too: row p (position p)
predicts prompt token p + 1, so a prompt of P tokens adds P - 1 rows, one more LM-head matmul over them and a
log-softmax of the raw logits (no penalties or temperature: what the model says about the text, as vLLM
reports it). The first prompt token has no log-probability (nothing predicts it).

A cached prefix was never computed in this process's step, so its rows do not exist: such a request skips prefix
reuse at admission (its blocks are still registered for others afterwards), and on a re-admission after
preemption, when its prompt log-probabilities are complete, reuses again.
"""

from __future__ import annotations

import torch

from kvengine.engine.sequence import Sequence
from kvengine.sampling import token_logprob


def prompt_rows(seq: Sequence, start: int, n: int) -> range:
    """Positions among start .. start + n - 1 whose logits row gives a prompt log-probability still missing."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1))


def record(seq: Sequence, positions: range, logits: torch.Tensor) -> None:
    """Append the log-probabilities of prompt tokens positions + 1 from their rows' logits [len(positions), vocab]."""
    assert positions.start == len(seq.prompt_logprobs), "prompt rows arrive in order"
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, vocab]
    k = seq.params.prompt_logprobs or 0
    for row, p in zip(logp, positions, strict=True):
        seq.prompt_logprobs.append(token_logprob(row, seq.prompt_token_ids[p + 1], k))


def split_rows(items: list[tuple[Sequence, range, bool]], logits: torch.Tensor) -> torch.Tensor:
    """Take each item's prompt rows out of a step's logits (they come first, then its sampled row when the bool
    says it has one), record them, and return the sampled rows [S, vocab]."""
    if not any(positions for _, positions, _ in items):
        return logits
    keep: list[int] = []
    row = 0
    for seq, positions, sampled in items:
        if positions:
            record(seq, positions, logits[row:row + len(positions)])
            row += len(positions)
        if sampled:
            keep.append(row)
            row += 1
    return logits[keep]

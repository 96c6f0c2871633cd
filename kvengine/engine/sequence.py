"""Sequence: one request's tokens, progress through the KV cache, and timings.

Invariant: KV for positions < num_computed_tokens is in the pool (cached mode). A step computes
positions num_computed_tokens .. num_computed_tokens + n - 1; when that reaches len(token_ids), the
step's last logits row samples the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvengine.sampling import SamplingParams, TokenLogprob
from kvengine.structured import Constraint


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    ERROR = "error"  # this sequence's part of a step failed (the others in the step went on)


@dataclass(slots=True)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    use_cache: bool = True
    cache_salt: str | None = None
    record_logits: bool = False  # keep every sampled step's logits (verify mode)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None  # why the sequence failed (FinishReason.ERROR)
    generator: torch.Generator | None = None
    # prefix cache
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at (first) admission
    num_disk_tokens: int = 0  # of those: loaded from the KV disk tier
    disk_bytes_read: int = 0
    disk_load_s: float = 0.0  # reading, verifying and copying them into the pool
    miss_reason: str | None = None
    num_preemptions: int = 0
    admitted: bool = False
    blocks_at_finish: int = 0
    # timings (time.perf_counter seconds)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    step_logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token (params.logprobs set)
    # one per prompt token after the first (params.prompt_logprobs set): engine/prompt_logprobs.py
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: Constraint | None = None  # where its text is in its grammar (params.structured set)
    # FLOPs actually computed for this sequence (matmul convention, accounted per step)
    flops: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def reuses_prefix(self) -> bool:
        """Its prompt may come from the prefix cache: it asks for no prompt log-probabilities, or has them all."""
        return self.params.prompt_logprobs is None or len(self.prompt_logprobs) >= self.num_prompt_tokens - 1

    @property
    def in_prefill(self) -> bool:
        """More than one token still to compute (prompt, or the whole text again after preemption)."""
        return self.num_uncomputed > 1

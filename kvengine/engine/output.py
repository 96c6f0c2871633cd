"""What a request returns: text so far (streamed without broken characters or stop strings), token ids,
finish reason, and the metrics the engine reports beside every run (timings, cache reuse, FLOPs, bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvengine.engine.detokenizer import IncrementalDetokenizer
from kvengine.engine.sequence import FinishReason, Sequence
from kvengine.sampling import TokenLogprob
from kvengine.tools.call import ToolCall
from kvengine.weights.tokenizer import Tokenizer


@dataclass(slots=True)
class VerifyReport:
    """A request recomputed without any cache, compared with the cached run, step by step."""

    tokens_checked: int
    max_abs_logit_diff: float
    first_divergence: int | None  # index of the first generated token whose no-cache argmax differs
    tolerance: float
    # at that token: how far the no-cache run's best logit lies above its logit for the token the cached run
    # chose (within `tolerance`: a near-tie that rounding flipped)
    divergence_margin: float | None = None

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and self.max_abs_logit_diff <= self.tolerance


@dataclass(slots=True)
class RequestMetrics:
    use_cache: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix cache
    computed_prompt_tokens: int
    miss_reason: str | None  # why the rest of the prompt was not reused (see BlockManager.MissReason)
    blocks_held: int
    kv_cache_bytes: int  # bytes of the KV blocks this request held at the end
    ttft_s: float | None
    decode_tokens_per_s: float | None
    total_s: float
    queue_s: float | None
    num_preemptions: int
    flops: int  # matmul FLOPs the engine spent on this request
    flops_no_cache: int  # what a no-cache run of the same request computes
    # the KV disk tier (cache/disk_tier.py): of cached_tokens, those loaded from disk, and what that cost
    disk_tokens: int = 0
    disk_bytes_read: int = 0
    disk_load_s: float = 0.0
    # what recomputing the reused tokens would have cost: FLOPs (from memory, from disk) and the seconds the
    # engine's measured prefill rate predicts (None before any prefill was timed)
    reuse_flops_memory: int = 0
    reuse_flops_disk: int = 0
    recompute_s: float | None = None
    # prompt log-probabilities (SamplingParams.prompt_logprobs): their only cost is the LM head over the prompt's
    # rows, whose hidden states the prefill computed anyway (engine/prompt_logprobs.py); 0 when not asked for
    prompt_logprobs_flops: int = 0

    @property
    def memory_tokens(self) -> int:
        return self.cached_tokens - self.disk_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_tokens": self.memory_tokens}


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    verify: VerifyReport | None = None
    error: str | None = None  # set when finish_reason is "error": this request failed, the others did not
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids (when asked for)
    delta_logprobs: list[TokenLogprob] | None = None  # one per token of delta_token_ids
    # one per prompt token, the first None (nothing predicts it), when SamplingParams.prompt_logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None
    tool_calls: list[ToolCall] | None = None  # the calls its text makes (LLM.chat with tools)


class TextTracker:
    """Detokenizes one request's new tokens, finds stop strings, and holds back text that might still
    turn out to be the start of a stop string, so streamed text never has to be taken back."""

    def __init__(self, tokenizer: Tokenizer, seq: Sequence) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids)
        self.stops = seq.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all final text (stop string excluded)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add(self, token_id: int, hide: bool = False) -> None:
        """Add one token's text (`hide`: a stop token, whose text is not part of the output)."""
        piece = self.detok.add(token_id)
        if not hide:
            self._extend(piece)

    def finish(self) -> None:
        if not self.stopped:
            self._extend(self.detok.flush())

    def _extend(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        start = max(0, len(self.text) - self.holdback)
        self.text += piece
        hits = [at for stop in self.stops if (at := self.text.find(stop, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """Text that is safe to hand out now (everything when the request is final)."""
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def finish_reason_name(reason: FinishReason | None) -> str | None:
    return reason.value if reason is not None else None

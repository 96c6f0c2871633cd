"""SamplingParams (what a request asks for) and Sampler (logits -> next token ids, with log-probabilities).

Each row's logits are first processed (min_tokens masks, logit_bias, repetition / presence / frequency
penalties), then greedy takes the argmax; otherwise temperature, top-k, top-p (nucleus) and min-p shape the
distribution and a draw comes from the request's own generator when a seed is given, so a seeded request
gives the same text every time. Reported log-probabilities are those of the distribution actually used: the
processed logits' log-softmax for greedy, the final (truncated, renormalized) distribution when sampling.

Rows are independent: a row that fails (non-finite logits, a bad value that slipped past validation) yields
its exception in place of a token and every other row is sampled normally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvengine.errors import RequestError, first_outside_vocab
from kvengine.structured import StructuredOutput

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit)
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (vLLM's epsilon): dividing by it would overflow
TRUNCATED_LOGPROB = -9999.0  # what OpenAI reports for a token the sampler could not pick
ARGMAX_CHUNKS = (256, 128, 64, 32)  # row_argmax's chunk widths, widest first: the first that divides the vocabulary


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    """A RequestError naming `name` unless lo <= value <= hi (lo < value when lo_open) and value is finite."""
    _finite(name, value)
    if value > hi or value < lo or (lo_open and value == lo):
        raise RequestError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", param=name)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0  # drop tokens below min_p * the top token's probability
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # end-of-sequence and stop tokens are masked until this many tokens are out
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated text (OpenAI)
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt + output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the top k alternatives
    structured: StructuredOutput | None = None  # the text must follow this grammar (kvengine/structured.py)
    # None: none; k: each prompt token's log-probability (the first has none) and the top k alternatives, from the
    # raw logits of the prefill's rows (the request then skips prefix reuse: engine/prompt_logprobs.py)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        _finite("temperature", self.temperature)
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        check_range("top_p", self.top_p, 0, 1, lo_open=True)
        check_range("min_p", self.min_p, 0, 1)
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's ranges
            check_range(name, getattr(self, name), -2, 2)
        check_range("repetition_penalty", self.repetition_penalty, 0.01, 2)  # (dividing by less overflows)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                               param="min_tokens")
        for value in self.logit_bias.values():
            check_range("logit_bias", value, -100, 100)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                               param="prompt_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def plain(self) -> bool:
        """Greedy with nothing to process or report: the batched argmax path."""
        return (self.greedy and self.logprobs is None and not self.logit_bias and self.min_tokens == 0
                and self.structured is None
                and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the parameters name must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
            bad = first_outside_vocab(ids, vocab_size)
            if bad is not None:
                raise RequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=name)


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs about one sequence besides its logits."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    end_ids: Sequence[int] = ()  # end-of-sequence ids this sequence stops at (masked before min_tokens)
    allowed: torch.Tensor | None = None  # [vocab] bool: the only tokens its grammar accepts next


@dataclass(slots=True)
class TokenLogprob:
    """One sampled token's log-probability and the top alternatives (token id, log-probability), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Sample:
    token_id: int
    logprob: TokenLogprob | None = None


def processed_logits(row: torch.Tensor, r: SampleRow) -> torch.Tensor:
    """[vocab] float32 logits after the grammar's mask, min_tokens masks, logit_bias and the penalties."""
    p = r.params
    x = row.float().cpu().clone()  # [vocab]
    if r.allowed is not None:
        x = x.masked_fill(~r.allowed, float("-inf"))
    if p.min_tokens and len(r.output_ids) < p.min_tokens:
        ends = [t for t in (*r.end_ids, *p.stop_token_ids) if 0 <= t < x.shape[0]]
        if ends:
            x[torch.tensor(ends)] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.int64)  # [B]
        x.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=torch.float32))
    if p.repetition_penalty != 1:
        seen = torch.tensor([*r.prompt_ids, *r.output_ids], dtype=torch.int64).unique()  # [U]
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
        counts = torch.bincount(torch.tensor(list(r.output_ids), dtype=torch.int64), minlength=x.shape[0])
        counts = counts[: x.shape[0]].float()  # [vocab]
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return x


def sampling_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[vocab] weights to draw from: temperature, then top-k, top-p and min-p truncation."""
    x = x / p.temperature
    if 0 < p.top_k < x.shape[0]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        drop[0] = False  # (a top_p below float32's range rounds to 0 in the comparison)
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs  # not renormalized after truncation: torch.multinomial does not need it


def token_logprob(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's log-probability and the top k of `logp` [vocab] (-inf reported as OpenAI does)."""
    def clean(v: float) -> float:
        return v if math.isfinite(v) else TRUNCATED_LOGPROB
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logp, k)
        top = [(int(i), clean(float(v))) for i, v in zip(ids, values, strict=True)]
    return TokenLogprob(token, clean(float(logp[token])), top)


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row of logits [N, vocab]: are all its values finite? A row's sum is finite when they are (NaN and +-inf
    carry into it), so only a row whose sum is not (a non-finite value, or finite ones whose sum overflows) is
    checked value by value: one reduction over the logits instead of isfinite's several passes."""
    ok = logits.sum(dim=-1).isfinite().tolist()  # [N]
    for i in [i for i, f in enumerate(ok) if not f]:
        ok[i] = bool(torch.isfinite(logits[i]).all())
    return ok


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, vocab] -> [N] int64: each row's first index of its maximum, as `argmax` gives it for a finite row.
    PyTorch's CPU argmax walks a row one value at a time while its max reduction is vectorized, so the row's first
    chunk of C columns that holds the row's max is found among vocab / C chunk maxima, then the index inside it."""
    n, vocab = logits.shape
    c = next((c for c in ARGMAX_CHUNKS if vocab % c == 0), None)
    if c is None or n == 0:
        return logits.argmax(dim=-1)
    chunks = logits.reshape(n, vocab // c, c)  # [N, vocab / C, C]
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [N]: the first chunk that holds the row's max
    inside = chunks[torch.arange(n, device=logits.device), best].argmax(dim=-1)  # [N]
    return best * c + inside


class Sampler:
    """Chooses one token per logits row, each row under its own request's parameters."""

    def __init__(self, seed: int = 0) -> None:
        self._default = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[Sample | Exception]:
        """logits [N, vocab] -> N samples; a row that fails gives its exception and leaves the others alone."""
        finite = finite_rows(logits)  # [N]
        argmax = row_argmax(logits).tolist()  # [N]
        out: list[Sample | Exception] = []
        for i, r in enumerate(rows):
            try:
                if not finite[i]:
                    raise FloatingPointError("the model produced non-finite logits for this sequence")
                out.append(Sample(argmax[i]) if r.params.plain else self.sample_row(logits[i], r))
            except Exception as e:  # noqa: BLE001 - isolated to this row's request
                out.append(e)
        return out

    def sample_row(self, row: torch.Tensor, r: SampleRow) -> Sample:
        p = r.params
        x = processed_logits(row, r)  # [vocab]
        if p.greedy:
            token = int(x.argmax())
            logp = torch.log_softmax(x, dim=-1) if p.logprobs is not None else None
        else:
            probs = sampling_probs(x, p)
            token = int(torch.multinomial(probs, 1, generator=r.generator or self._default).item())
            logp = (probs / probs.sum()).log() if p.logprobs is not None else None
        return Sample(token, token_logprob(logp, token, p.logprobs) if logp is not None else None)

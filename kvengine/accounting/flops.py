"""Matmul FLOPs of one forward step and of a whole completion, with and without the KV cache.

Counting convention (`FLOP_CONVENTION`, named in every output): a matmul of an (m×n) by an (n×p) matrix
costs 2·m·n·p FLOPs, one multiply and one add per term. Only matmuls go into a total. Norms, softmax,
activations, residual and bias adds and position encodings are estimated apart (`ExtraFlops`) and never
mixed into it.

Completion conventions (`CONVENTIONS`):
- "exact": every matmul of every step from the model's real shapes (GQA, gated MLP, sliding windows).
  Without the cache each step runs the whole sequence through every layer; with it the prompt is
  prefilled once, then one position goes through per step.
- "kv-only": seed 004's closed form. Each of the s = prompt + new - 1 positions fed to the model is one
  step that computes only its own query; without the cache only K and V of the older positions are
  recomputed; QK^T and attention x V are left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kvengine.config import ModelConfig
from kvengine.errors import ConfigError

FLOP_CONVENTION = "2·m·n·p FLOPs per (m×n)·(n×p) matmul; norms, softmax and adds not included"
CONVENTIONS = ("exact", "kv-only")
LM_HEAD_MODES = ("all", "last")  # LM head over every position of a forward pass, or only its last one
# The keys each query may see, or the whole rectangle a masked dense kernel computes.
ATTENTION_MODES = ("causal", "dense")

MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "qk", "av", "mlp_gate", "mlp_up", "mlp_down", "lm_head")
LABELS = {"q_proj": "Q projection", "k_proj": "K projection", "v_proj": "V projection",
          "o_proj": "output projection", "qk": "QK^T", "av": "attention × V", "mlp_gate": "MLP gate",
          "mlp_up": "MLP up", "mlp_down": "MLP down", "lm_head": "LM head"}
PLAIN_MLP_LABELS = {"mlp_up": "MLP fc (up)", "mlp_down": "MLP proj (down)"}

# Rough operation counts per element for the extras (estimates, never part of a matmul total).
RMS_NORM_OPS = 4  # square, accumulate, scale by rsqrt, multiply by the weight
LAYER_NORM_OPS = 5  # the same plus the mean subtraction (the bias add is in `adds`)
SOFTMAX_OPS = 5  # per score: scale, max, exp of the difference, sum, divide
ACTIVATION_OPS = 4  # SiLU / GELU per element (the gate multiply of a gated MLP is one more)
ROPE_OPS = 3  # per element of q and k: two multiplies and an add


def matmul_flops(m: int, n: int, p: int) -> int:
    """FLOPs of an (m×n)·(n×p) matmul under `FLOP_CONVENTION`."""
    return 2 * m * n * p


def require_positive(value: object, name: str) -> int:
    """`value` if it is an integer >= 1, else a one-line ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
    return value


@dataclass(slots=True)
class ExtraFlops:
    """Estimated non-matmul work of a step (per-element op counts above); never part of `StepFlops.total`."""

    norms: int = 0
    softmax: int = 0
    activation: int = 0
    adds: int = 0  # residual adds and bias adds
    positions: int = 0  # RoPE on q and k, or the learned position-embedding add

    @property
    def total(self) -> int:
        return self.norms + self.softmax + self.activation + self.adds + self.positions

    def to_dict(self) -> dict[str, int]:
        return {"norms": self.norms, "softmax": self.softmax, "activation": self.activation,
                "adds": self.adds, "positions": self.positions, "total": self.total}


@dataclass(slots=True)
class StepFlops:
    """Matmul FLOPs of one forward step, per component, summed over all layers."""

    config: ModelConfig = field(repr=False)
    new_tokens: int
    context_len: int
    lm_head_tokens: int
    attention: str = "causal"
    pairs: int = 0  # query-key pairs of one head, summed over layers (what QK^T and attention × V scale with)
    q_proj: int = 0
    k_proj: int = 0
    v_proj: int = 0
    o_proj: int = 0
    qk: int = 0
    av: int = 0
    mlp_gate: int = 0  # 0 for a plain two-matmul MLP (GPT-2/3): mlp_up is its fc, mlp_down its proj
    mlp_up: int = 0
    mlp_down: int = 0
    lm_head: int = 0
    extra: ExtraFlops = field(default_factory=ExtraFlops)

    @property
    def total(self) -> int:
        """Matmul FLOPs only."""
        return sum(getattr(self, name) for name in MATMULS)

    def components(self) -> dict[str, int]:
        names = MATMULS if self.config.gated_mlp else tuple(n for n in MATMULS if n != "mlp_gate")
        return {name: getattr(self, name) for name in names}

    def label(self, name: str) -> str:
        return (LABELS if self.config.gated_mlp else {**LABELS, **PLAIN_MLP_LABELS})[name]

    def as_rows(self) -> list[tuple[str, str, int, int]]:
        """(component, its matmul in one layer, how many times, FLOPs), as in seed 000's sheets."""
        shapes = _shapes(self.config, self.new_tokens, self.context_len, self.lm_head_tokens, self.attention)
        return [(self.label(name), shapes[name], 1 if name == "lm_head" else self.config.num_layers, flops)
                for name, flops in self.components().items()]

    def to_dict(self) -> dict[str, Any]:
        return {"new_tokens": self.new_tokens, "context_len": self.context_len,
                "lm_head_tokens": self.lm_head_tokens, "attention": self.attention, **self.components(),
                "total": self.total, "extra": self.extra.to_dict()}


def _keys_seen(new_tokens: int, context_len: int, window: int | None, attention: str) -> int:
    """Query-key pairs of one head in one layer. Causal: new position i (0-based) sees
    context_len - new_tokens + i + 1 keys, at most `window`. Dense: every new position against every key
    any of them sees."""
    first = context_len - new_tokens + 1  # keys the first new position sees
    if attention == "dense":
        return new_tokens * (context_len if window is None else min(context_len, window + new_tokens - 1))
    if window is None or window >= context_len:
        return (first + context_len) * new_tokens // 2
    if first > window:
        return new_tokens * window
    uncapped = window - first + 1  # positions that see fewer than `window` keys (or exactly it)
    return (first + window) * uncapped // 2 + (new_tokens - uncapped) * window


@lru_cache(maxsize=64)
def _window_counts(windows: tuple[int | None, ...], num_layers: int) -> tuple[tuple[int | None, int], ...]:
    """(window or None, how many layers have it): layers that see the same keys are counted once."""
    return tuple(Counter(windows or (None,) * num_layers).items())


def _pairs(config: ModelConfig, n: int, c: int, attention: str) -> int:
    """Query-key pairs of one head, summed over every layer (sliding windows respected)."""
    return sum(count * _keys_seen(n, c, w, attention)
               for w, count in _window_counts(config.layer_windows, config.num_layers))


def step_flops(config: ModelConfig, new_tokens: int, context_len: int, lm_head_tokens: int | None = None,
               *, attention: str = "causal") -> StepFlops:
    """Matmul FLOPs of one forward step computing `new_tokens` positions, the last of which sees `context_len`
    keys; sliding-window layers see at most their window. The LM head runs over `lm_head_tokens` positions
    (default: every new position, as seed 000's no-cache sheets count it)."""
    n = require_positive(new_tokens, "new_tokens")
    c = require_positive(context_len, "context_len")
    if c < n:
        raise ConfigError(f"context_len ({c}) must be at least new_tokens ({n})")
    lm = n if lm_head_tokens is None else lm_head_tokens
    if isinstance(lm, bool) or not isinstance(lm, int) or not 0 <= lm <= n:
        raise ConfigError(f"lm_head_tokens must be between 0 and new_tokens ({n}), got {lm!r}")
    require_choice(attention, ATTENTION_MODES, "attention mode")
    return _build(config, n, c, lm, _pairs(config, n, c, attention), attention)


@lru_cache(maxsize=4096)
def step_total(config: ModelConfig, new_tokens: int, context_len: int, lm_head_tokens: int) -> int:
    """`step_flops(...).total`, remembered: the engine counts every sequence's every step, and a decode step at one
    context length costs the same for every sequence of a batch."""
    return step_flops(config, new_tokens, context_len, lm_head_tokens).total


def span_flops(config: ModelConfig, start: int, stop: int) -> int:
    """Matmul FLOPs of computing positions start .. stop - 1 in one step after `start` cached ones, no LM head:
    what a prefix reused from a cache would cost to recompute (0 for an empty span)."""
    return step_flops(config, stop - start, stop, lm_head_tokens=0).total if stop > start else 0


def _build(config: ModelConfig, n: int, c: int, lm: int, pairs: int, attention: str) -> StepFlops:
    """Every component from the counts it is linear in: positions `n`, LM-head positions `lm`, query-key
    `pairs` summed over layers. Linear, so the sums of several steps' counts give their summed FLOPs."""
    d, q, kv, ff = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    layers = config.num_layers
    per_pair = config.num_heads * matmul_flops(1, config.head_dim, 1)  # one query-key pair, every head
    return StepFlops(
        config=config, new_tokens=n, context_len=c, lm_head_tokens=lm, attention=attention, pairs=pairs,
        q_proj=layers * matmul_flops(n, d, q),
        k_proj=layers * matmul_flops(n, d, kv),
        v_proj=layers * matmul_flops(n, d, kv),
        o_proj=layers * matmul_flops(n, q, d),
        qk=per_pair * pairs,
        av=per_pair * pairs,
        mlp_gate=layers * matmul_flops(n, d, ff) if config.gated_mlp else 0,
        mlp_up=layers * matmul_flops(n, d, ff),
        mlp_down=layers * matmul_flops(n, ff, d),
        lm_head=matmul_flops(lm, d, config.vocab_size),
        extra=_extra(config, n, pairs),
    )


def _extra(config: ModelConfig, n: int, keys: int) -> ExtraFlops:
    d, q, kv, layers = config.hidden_size, config.q_size, config.kv_size, config.num_layers
    norm_ops = LAYER_NORM_OPS if config.layer_norm else RMS_NORM_OPS
    norms = norm_ops * n * d * (config.norms_per_layer * layers + 1)
    norms += norm_ops * layers * n * (q + kv) * config.qk_norm  # over every head of q and k
    return ExtraFlops(
        norms=norms,
        softmax=SOFTMAX_OPS * config.num_heads * keys,
        activation=(ACTIVATION_OPS + config.gated_mlp) * layers * n * config.intermediate_size,
        adds=layers * n * (2 * d + config.layer_biases),
        positions=n * d if config.learned_positions else ROPE_OPS * layers * n * (q + kv),
    )


def _shapes(config: ModelConfig, n: int, c: int, lm: int, attention: str) -> dict[str, str]:
    """The matmul each component does in one (global) layer, for tables."""
    d, q, kv, ff, h, hd = (config.hidden_size, config.q_size, config.kv_size, config.intermediate_size,
                           config.num_heads, config.head_dim)
    note = " causal" if attention == "causal" and n > 1 else ""
    capped = [w for w in config.layer_windows if w is not None and w < c]
    if capped:
        note += f", ≤{'/'.join(str(w) for w in sorted(set(capped)))} keys in {len(capped)} layers"
    return {"q_proj": f"[{n}×{d}]·[{d}×{q}]", "k_proj": f"[{n}×{d}]·[{d}×{kv}]",
            "v_proj": f"[{n}×{d}]·[{d}×{kv}]", "o_proj": f"[{n}×{q}]·[{q}×{d}]",
            "qk": f"{h}×[{n}×{hd}]·[{hd}×{c}]{note}",
            "av": f"{h}×[{n}×{c}]·[{c}×{hd}]{note}", "mlp_gate": f"[{n}×{d}]·[{d}×{ff}]",
            "mlp_up": f"[{n}×{d}]·[{d}×{ff}]", "mlp_down": f"[{n}×{ff}]·[{ff}×{d}]",
            "lm_head": f"[{lm}×{d}]·[{d}×{config.vocab_size}]"}


def sum_steps(steps: list[StepFlops]) -> StepFlops:
    """Component-wise sum of steps of one model (positions, LM-head positions and pairs add up; the context
    is the largest)."""
    first = steps[0]
    return _build(first.config, sum(s.new_tokens for s in steps), max(s.context_len for s in steps),
                  sum(s.lm_head_tokens for s in steps), sum(s.pairs for s in steps), first.attention)


@dataclass(slots=True)
class CompletionFlops:
    """Matmul FLOPs of a whole completion (P prompt tokens, N new tokens) without and with the KV cache."""

    config: ModelConfig = field(repr=False)
    prompt_tokens: int
    new_tokens: int
    convention: str
    lm_head: str
    attention: str
    without_cache: int
    with_cache: int
    steps_without: list[int] = field(repr=False)  # FLOPs of each forward step, in order
    steps_with: list[int] = field(repr=False)
    without_components: StepFlops | None = field(default=None, repr=False)  # exact only: sums per component
    with_components: StepFlops | None = field(default=None, repr=False)

    @property
    def ratio(self) -> float:
        """How many times more FLOPs the no-cache run spends."""
        return self.without_cache / self.with_cache

    @property
    def saved(self) -> int:
        return self.without_cache - self.with_cache

    @property
    def reduction(self) -> float:
        """Fraction of the no-cache FLOPs the cache saves (seed 004's 'reduction percentage' / 100)."""
        return self.saved / self.without_cache

    def describe(self) -> str:
        """One line naming the conventions these numbers use."""
        if self.convention == "kv-only":
            s = self.prompt_tokens + self.new_tokens - 1
            return (f"kv-only (seed 004's closed form): each of s = {s} positions is one step with one query "
                    "and the LM head; without cache only K and V of older positions are recomputed; QK^T and "
                    "attention × V left out")
        head = "every position of each pass" if self.lm_head == "all" else "the last position of each pass"
        return (f"exact: every matmul; without cache the whole sequence runs through every layer each step; "
                f"LM head on {head}; attention {self.attention}")

    def to_dict(self, per_step: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "convention": self.convention, "description": self.describe(), "flop_convention": FLOP_CONVENTION,
            "lm_head": self.lm_head, "attention": self.attention, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "without_cache": self.without_cache, "with_cache": self.with_cache,
            "ratio": self.ratio, "reduction": self.reduction,
        }
        if self.without_components is not None and self.with_components is not None:
            out["without_cache_by_component"] = self.without_components.to_dict()
            out["with_cache_by_component"] = self.with_components.to_dict()
        if per_step:
            out["steps_without_cache"] = self.steps_without
            out["steps_with_cache"] = self.steps_with
        return out


Step = tuple[int, int, int]  # (new positions, context length, LM-head positions) of one forward pass


def completion_steps(prompt_tokens: int, new_tokens: int, lm_head: str = "all",
                     cached_prompt_tokens: int = 0) -> tuple[list[Step], list[Step]]:
    """The forward passes of a completion: (without cache, with cache), one per generated token.

    Without cache pass k (0-based) runs the whole sequence of prompt + k tokens. With cache pass 0
    prefills the prompt tokens not already cached, then each pass runs one position. LM head over every
    position of a pass ("all") or its last one ("last")."""
    def head(n: int) -> int:
        return n if lm_head == "all" else 1

    without = [(prompt_tokens + k, prompt_tokens + k, head(prompt_tokens + k)) for k in range(new_tokens)]
    prefill = prompt_tokens - cached_prompt_tokens
    with_ = [(prefill, prompt_tokens, head(prefill))]
    with_ += [(1, prompt_tokens + k, 1) for k in range(1, new_tokens)]
    return without, with_


def completion_flops(config: ModelConfig, prompt_tokens: int, new_tokens: int, convention: str = "exact",
                     lm_head: str = "all", *, attention: str = "causal") -> CompletionFlops:
    """FLOPs to generate `new_tokens` tokens after a `prompt_tokens`-token prompt, without and with the cache.

    `lm_head="all"` runs the LM head over every position of each pass (seed 000's sheets); "last" over the
    last one only. kv-only ignores `lm_head` and `attention` (its closed form has one LM head per step)."""
    p = require_positive(prompt_tokens, "prompt_tokens")
    n = require_positive(new_tokens, "new_tokens")
    require_choice(convention, CONVENTIONS, "FLOP convention")
    require_choice(lm_head, LM_HEAD_MODES, "LM head mode")
    require_choice(attention, ATTENTION_MODES, "attention mode")
    if convention == "kv-only":
        return _kv_only(config, p, n)
    without, with_ = ([step_flops(config, *step, attention=attention) for step in steps]
                      for steps in completion_steps(p, n, lm_head))
    return CompletionFlops(
        config=config, prompt_tokens=p, new_tokens=n, convention="exact", lm_head=lm_head,
        attention=attention, steps_without=[s.total for s in without], steps_with=[s.total for s in with_],
        without_cache=sum(s.total for s in without), with_cache=sum(s.total for s in with_),
        without_components=sum_steps(without), with_components=sum_steps(with_),
    )


def _kv_only(config: ModelConfig, prompt_tokens: int, new_tokens: int) -> CompletionFlops:
    """Seed 004: with cache s·(L·per-position + LM head); without cache also (2i-1)/2 positions' K and V
    per step i, whose sum over i = 1..s is the closed form's s²/2 (its integral of i)."""
    one = step_flops(config, 1, 1, 1)
    per_position = one.total - one.qk - one.av  # one position through every layer and the LM head
    kv = one.k_proj + one.v_proj  # K and V of one position in every layer (even: a sum of 2·m·n·p terms)
    s = prompt_tokens + new_tokens - 1
    steps_with = [per_position] * s
    steps_without = [per_position - kv + kv // 2 * (2 * i - 1) for i in range(1, s + 1)]
    return CompletionFlops(
        config=config, prompt_tokens=prompt_tokens, new_tokens=new_tokens, convention="kv-only",
        lm_head="last", attention="causal", without_cache=sum(steps_without), with_cache=sum(steps_with),
        steps_without=steps_without, steps_with=steps_with,
    )


def request_flops(config: ModelConfig, prompt_tokens: int, new_tokens: int,
                  cached_prompt_tokens: int = 0) -> tuple[int, int]:
    """(FLOPs the engine spends with the cache, FLOPs kvengine's no-cache baseline spends) for one request.

    With cache: prefill of the prompt tokens not already cached, LM head on the last position, then one
    position per generated token after the first. Without cache: the whole sequence through every layer at
    each step, LM head on the last position only. Exact convention, causal attention. A request that
    generated nothing (new_tokens 0) spent (0, 0)."""
    p = require_positive(prompt_tokens, "prompt_tokens")
    c = cached_prompt_tokens
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < p:
        raise ConfigError(f"cached_prompt_tokens must be between 0 and prompt_tokens - 1 ({p - 1}), "
                          f"got {c!r}")
    if new_tokens == 0:
        return 0, 0
    n = require_positive(new_tokens, "new_tokens")
    without, with_ = completion_steps(p, n, "last", c)
    return _total(config, with_), _total(config, without)


def _total(config: ModelConfig, steps: list[Step]) -> int:
    """Summed matmul FLOPs of many passes in one go (the components are linear in their counts)."""
    return _build(config, sum(s[0] for s in steps), max(s[1] for s in steps), sum(s[2] for s in steps),
                  sum(_pairs(config, n, c, "causal") for n, c, _ in steps), "causal").total

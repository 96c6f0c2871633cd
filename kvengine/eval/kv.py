"""`eval kv`: what a compact KV dtype costs in quality and buys in capacity, measured against the model's dtype.

For every KV dtype, on the same model and text:
- perplexity of a held text, teacher-forced through the paged pool (kvengine/eval/perplexity.py), its change,
  and the mean and max |logit difference| to the reference dtype over every position and vocabulary entry;
- greedy-token agreement: each prompt generated greedily for N tokens; how many leading tokens match the
  reference's;
- bytes per token (KVCacheSpec, scales included) and how many sequences of `seq_len` tokens the engine's
  scheduler admits at once into a pool of a fixed byte budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.cache.spec import kv_dtype as resolve_kv_dtype
from kvengine.errors import ConfigError
from kvengine.eval.perplexity import DEFAULT_CHUNK, Perplexity, chunk_logits, chunk_nll
from kvengine.sampling import SamplingParams

DEFAULT_DTYPES = ("bfloat16", "fp8", "int8", "int8-token", "int4")
DEFAULT_BUDGET = 1 << 30  # bytes of KV pool for the capacity column
DEFAULT_SEQ_LEN = 1024
CHAT_PROMPTS = (  # the default model's end-to-end test prompts, and one more
    "Please tell me about Paris.",
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Explain what a cache is to a ten-year-old.",
)
Progress = Callable[[str], None]


@dataclass(slots=True)
class KVDtypeResult:
    kv_dtype: str
    bytes_per_token: float
    ratio_to_reference: float  # bytes per token / the reference dtype's
    ratio_to_bf16: float
    ppl: float
    ppl_change_pct: float
    mean_abs_logit_diff: float  # over every scored position and vocabulary entry
    max_abs_logit_diff: float
    top1_agreement: float  # teacher-forced: fraction of positions whose top token is the reference's
    greedy_identical: list[int] = field(default_factory=list)  # per prompt: leading tokens equal to the reference's
    # per prompt: the reference's top-1 minus top-2 logit where this dtype's first different token was chosen
    # (a small margin is a near tie that any perturbation flips); None where all tokens are identical
    greedy_margin_at_divergence: list[float | None] = field(default_factory=list)
    greedy_tokens: int = 0  # tokens generated per prompt
    max_concurrent_seqs: int = 0  # sequences of seq_len tokens admitted at once within the budget


@dataclass(slots=True)
class KVEvalReport:
    model: str
    text: str  # where the held text came from
    tokens: int  # tokens scored (perplexity over tokens - 1 predictions)
    chunk_size: int
    block_size: int
    reference: str  # the full-precision KV dtype everything is compared with
    budget_bytes: int
    seq_len: int
    results: list[KVDtypeResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_text(path: str | Path | None = None) -> tuple[str, str]:
    """(name, text): the file at `path`, or CPython's pydoc topics (every topic, in name order)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"text file '{path}' does not exist")
        return str(p), p.read_text(encoding="utf-8", errors="replace")
    from pydoc_data.topics import topics

    return "pydoc_data.topics", "\n\n".join(topics[name] for name in sorted(topics))


def text_tokens(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first `n` tokens of `text` (tokenizing a prefix when the text is long)."""
    ids = tokenizer.encode(text[: n * 12])  # ~4 characters a token: a generous prefix
    if len(ids) < n:
        ids = tokenizer.encode(text)
    if len(ids) < n:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than the {n} asked for")
    return ids[:n]


@dataclass(slots=True)
class LogitScores:
    """One KV dtype's teacher-forced scores, summed over the scored positions."""

    nll: float = 0.0
    abs_diff_sum: float = 0.0
    max_abs_diff: float = 0.0
    top1_same: int = 0


def compare_logits(model: torch.nn.Module, token_ids: Sequence[int], dtypes: Sequence[str], reference: str,
                   chunk_size: int = DEFAULT_CHUNK, block_size: int = 16, device: torch.device | str = "cpu",
                   progress: Progress | None = None) -> dict[str, LogitScores]:
    """Teacher-forced pass of `token_ids` with every KV dtype in lockstep, chunk by chunk, so only one chunk's
    logits per dtype are alive at a time. Returns summed NLL and logit differences to `reference`."""
    names = [reference, *(d for d in dtypes if d != reference)]
    streams = [chunk_logits(model, token_ids, d, chunk_size, block_size, device) for d in names]
    scores = {d: LogitScores() for d in names}
    for chunks in zip(*streams, strict=True):
        start, ref = chunks[0]
        if progress is not None:
            progress(f"perplexity: tokens {start}..{start + ref.shape[0]}")
        ref_top = ref.argmax(-1)
        for name, (_, logits) in zip(names, chunks, strict=True):
            s = scores[name]
            s.nll += float(chunk_nll(logits, token_ids, start).sum())
            diff = (logits - ref).abs()  # [n, vocab]
            s.abs_diff_sum += float(diff.sum())
            s.max_abs_diff = max(s.max_abs_diff, float(diff.max()))
            s.top1_same += int((logits.argmax(-1) == ref_top).sum())
    return scores


def greedy_tokens(model: torch.nn.Module, tokenizer: Any, kv_dtype: str, prompts: Sequence[Sequence[int]], n: int,
                  block_size: int = 16, device: str = "cpu") -> list[list[int]]:
    """`n` greedy tokens per prompt (all prompts batched together), the KV cache stored as `kv_dtype`."""
    from kvengine.llm import LLM

    longest = max(len(p) for p in prompts) + n
    llm = LLM.from_model(model, tokenizer, kv_cache_dtype=kv_dtype, block_size=block_size, device=device,
                         max_num_seqs=len(prompts), max_model_len=longest)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def reference_margin(model: torch.nn.Module, token_ids: Sequence[int], reference: str, block_size: int = 16,
                     device: str = "cpu") -> float:
    """Top-1 minus top-2 logit of the next token after `token_ids`, with the KV cache in `reference`."""
    *_, (_, logits) = chunk_logits(model, token_ids, reference, len(token_ids), block_size, device)
    top = logits[-1].topk(2).values
    return float(top[0] - top[1])


def max_concurrent(model: torch.nn.Module, kv_dtype: str, budget: int, seq_len: int = DEFAULT_SEQ_LEN,
                   block_size: int = 16, device: str = "cpu") -> int:
    """Sequences of `seq_len` tokens (seq_len - 1 prompt + 1 new) that the engine admits together in one step
    into a pool of `budget` bytes: more requests than can fit are queued, the scheduler plans one step (the
    forward is not run: admission is decided by the block manager) and the admitted ones are counted."""
    from kvengine.llm import LLM

    llm = LLM.from_model(model, None, kv_cache_dtype=kv_dtype, kv_cache_memory=budget, block_size=block_size,
                         device=device, enable_prefix_caching=False, max_num_seqs=1 << 20,
                         max_num_batched_tokens=1 << 40, max_model_len=seq_len)
    engine = llm.engine
    prompt = [i % model.config.vocab_size for i in range(seq_len - 1)]
    tables = engine.block_tables
    fit_bound = tables.num_blocks // tables.blocks_needed(seq_len) + 1  # one more than can fit
    ids = [engine.add_request(None, SamplingParams(max_tokens=1), prompt_token_ids=prompt) for _ in range(fit_bound)]
    admitted = len(engine.scheduler.schedule().scheduled)
    for rid in ids:
        engine.abort(rid)
    return admitted


def evaluate_kv_dtypes(model: torch.nn.Module, tokenizer: Any, token_ids: Sequence[int],
                       prompts: Sequence[Sequence[int]], dtypes: Sequence[str] = DEFAULT_DTYPES, *,
                       generate: int = 64, chunk_size: int = DEFAULT_CHUNK, block_size: int = 16,
                       budget: int = DEFAULT_BUDGET, seq_len: int = DEFAULT_SEQ_LEN, device: str = "cpu",
                       text_name: str = "tokens", progress: Progress | None = None) -> KVEvalReport:
    """Every KV dtype in `dtypes` against the model's own dtype (the reference, always evaluated)."""
    reference = str(next(model.parameters()).dtype).removeprefix("torch.")
    names = list(dict.fromkeys([reference, *(resolve_kv_dtype(d).name for d in dtypes)]))
    say = progress or (lambda _msg: None)
    scores = compare_logits(model, token_ids, names, reference, chunk_size, block_size, device, say)
    n_pred = len(token_ids) - 1
    ref_tokens: list[list[int]] = []
    bf16 = kv_cache_spec_for(model.config, "bfloat16", block_size).bytes_per_token
    ref_bytes = kv_cache_spec_for(model.config, reference, block_size).bytes_per_token
    ref_ppl = Perplexity(reference, n_pred, scores[reference].nll).value
    results = []
    for name in names:
        say(f"greedy and capacity: {name}")
        toks = greedy_tokens(model, tokenizer, name, prompts, generate, block_size, device) if generate else []
        ref_tokens = ref_tokens or toks
        same = [identical_prefix(a, b) for a, b in zip(toks, ref_tokens, strict=True)]
        margins = [None if n == generate else
                   reference_margin(model, [*prompt, *ref[:n]], reference, block_size, device)
                   for n, prompt, ref in zip(same, prompts, ref_tokens, strict=True)] if generate else []
        s = scores[name]
        ppl = Perplexity(name, n_pred, s.nll).value
        per_token = kv_cache_spec_for(model.config, name, block_size).bytes_per_token
        results.append(KVDtypeResult(
            kv_dtype=name, bytes_per_token=per_token, ratio_to_reference=per_token / ref_bytes,
            ratio_to_bf16=per_token / bf16, ppl=ppl, ppl_change_pct=100.0 * (ppl / ref_ppl - 1.0),
            mean_abs_logit_diff=s.abs_diff_sum / (len(token_ids) * model.config.vocab_size),
            max_abs_logit_diff=s.max_abs_diff, top1_agreement=s.top1_same / len(token_ids),
            greedy_identical=same, greedy_margin_at_divergence=margins, greedy_tokens=generate,
            max_concurrent_seqs=max_concurrent(model, name, budget, seq_len, block_size, device)))
    return KVEvalReport(model=model.config.name, text=text_name, tokens=len(token_ids), chunk_size=chunk_size,
                        block_size=block_size, reference=reference, budget_bytes=budget, seq_len=seq_len,
                        results=results)

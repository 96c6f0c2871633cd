"""`bench throughput`: many requests at once through one engine. Aggregate output tok/s and p50/p99 time to
first token (TTFT) and inter-token latency (ITL) at each concurrency, with prefix caching on and off.

Every request is a chat: one shared system message (the first `prefix_tokens` tokens of CPython's pydoc
reference text) and its own question. Each level gets a fresh engine on the same weights; one untimed
conversation ("Hello.") under the same system message goes first, as on a server that has served that
system prompt before; then all requests of the level are sent at the same instant. With prefix sharing on
they reuse the system message's cached blocks; "prefix sharing off" runs the same requests with prefix
caching disabled, so every request computes its whole prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvengine.bench import plots
from kvengine.bench.report import Report, Table, ms, num, percentile
from kvengine.engine.engine import LLMEngine
from kvengine.errors import ConfigError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

DEFAULT_CONCURRENCY = (1, 4, 16, 32, 64)
CITIES = ("Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Athens", "Dublin",
          "Oslo", "Helsinki", "Warsaw", "Budapest", "Brussels", "Amsterdam", "Copenhagen", "Stockholm", "Zurich",
          "Geneva", "Milan", "Naples", "Venice", "Florence", "Barcelona", "Seville", "Porto", "Munich", "Hamburg",
          "Krakow", "Edinburgh", "Istanbul")
MODES = {"prefix sharing on": True, "prefix sharing off": False}
StepHook = Callable[[LLMEngine], None]


def reference_text(num_tokens: int, llm: LLM) -> str:
    """About `num_tokens` tokens of offline English prose (CPython's pydoc topics), cut at a token boundary."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer.encode(text[: num_tokens * 8], add_special_tokens=False)
    if len(ids) < num_tokens:
        raise ConfigError(f"the reference text has only {len(ids)} tokens; ask for fewer than {num_tokens}")
    return llm.tokenizer.decode(ids[:num_tokens])


def questions(n: int) -> list[str]:
    return [f"Please tell me about {CITIES[i % len(CITIES)]}." + (f" (request {i})" if i >= len(CITIES) else "")
            for i in range(n)]


def chat_prompts(llm: LLM, user_messages: list[str], system: str | None) -> list[list[int]]:
    """Token ids of each user message after `system` (chat template), or plain text without a template."""
    tok = llm.tokenizer
    if tok.chat_template is None:
        return [tok.encode(f"{system}\n\n{m}" if system else m) for m in user_messages]
    head = [{"role": "system", "content": system}] if system else []
    return [tok.encode_chat([*head, {"role": "user", "content": m}]) for m in user_messages]


@dataclass(slots=True)
class ConcurrentRun:
    """Requests sent at one instant; each request's token arrival times (seconds since they were sent)."""

    label: str
    concurrency: int
    wall_s: float
    times_s: list[list[float]]
    prompt_tokens: list[int]
    prefix_hit_rate: float = 0.0
    preemptions: int = 0
    steps: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def ttfts(self) -> list[float]:
        return [t[0] for t in self.times_s if t]

    @property
    def itls(self) -> list[float]:
        return [b - a for t in self.times_s for a, b in zip(t, t[1:], strict=False)]

    def to_dict(self, with_times: bool = False) -> dict[str, Any]:
        ttft, itl = self.ttfts, self.itls
        data = {"label": self.label, "concurrency": self.concurrency, "wall_s": self.wall_s,
                "output_tokens": self.output_tokens, "tokens_per_s": self.tokens_per_s,
                "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
                "prefix_hit_rate": self.prefix_hit_rate, "preemptions": self.preemptions, "steps": self.steps,
                "prompt_tokens": self.prompt_tokens}
        if with_times:
            data["times_s"] = self.times_s
        return data


def fresh_engine(llm: LLM, max_num_seqs: int, max_model_len: int, prefix_caching: bool = True,
                 **engine_args: Any) -> LLM:
    """A new engine on the same model weights, its empty KV pool holding `max_num_seqs` whole sequences of
    `max_model_len` tokens (so nothing is preempted for lack of blocks) in `llm`'s KV dtype (its "auto" may have
    been the fast path's bf16, which the new engine's config, without the weights format, would not choose)."""
    spec = llm.kv_cache_spec
    blocks = max_num_seqs * -(-max_model_len // spec.block_size)
    engine_args.setdefault("kv_cache_memory", int(blocks * spec.bytes_per_block) + 1)
    engine_args.setdefault("block_size", spec.block_size)
    engine_args.setdefault("kv_cache_dtype", spec.dtype)
    return LLM.from_model(llm.engine.model, llm.tokenizer, dtype=llm.config.dtype, device=llm.config.device,
                          max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          enable_prefix_caching=prefix_caching, **engine_args)


def run_concurrent(llm: LLM, prompts: list[list[int]], max_tokens: int, label: str = "",
                   on_step: StepHook | None = None, on_token: Callable[[int], None] | None = None) -> ConcurrentRun:
    """Send every prompt at once (greedy, EOS ignored, `max_tokens` each) and step the engine until all finish.
    `on_step(engine)` runs after every step (the prefix bench samples memory there)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    before = engine.stats()
    t0 = time.perf_counter()
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    index = {rid: i for i, rid in enumerate(ids)}
    times: list[list[float]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    done, steps0 = 0, engine.num_steps
    while done < len(ids):
        outs = engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            i = index[out.request_id]
            times[i] += [now] * len(out.delta_token_ids)
            if out.finished:
                done += 1
                texts[i] = out.text
        if on_step is not None:
            on_step(engine)
        if on_token is not None:
            on_token(sum(len(t) for t in times))
    wall = time.perf_counter() - t0
    after = engine.stats()
    queries = after.prefix_query_tokens - before.prefix_query_tokens
    hit_rate = (after.prefix_hit_tokens - before.prefix_hit_tokens) / queries if queries else 0.0
    return ConcurrentRun(label, len(prompts), wall, times, [len(p) for p in prompts], hit_rate,
                         after.preemptions - before.preemptions, engine.num_steps - steps0, texts)


@dataclass(slots=True)
class ThroughputBench:
    runs: list[ConcurrentRun]
    prefix_tokens: int
    max_tokens: int


def run_throughput_bench(llm: LLM, concurrency: list[int], max_tokens: int, prefix_tokens: int,
                         modes: dict[str, bool] | None = None,
                         progress: Callable[[str, int], Callable[[int], None]] | None = None,
                         warmup_tokens: int = 4) -> ThroughputBench:
    if not concurrency or min(concurrency) < 1:
        raise ConfigError("--concurrency needs positive request counts, e.g. 1,4,16,32,64")
    system = reference_text(prefix_tokens, llm) if prefix_tokens > 0 else None
    all_prompts = chat_prompts(llm, questions(max(concurrency)), system)
    max_len = max(len(p) for p in all_prompts) + max_tokens
    if warmup_tokens > 0:
        run_concurrent(fresh_engine(llm, 2, max_len), all_prompts[:2], warmup_tokens)
    runs = []
    for label, sharing in (modes or MODES).items():
        for c in concurrency:
            engine_llm = fresh_engine(llm, c, max_len, sharing)
            if system is not None:  # an earlier conversation left the shared system message in the cache
                run_concurrent(engine_llm, chat_prompts(llm, ["Hello."], system), 1)
            on_token = progress(f"{label}, {c} req", c * max_tokens) if progress is not None else None
            runs.append(run_concurrent(engine_llm, all_prompts[:c], max_tokens, label, on_token=on_token))
    return ThroughputBench(runs, prefix_tokens, max_tokens)


def throughput_report(bench: ThroughputBench, report: Report, model_name: str) -> Report:
    rows = []
    for r in bench.runs:
        d = r.to_dict()
        rows.append([r.label, str(r.concurrency), str(r.output_tokens), f"{r.wall_s:,.2f} s", num(r.tokens_per_s),
                     ms(d["ttft_p50_s"]), ms(d["ttft_p99_s"]), ms(d["itl_p50_s"]), ms(d["itl_p99_s"]),
                     f"{r.prefix_hit_rate:.0%}", str(r.preemptions)])
    prompt_len = bench.runs[0].prompt_tokens[0] if bench.runs else 0
    report.tables.append(Table(
        f"{model_name}: {bench.max_tokens} new tokens per request, prompts of ~{prompt_len} tokens "
        f"({bench.prefix_tokens} shared)",
        ["mode", "requests", "tokens", "wall time", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
         "prefix hits", "preemptions"], rows))
    report.notes += [
        "tok/s: output tokens of all requests / wall time from sending them to the last token. TTFT: time "
        "from sending to a request's first token. ITL: time between consecutive tokens of one request, over "
        "all requests. p50/p99 by linear interpolation.",
        "Prefix hits: prompt tokens served from the prefix cache / prompt tokens admitted.",
        "Each level: a fresh engine on the same weights; one untimed conversation under the shared system "
        "message first (it leaves that message in the prefix cache); then all requests sent at once, greedy, "
        "end-of-sequence ignored.",
    ]
    by_mode: dict[str, list[dict]] = {}
    for r in bench.runs:
        by_mode.setdefault(r.label, []).append(r.to_dict())
    plots.throughput(report.plot_path("throughput.png", "Aggregate tok/s and latency percentiles against "
                                      "concurrent requests"), by_mode,
                     f"{model_name}: {bench.max_tokens} new tokens per request", report.machine.describe())
    report.results = {"runs": [r.to_dict() for r in bench.runs], "prefix_tokens": bench.prefix_tokens,
                      "max_tokens": bench.max_tokens}
    best = max(bench.runs, key=lambda r: r.tokens_per_s)
    report.summary = {"model": model_name, "max_tokens": bench.max_tokens,
                      "tokens_per_s": {f"{r.label}@{r.concurrency}": r.tokens_per_s for r in bench.runs},
                      "best_tokens_per_s": best.tokens_per_s, "best_at": f"{best.label}@{best.concurrency}"}
    return report

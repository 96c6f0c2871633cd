"""`bench peers`: the same prompt ids, the same model, greedy, in one run: kvengine against Hugging Face
transformers (`use_cache` on and off) and llama.cpp through llama-cpp-python, each where installed.

kvengine runs as one or more variants (how the weights are stored, the compute dtype, whether its decode
steps are compiled). Besides batch-1 decode at each length, the same run measures the other two performance
goals for every system that can: the aggregate output tok/s of N concurrent greedy requests, and the prefill
speed of a P-token prompt (P / time to first token).

A peer that is not installed, or cannot load this model (llama.cpp needs a GGUF file), is skipped with a
one-line note. Every run times each token (transformers through a streamer, llama.cpp through its token
generator), so time to first token, decode tok/s and end-to-end tok/s mean the same for all systems.
The systems are adapters in `peer_systems.py`; the tables, goals and JSON keys are built in
`peers_report.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvengine.bench.cache import DEFAULT_PROMPT, TimedRun, encode_prompt
from kvengine.bench.machine import read_bandwidth
from kvengine.bench.peer_systems import (
    KVENGINE,
    LLAMA_CPP,
    TRANSFORMERS,
    KVEnginePeer,
    PeerCrashed,
    generate,
    load_llama_cpp,
    load_transformers,
)
from kvengine.bench.throughput import chat_prompts, questions, reference_text
from kvengine.engine.config import FLOAT_WEIGHTS, EngineConfig
from kvengine.errors import ConfigError
from kvengine.layers.linear import Linear, PackedLinear
from kvengine.llm import LLM
from kvengine.weights.gguf import GGUFFile
from kvengine.weights.tokenizer import Tokenizer

SETTINGS = (("KV cache", True), ("no cache", False))
FLOAT_FORMAT = {dtype: fmt for fmt, dtype in FLOAT_WEIGHTS.items()}  # "float32" -> "fp32"
COMPILE_WARMUP = 3  # warm-up tokens a compiled variant needs at least: its first decode step compiles
BATCH_WARMUP = 2  # new tokens of the untimed concurrent batch before the timed one


@dataclass(frozen=True, slots=True)
class Variant:
    """One kvengine configuration: weight storage (fp32, bf16, fp16, int8, int4), compute dtype, compiled decode."""

    weights: str
    dtype: str
    compile: bool = False

    @property
    def label(self) -> str:
        """The dtype alone for float weights ("float32", as transformers' rows), else "int4+bfloat16"."""
        base = self.dtype if FLOAT_WEIGHTS.get(self.weights) == self.dtype else f"{self.weights}+{self.dtype}"
        return f"{base}+compile" if self.compile else base

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "weights": self.weights, "dtype": self.dtype, "compile": self.compile}


def quantized_dtype(device: str = "cpu") -> str:
    """int8/int4 weights' compute dtype where --dtypes names none: the engine's own (EngineConfig.resolved_dtype:
    on a CPU, the activations of kvengine's kernel tier, float32, or bfloat16 on the avx512 tier forced with
    KVENGINE_ISA=avx512; never a bf16 matmul the CPU emulates)."""
    return EngineConfig(weights="int4", device=device).resolved_dtype()


def kvengine_variants(weights: Sequence[str], dtypes: Sequence[str] | None, compile: bool = False,
                      device: str = "cpu") -> list[Variant]:
    """The variant rule: `auto` = the float weights of each of `dtypes` (default float32); fp32, bf16 and fp16
    compute in their own dtype; int8 and int4 compute in each of `dtypes` when given, else in the engine's own
    dtype for them on `device` (quantized_dtype)."""
    out: list[Variant] = []
    for w in weights:
        if w == "auto":
            pairs = [(FLOAT_FORMAT[d], d) for d in dtypes or ["float32"]]
        elif w in FLOAT_WEIGHTS:
            pairs = [(w, FLOAT_WEIGHTS[w])]
        else:
            pairs = [(w, d) for d in dtypes or [quantized_dtype(device)]]
        out += [v for v in (Variant(a, b, compile) for a, b in pairs) if v not in out]
    return out


@dataclass(slots=True)
class PeersPlan:
    """What one `bench peers` run measures."""

    lengths: list[int]
    variants: list[Variant]
    dtypes: list[str]  # transformers' compute dtypes
    peers: tuple[str, ...] = (TRANSFORMERS, LLAMA_CPP)
    no_cache_max_tokens: int | None = 200
    repeats: int = 1
    warmup_tokens: int = 4
    concurrency: int = 32  # 0 = no concurrent-requests measurement
    concurrent_tokens: int = 64
    prefill_tokens: int = 1024  # 0 = no prefill measurement
    prompt: str = DEFAULT_PROMPT
    raw: bool = False
    threads: int | None = None
    device: str = "cpu"
    llama_python: str | None = None  # the interpreter of llama.cpp's process (None: this one)

    @property
    def goal_length(self) -> int:
        """The decode length the batch-1 goal is judged at: 200 new tokens if run, else the longest."""
        return 200 if 200 in self.lengths else max(self.lengths)


@dataclass(slots=True)
class PeerRun:
    system: str
    setting: str  # "KV cache" or "no cache"
    weights: str  # kvengine's variant label, transformers' dtype, or the GGUF's own format for llama.cpp
    run: TimedRun
    version: str

    def to_dict(self) -> dict[str, Any]:
        r = self.run
        return {"system": self.system, "setting": self.setting, "weights": self.weights, "version": self.version,
                "new_tokens": len(r.times_s), "ttft_s": r.ttft_s, "decode_tokens_per_s": r.decode_tokens_per_s,
                "tokens_per_s": r.tokens_per_s, "total_s": r.total_s, "text": r.text, "token_ids": r.token_ids}


@dataclass(slots=True)
class RateRun:
    """`tokens` in `seconds`: a batch of `requests` concurrent requests (output tokens / wall time), or one
    prompt's prefill (prompt tokens / time to first token)."""

    system: str
    weights: str
    tokens: int
    seconds: float
    version: str
    requests: int = 1

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "weights": self.weights, "version": self.version, "requests": self.requests,
                "tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


@dataclass(slots=True)
class PeersBench:
    plan: PeersPlan
    runs: dict[int, list[PeerRun]]  # length -> batch-1 decode runs
    concurrent: list[RateRun] = field(default_factory=list)
    prefill: list[RateRun] = field(default_factory=list)
    compile_s: dict[str, float | None] = field(default_factory=dict)  # variant label -> first compiled call
    weights_desc: dict[str, str] = field(default_factory=dict)  # variant label -> the engine's weights line
    skipped: list[str] = field(default_factory=list)
    peer_notes: list[str] = field(default_factory=list)  # how a peer ran (its build, its own process, a crash)
    read_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (system, weights) -> weight bytes
    # one decode token reads
    read_bandwidth: float | None = None  # bytes/s this machine reads (bench/machine.py), the decode ceiling
    prompt_ids: list[int] = field(default_factory=list)
    concurrent_prompts: list[list[int]] = field(default_factory=list)
    prefill_ids: list[int] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return self.plan.lengths

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def drop(self, system: str) -> None:
        """Forget every measurement of `system` (a peer whose process crashed part-way)."""
        for n, runs in self.runs.items():
            self.runs[n] = [r for r in runs if r.system != system]
        self.concurrent = [r for r in self.concurrent if r.system != system]
        self.prefill = [r for r in self.prefill if r.system != system]

    def find(self, system: str, setting: str, weights: str, length: int) -> PeerRun | None:
        return next((r for r in self.runs.get(length, []) if (r.system, r.setting, r.weights) ==
                     (system, setting, weights)), None)


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def common_words(a: str, b: str) -> int:
    """How many leading words two texts share."""
    return common_prefix(a.split(), b.split())


def prefill_prompt(llm: LLM, n: int) -> list[int]:
    """Exactly `n` token ids of English prose (CPython's pydoc topics) in this model's tokenizer."""
    ids = llm.tokenizer.encode(reference_text(n + 64, llm), add_special_tokens=False)[:n]
    if len(ids) < n:
        raise ConfigError(f"--prefill-tokens {n}: the reference text gives only {len(ids)} tokens")
    return ids


Progress = Callable[[str, int], Callable[[int], None]]


def _median_run(runs: list[TimedRun]) -> TimedRun:
    """The run with the median total time (the upper middle one of an even count)."""
    return sorted(runs, key=lambda r: r.total_s)[len(runs) // 2]


def run_peers_bench(model: str | None, plan: PeersPlan, progress: Progress | None = None) -> PeersBench:
    """Each kvengine variant, then transformers at each of `plan.dtypes`, then llama.cpp: batch-1 decode at every
    length and cache setting (no-cache runs only up to `plan.no_cache_max_tokens`), the concurrent batch and the
    prefill, all on the same prompt ids."""
    bench = PeersBench(plan, {n: [] for n in plan.lengths})
    source: Path | None = None
    tokenizer: Tokenizer | None = None
    for variant in plan.variants:
        source, tokenizer = _run_variant(bench, model, variant, progress)
    if TRANSFORMERS in plan.peers:
        for dtype in plan.dtypes:
            hf, note = load_transformers(source, dtype, tokenizer)
            bench.skipped += [note] if note and note not in bench.skipped else []
            if hf is not None:
                _measure(bench, hf, progress)
            del hf  # free its weights before the next load
    if LLAMA_CPP in plan.peers:
        _run_llama_cpp(bench, source, progress)
    bench.read_bandwidth = read_bandwidth()
    return bench


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one batch-1 decode step reads: every linear layer's stored weights (the LM head included)."""
    return sum(m.row_read_bytes() for m in model.modules() if isinstance(m, Linear | PackedLinear))


def gguf_read_bytes(path: Path) -> int:
    """The same for llama.cpp on a GGUF: every tensor once; the embedding table only where it is also the LM
    head (no output.weight), since otherwise a step reads one row of it."""
    sizes = GGUFFile(path).tensor_bytes()
    tied = "output.weight" not in sizes
    return sum(n for name, n in sizes.items() if tied or name != "token_embd.weight")


def _run_llama_cpp(bench: PeersBench, source: Path, progress: Progress | None) -> None:
    """llama.cpp in its own process. If that process crashes, its measurements so far are dropped and it runs
    again without its extra weight buffers (the repacked and AMX kernels, where such crashes have been seen)."""
    plan = bench.plan
    n_ctx = max(bench.prompt_tokens + max(plan.lengths), len(bench.prefill_ids) + 1) + 8
    for extra_bufts in (True, False):
        buffers = f"{'with' if extra_bufts else 'without'} its extra weight buffers"
        llama, note = load_llama_cpp(source, plan.threads or torch.get_num_threads(), n_ctx, extra_bufts,
                                     plan.llama_python)
        if llama is None:
            bench.skipped.append(note or f"{LLAMA_CPP}: skipped")
            return
        try:
            _measure(bench, llama, progress)
            bench.read_bytes[(LLAMA_CPP, llama.weights)] = gguf_read_bytes(source)
            bench.peer_notes.append(f"{LLAMA_CPP} {llama.version} ran in its own process (no PyTorch in it), "
                                    f"{buffers}; its build: "
                                    f"{llama.system_info}")
            return
        except PeerCrashed as e:
            bench.drop(LLAMA_CPP)
            bench.peer_notes.append(f"{e} ({buffers})")
        finally:
            llama.close()
    bench.skipped.append(f"{LLAMA_CPP}: skipped (its process crashed with and without its extra weight buffers)")


def _run_variant(bench: PeersBench, model: str | None, variant: Variant,
                 progress: Progress | None) -> tuple[Path, Tokenizer]:
    """Load and measure one kvengine variant (prefix caching off: nothing is served from an earlier run);
    returns the model's source path and tokenizer for the peers."""
    plan = bench.plan
    llm = LLM(model, weights=variant.weights, dtype=variant.dtype, compile=variant.compile, device=plan.device,
              num_threads=plan.threads, max_num_seqs=1, enable_prefix_caching=False)
    if not bench.prompt_ids:
        _prepare_prompts(bench, llm)
    _measure(bench, KVEnginePeer(llm, variant.label, variant.compile), progress)
    compiled = llm.engine.runner.compiled
    bench.compile_s[variant.label] = compiled.compile_seconds if compiled is not None else None
    bench.weights_desc[variant.label] = llm.engine.weights_desc
    bench.read_bytes[(KVENGINE, variant.label)] = decode_read_bytes(llm.engine.model)
    return llm.source.path, llm.tokenizer


def _prepare_prompts(bench: PeersBench, llm: LLM) -> None:
    """The prompt ids every system gets: the decode prompt, the concurrent requests, the prefill prompt."""
    plan = bench.plan
    bench.prompt_ids = encode_prompt(llm, plan.prompt, plan.raw)
    if plan.prefill_tokens:
        if plan.prefill_tokens >= llm.engine.max_model_len:
            raise ConfigError(f"--prefill-tokens {plan.prefill_tokens} does not fit {llm.model_name}'s context of "
                              f"{llm.engine.max_model_len} tokens (ask for fewer, or 0 to skip)")
        bench.prefill_ids = prefill_prompt(llm, plan.prefill_tokens)
    if plan.concurrency:
        bench.concurrent_prompts = chat_prompts(llm, questions(plan.concurrency), None)


def _measure(bench: PeersBench, peer: Any, progress: Progress | None) -> None:
    """One system: batch-1 decode at every length and setting, then the concurrent batch (where the system
    batches), then the prefill."""
    _measure_decode(bench, peer, progress)
    if bench.concurrent_prompts and hasattr(peer, "generate_batch"):
        bench.concurrent.append(_measure_batch(bench, peer, progress))
    if bench.prefill_ids:
        bench.prefill.append(_measure_prefill(bench, peer, progress))


def _measure_decode(bench: PeersBench, peer: Any, progress: Progress | None) -> None:
    plan = bench.plan
    cap = plan.no_cache_max_tokens or max(plan.lengths)
    for setting, use_cache in SETTINGS:
        lengths = [n for n in plan.lengths if use_cache or n <= cap]
        if not lengths or (peer.name == LLAMA_CPP and not use_cache):
            continue
        warmup = max(plan.warmup_tokens, COMPILE_WARMUP if peer.compiled and use_cache else 0)
        if warmup:
            generate(peer, bench.prompt_ids, warmup, use_cache, None)
        for n in lengths:
            label = f"{peer.name} {setting} {peer.weights} {n}"
            runs = [generate(peer, bench.prompt_ids, n, use_cache, progress(label, n) if progress else None)
                    for _ in range(plan.repeats)]
            bench.runs[n].append(PeerRun(peer.name, setting, peer.weights, _median_run(runs), peer.version))


def _measure_batch(bench: PeersBench, peer: Any, progress: Progress | None) -> RateRun:
    """All concurrent prompts at once: median (by wall time) of --repeats batches, after one short untimed one."""
    prompts, n = bench.concurrent_prompts, bench.plan.concurrent_tokens
    if bench.plan.warmup_tokens:
        peer.generate_batch(prompts, BATCH_WARMUP)
    seconds, tokens = _median_of(bench, f"{peer.name} {peer.weights} {len(prompts)} requests", len(prompts) * n,
                                 progress, lambda: peer.generate_batch(prompts, n))
    return RateRun(peer.name, peer.weights, tokens, seconds, peer.version, len(prompts))


def _measure_prefill(bench: PeersBench, peer: Any, progress: Progress | None) -> RateRun:
    """The prefill prompt's time to first token: median of --repeats runs, after one untimed run."""
    ids = bench.prefill_ids
    if bench.plan.warmup_tokens:
        generate(peer, ids, 1, True, None)
    seconds, tokens = _median_of(bench, f"{peer.name} {peer.weights} prefill", len(ids), progress,
                                 lambda: (generate(peer, ids, 1, True, None).ttft_s, len(ids)))
    return RateRun(peer.name, peer.weights, tokens, seconds, peer.version)


def _median_of(bench: PeersBench, label: str, tokens_each: int, progress: Progress | None,
               measure: Callable[[], tuple[float, int]]) -> tuple[float, int]:
    """`measure()` -> (seconds, tokens), --repeats times under one progress bar; the median by seconds."""
    repeats = bench.plan.repeats
    done = progress(label, repeats * tokens_each) if progress else None
    results = []
    for i in range(repeats):
        results.append(measure())
        if done is not None:
            done((i + 1) * tokens_each)
    return sorted(results)[repeats // 2]

"""`bench peers`: the same prompt ids, the same model, greedy, in one run: kvengine against Hugging Face
transformers (`use_cache` on and off) and llama.cpp through llama-cpp-python, each where installed.

A peer that is not installed, or cannot load this model (llama.cpp needs a GGUF file), is skipped with a
one-line note. Every run times each token (transformers through a streamer, llama.cpp through its token
generator), so time to first token, decode tok/s and end-to-end tok/s mean the same for all systems.
Ratios compare a peer with kvengine at the same dtype, length and cache setting (llama.cpp, which keeps
the GGUF's own weights and always caches, against kvengine with the cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvengine import __version__
from kvengine.bench import plots
from kvengine.bench.cache import TimedRun, encode_prompt, timed_stream
from kvengine.bench.report import Report, Table, ms, num
from kvengine.llm import LLM, TORCH_DTYPES

KVENGINE, TRANSFORMERS, LLAMA_CPP = "kvengine", "transformers", "llama.cpp"
SYSTEMS = (KVENGINE, TRANSFORMERS, LLAMA_CPP)  # table order
INSTALL_HINT = "pip install 'kvengine[peers]'"
COMPARE_WORDS = 8  # "starts with the same words": the first this many words of kvengine's text


@dataclass(slots=True)
class PeerRun:
    system: str
    setting: str  # "KV cache" or "no cache"
    weights: str  # compute dtype, or the GGUF's own format for llama.cpp
    run: TimedRun
    version: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.system, self.setting, self.weights

    def to_dict(self) -> dict[str, Any]:
        r = self.run
        return {"system": self.system, "setting": self.setting, "weights": self.weights, "version": self.version,
                "new_tokens": len(r.times_s), "ttft_s": r.ttft_s, "decode_tokens_per_s": r.decode_tokens_per_s,
                "tokens_per_s": r.tokens_per_s, "total_s": r.total_s, "text": r.text, "token_ids": r.token_ids}


class _TimingStreamer:
    """transformers streamer protocol (put/end): the first put is the prompt, each later one a new token."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times += [time.perf_counter() - self.t0] * (value.shape[-1] if value.dim() > 1 else 1)

    def end(self) -> None:
        pass


class TransformersPeer:
    name = TRANSFORMERS

    def __init__(self, source: Path, dtype: str, tokenizer: Any) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # kvengine's own bars are on stderr
        self.version = transformers.__version__
        self.tokenizer = tokenizer  # kvengine's, to decode the ids the same way for every system
        kw: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype]}
        if source.is_file():  # a GGUF: transformers dequantizes it to `dtype`
            folder, kw["gguf_file"] = source.parent, source.name
        else:
            folder = source
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()
        self.pad_id = 0

    def generate(self, prompt_ids: list[int], n: int, use_cache: bool) -> TimedRun:
        ids = torch.tensor([prompt_ids])  # [1, prompt]
        streamer = _TimingStreamer()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=use_cache, streamer=streamer,
                                      pad_token_id=self.pad_id)
        new = out[0, len(prompt_ids):].tolist()
        return TimedRun(TRANSFORMERS, use_cache, len(prompt_ids), new, streamer.times, self.tokenizer.decode(new))

    def generate_batch(self, prompts: list[list[int]], n: int) -> tuple[float, int]:
        """Left-padded batched greedy `generate` of `n` tokens each: (wall seconds, tokens generated)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # [batch, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [batch, width]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.pad_id)
        return time.perf_counter() - t0, int((out.shape[1] - width) * out.shape[0])


class LlamaCppPeer:
    name = LLAMA_CPP

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=n_ctx, verbose=False, seed=0)
        self.weights = gguf.name.rsplit(".", 2)[-2] if gguf.name.count(".") >= 2 else "GGUF"

    def generate(self, prompt_ids: list[int], n: int, use_cache: bool = True) -> TimedRun:
        self.llm.reset()  # no reuse of the previous run's prompt
        tokens: list[int] = []
        times: list[float] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - t0)
            tokens.append(int(tok))
            if len(tokens) == n:
                break
        text = self.llm.detokenize(tokens).decode("utf-8", errors="replace")
        return TimedRun(LLAMA_CPP, True, len(prompt_ids), tokens, times, text)


def load_transformers(source: Path, dtype: str, tokenizer: Any) -> tuple[TransformersPeer | None, str | None]:
    """(peer, None) or (None, one-line reason it is skipped)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, f"{TRANSFORMERS}: skipped (not installed; {INSTALL_HINT})"
    try:
        return TransformersPeer(source, dtype, tokenizer), None
    except Exception as e:  # a peer that cannot load this model is a note, never a crash
        return None, f"{TRANSFORMERS}: skipped (cannot load {source.name} as {dtype}: {_first_line(e)})"


def load_llama_cpp(source: Path, threads: int, n_ctx: int) -> tuple[LlamaCppPeer | None, str | None]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, f"{LLAMA_CPP}: skipped (llama-cpp-python not installed; {INSTALL_HINT})"
    if not source.is_file():
        return None, f"{LLAMA_CPP}: skipped (it needs a GGUF file; {source.name} is a Hugging Face folder)"
    try:
        return LlamaCppPeer(source, threads, n_ctx), None
    except Exception as e:
        return None, f"{LLAMA_CPP}: skipped (cannot load {source.name}: {_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def common_words(a: str, b: str) -> int:
    """How many leading words two texts share."""
    n = 0
    for x, y in zip(a.split(), b.split(), strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(slots=True)
class PeersBench:
    lengths: list[int]
    dtypes: list[str]
    runs: dict[int, list[PeerRun]] = field(default_factory=dict)  # length -> runs
    skipped: list[str] = field(default_factory=list)
    no_cache_max_tokens: int | None = None
    prompt_tokens: int = 0

    def reference(self, run: PeerRun, length: int, dtype: str) -> PeerRun | None:
        """The kvengine run a peer's run is compared with."""
        setting = run.setting if run.system != LLAMA_CPP else "KV cache"
        return next((r for r in self.runs[length] if r.system == KVENGINE and r.setting == setting
                     and r.weights == dtype), None)


Progress = Callable[[str, int], Callable[[int], None]]


def _median_run(runs: list[TimedRun]) -> TimedRun:
    """The run with the median total time (the upper middle one of an even count)."""
    return sorted(runs, key=lambda r: r.total_s)[len(runs) // 2]


def run_peers_bench(model: str | None, prompt: str, raw: bool, lengths: list[int], dtypes: list[str],
                    no_cache_max_tokens: int | None, threads: int | None, repeats: int = 1, warmup_tokens: int = 4,
                    peers: tuple[str, ...] = (TRANSFORMERS, LLAMA_CPP), progress: Progress | None = None,
                    device: str = "cpu") -> PeersBench:
    """Every (dtype, length, system, cache setting); no-cache runs only up to `no_cache_max_tokens`."""
    bench = PeersBench(lengths, dtypes, {n: [] for n in lengths}, [], no_cache_max_tokens)
    cap = no_cache_max_tokens or max(lengths)
    settings = (("KV cache", True), ("no cache", False))
    llama_done = False
    for dtype in dtypes:
        llm = LLM(model, dtype=dtype, device=device, num_threads=threads, max_num_seqs=1, enable_prefix_caching=False)
        ids = encode_prompt(llm, prompt, raw)
        bench.prompt_tokens = len(ids)
        systems: list[tuple[str, str, Any]] = [(KVENGINE, dtype, None)]
        if TRANSFORMERS in peers:
            hf, note = load_transformers(llm.source.path, dtype, llm.tokenizer)
            systems += [(TRANSFORMERS, dtype, hf)] if hf else []
            bench.skipped += [note] if note and note not in bench.skipped else []
        if LLAMA_CPP in peers and not llama_done:
            llama, note = load_llama_cpp(llm.source.path, threads or torch.get_num_threads(),
                                         len(ids) + max(lengths) + 8)
            systems += [(LLAMA_CPP, llama.weights, llama)] if llama else []
            bench.skipped += [note] if note else []
            llama_done = True
        for system, weights, peer in systems:
            version = peer.version if peer is not None else __version__
            for setting, use_cache in settings:
                if system == LLAMA_CPP and not use_cache:
                    continue
                if warmup_tokens:
                    _generate(llm, peer, ids, warmup_tokens, use_cache, None)
                for n in lengths:
                    if not use_cache and n > cap:
                        continue
                    label = f"{system} {setting} {weights} {n}"
                    runs = [_generate(llm, peer, ids, n, use_cache, progress(label, n) if progress else None)
                            for _ in range(repeats)]
                    bench.runs[n].append(PeerRun(system, setting, weights, _median_run(runs), version))
    return bench


def _generate(llm: LLM, peer: Any, ids: list[int], n: int, use_cache: bool,
              on_token: Callable[[int], None] | None) -> TimedRun:
    if peer is None:
        return timed_stream(llm, ids, n, use_cache, on_token)
    run = peer.generate(ids, n, use_cache)
    if on_token is not None:
        on_token(len(run.times_s))
    return run


def _same_start(run: PeerRun, ref: PeerRun | None) -> tuple[bool | None, int]:
    if ref is None:
        return None, 0
    k = common_words(ref.run.text, run.run.text)
    return k >= min(COMPARE_WORDS, len(ref.run.text.split())), k


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def peers_report(bench: PeersBench, report: Report, model_name: str, prompt_tokens: int) -> Report:
    rows_json, pivot, bars = [], {}, {}
    for dtype in bench.dtypes:
        rows = []
        for n in bench.lengths:
            for r in sorted(bench.runs[n], key=lambda r: (SYSTEMS.index(r.system), r.setting)):
                if r.system != LLAMA_CPP and r.weights != dtype:
                    continue
                ref = bench.reference(r, n, dtype)
                mine, theirs = (ref.run.decode_tokens_per_s if ref else None), r.run.decode_tokens_per_s
                same, k = _same_start(r, bench.reference(PeerRun(r.system, "KV cache", dtype, r.run, ""), n, dtype))
                rows.append([str(n), r.system, r.setting, r.weights, r.version, ms(r.run.ttft_s), num(theirs),
                             num(r.run.tokens_per_s), num(_ratio(theirs, mine)), num(_ratio(mine, theirs)),
                             "-" if same is None else f"{'yes' if same else 'no'} ({k})"])
                rows_json.append({**r.to_dict(), "compared_with_dtype": dtype, "peer_over_kvengine":
                                  _ratio(theirs, mine), "kvengine_over_peer": _ratio(mine, theirs),
                                  "same_start": same, "common_leading_words": k})
                key = f"{r.system}, {r.setting}, {r.weights}"
                pivot.setdefault(key, {})[n] = f"{num(theirs, 1)} ({num(r.run.tokens_per_s, 1)})"
                bars.setdefault(key, {})[n] = theirs
        report.tables.append(Table(
            f"{model_name} at {dtype}: decode speed, {prompt_tokens}-token prompt, greedy",
            ["new tokens", "system", "setting", "weights", "version", "TTFT", "decode tok/s", "end-to-end tok/s",
             "peer / kvengine", "kvengine / peer", f"same first {COMPARE_WORDS} words"], rows))
    report.tables.append(Table("decode tok/s (end-to-end tok/s) by new tokens",
                               ["system, setting, weights", *(f"{n} new" for n in bench.lengths)],
                               [[k, *(v.get(n, "-") for n in bench.lengths)] for k, v in pivot.items()]))
    report.notes += [
        "decode tok/s = (new tokens - 1) / (time of the last token - time of the first); end-to-end tok/s = new "
        "tokens / time from sending the prompt to the last token; TTFT = time to the first token (prefill).",
        "peer / kvengine and kvengine / peer divide decode tok/s, against kvengine at the same dtype, length and "
        "cache setting (llama.cpp against kvengine with the cache). peer / kvengine > 1: the peer is faster.",
        "Same first words: the peer's text against kvengine's (KV cache, same dtype and length), word by word; "
        "(k) = leading words in common. EOS is ignored by every system so each makes exactly the asked tokens.",
        *bench.skipped,
    ]
    if bench.no_cache_max_tokens:
        report.notes.append(f"No-cache runs only up to {bench.no_cache_max_tokens} new tokens "
                            "(--no-cache-max-tokens); longer ones are left out (-).")
    plots.bars(report.plot_path("peers.png", "Decode tok/s of every system and setting, by new tokens"),
               [f"{n} new tokens" for n in bench.lengths],
               {k: [v.get(n) for n in bench.lengths] for k, v in bars.items()}, "decode tokens/s",
               f"{model_name}: decode speed, same prompt, greedy", report.machine.describe())
    report.results = {"runs": rows_json, "skipped": bench.skipped, "lengths": bench.lengths, "dtypes": bench.dtypes}
    report.summary = {"model": model_name, "skipped": bench.skipped, "decode_tokens_per_s": {
        f"{r['system']}|{r['setting']}|{r['weights']}|{r['new_tokens']}": r["decode_tokens_per_s"]
        for r in rows_json}}
    return report

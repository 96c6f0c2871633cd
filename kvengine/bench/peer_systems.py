"""The systems `bench peers` compares, each behind one protocol: `name`, `weights` (a label), `version`,
`compiled`, `generate(prompt_ids, n, use_cache) -> TimedRun` (greedy, exactly n tokens, each timestamped) and,
where the system batches, `generate_batch(prompts, n) -> (wall seconds, tokens generated)`.

kvengine runs through its own engine; transformers and llama.cpp (llama-cpp-python) load lazily, and one that
is not installed or cannot load the model is a one-line note, never a crash.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvengine import __version__
from kvengine.bench.cache import TimedRun, timed_stream
from kvengine.bench.throughput import fresh_engine, run_concurrent
from kvengine.llm import LLM, TORCH_DTYPES

KVENGINE, TRANSFORMERS, LLAMA_CPP = "kvengine", "transformers", "llama.cpp"
SYSTEMS = (KVENGINE, TRANSFORMERS, LLAMA_CPP)  # table order
INSTALL_HINT = "pip install 'kvengine[peers]'"
WORKER = Path(__file__).with_name("llama_worker.py")


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


class KVEnginePeer:
    """kvengine behind the peers' protocol (generate, generate_batch)."""

    name = KVENGINE

    def __init__(self, llm: LLM, label: str, compiled: bool = False) -> None:
        self.llm, self.weights, self.version, self.compiled = llm, label, __version__, compiled

    def generate(self, prompt_ids: list[int], n: int, use_cache: bool,
                 on_token: Callable[[int], None] | None = None) -> TimedRun:
        return timed_stream(self.llm, prompt_ids, n, use_cache, on_token)

    def generate_batch(self, prompts: list[list[int]], n: int) -> tuple[float, int]:
        """All prompts at once through one fresh engine (continuous batching, no prefix caching):
        (wall seconds, tokens generated)."""
        llm = fresh_engine(self.llm, len(prompts), max(len(p) for p in prompts) + n, prefix_caching=False,
                           compile=self.compiled)
        run = run_concurrent(llm, prompts, n)
        return run.wall_s, run.output_tokens


class TransformersPeer:
    name = TRANSFORMERS
    compiled = False

    def __init__(self, source: Path, dtype: str, tokenizer: Any) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # kvengine's own bars are on stderr
        self.version = transformers.__version__
        self.weights = dtype
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


class PeerCrashed(RuntimeError):
    """The peer's own process ended while it was working (a crash inside the peer, not in kvengine)."""


class LlamaCppPeer:
    """llama.cpp in its own process (bench/llama_worker.py): its runtime never shares one with PyTorch, and a crash
    inside it is reported instead of ending the bench."""

    name = LLAMA_CPP
    compiled = False

    def __init__(self, gguf: Path, threads: int, n_ctx: int, extra_bufts: bool = True,
                 python: str | None = None) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python or sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        try:
            loaded = self._call(op="load", path=str(gguf), threads=threads, n_ctx=n_ctx, extra_bufts=extra_bufts)
        except BaseException:  # a load that failed or crashed leaves no worker process or temp file behind
            self.close()
            raise
        self.version, self.system_info = loaded["version"], loaded["system_info"].strip()
        self.weights = gguf.name.rsplit(".", 2)[-2] if gguf.name.count(".") >= 2 else "GGUF"

    def _call(self, **request: Any) -> dict[str, Any]:
        """One request, one reply; PeerCrashed if the process died, RuntimeError for an error it reported."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise PeerCrashed(f"{LLAMA_CPP}'s process ended ({_exit_reason(self.proc.wait())}){self._last_words()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def _last_words(self) -> str:
        self.stderr.seek(0)
        lines = [ln.strip() for ln in self.stderr.read().splitlines() if ln.strip()]
        return f": {lines[-1]}" if lines else ""

    def generate(self, prompt_ids: list[int], n: int, use_cache: bool = True) -> TimedRun:
        out = self._call(op="generate", ids=prompt_ids, n=n)
        return TimedRun(LLAMA_CPP, True, len(prompt_ids), out["tokens"], out["times"], out["text"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


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


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama_cpp(source: Path, threads: int, n_ctx: int, extra_bufts: bool = True,
                   python: str | None = None) -> tuple[LlamaCppPeer | None, str | None]:
    """(peer, None) or (None, one-line reason it is skipped). llama_cpp is only looked up here, never imported:
    it loads in the peer's own process, run by `python` (default: this interpreter)."""
    if python is None and not llama_cpp_installed():
        return None, f"{LLAMA_CPP}: skipped (llama-cpp-python not installed; {INSTALL_HINT})"
    if not source.is_file():
        return None, f"{LLAMA_CPP}: skipped (it needs a GGUF file; {source.name} is a Hugging Face folder)"
    try:
        return LlamaCppPeer(source, threads, n_ctx, extra_bufts, python), None
    except Exception as e:
        return None, f"{LLAMA_CPP}: skipped (cannot load {source.name}: {_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def generate(peer: Any, ids: list[int], n: int, use_cache: bool, on_token: Callable[[int], None] | None) -> TimedRun:
    """`peer.generate`, reporting progress through `on_token` (per token for kvengine, at the end for the peers)."""
    if isinstance(peer, KVEnginePeer):
        return peer.generate(ids, n, use_cache, on_token)
    run = peer.generate(ids, n, use_cache)
    if on_token is not None:
        on_token(len(run.times_s))
    return run

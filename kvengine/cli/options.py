"""The engine options of every command, declared once.

`EngineOptions` holds them under `EngineConfig`'s field names (plus the model); `engine_options(...)` adds the
chosen ones to a Typer command, which then receives them as one `engine: EngineOptions` parameter.
`EngineOptions.open_llm()` is the one way a command opens an LLM from them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import typer

from kvengine.engine.config import EngineConfig
from kvengine.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class EngineOptions:
    """What the command line says about the model and the engine; field names are EngineConfig's."""

    model: str | None = None  # a name, GGUF file or HF folder; None = the default model
    dtype: str = "auto"
    device: str = "cpu"
    weights: str = "auto"
    num_threads: int | None = None
    kv_cache_dtype: str = "auto"
    kv_cache_memory: float | None = None  # bytes (> 1) or a fraction of free memory
    kv_window: int | None = None
    sink_tokens: int = 0
    kv_disk_dir: str | None = None
    kv_disk_budget: float | None = None  # GiB, as --kv-disk-budget takes it (EngineConfig holds bytes)
    compile: bool = False
    max_num_seqs: int = 64
    max_model_len: int | None = None

    def engine_args(self, **overrides: Any) -> dict[str, Any]:
        """EngineConfig's keyword arguments: these options with the units EngineConfig takes, then `overrides`."""
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        memory = self.kv_cache_memory
        args["kv_cache_memory"] = int(memory) if memory is not None and memory > 1 else memory
        args["kv_disk_budget"] = disk_budget_bytes(self.kv_disk_budget)
        return {**args, **overrides}

    def config(self, **overrides: Any) -> EngineConfig:
        """The EngineConfig these options describe; a bad value is one ConfigError."""
        return EngineConfig(**self.engine_args(**overrides))

    def open_llm(self, *, quiet: bool = False, **overrides: Any) -> Any:
        """Load the model and build its engine (kvengine.llm.LLM)."""
        from kvengine.llm import LLM

        return LLM(self.model, quiet=quiet, **self.engine_args(**overrides))


def disk_budget_bytes(gib: float | None) -> int | None:
    """--kv-disk-budget GiB in bytes; a negative, zero or not-a-number budget is one ConfigError."""
    if gib is None:
        return None
    if not gib > 0 or gib == float("inf"):
        raise ConfigError(f"--kv-disk-budget must be a positive number of GiB, got {gib}")
    return int(gib * 2**30)


@dataclass(frozen=True, slots=True)
class Flag:
    """One option on the command line: its Python type, default, names and help."""

    type: Any
    default: Any
    names: tuple[str, ...]
    help: str

    def option(self) -> Any:
        return typer.Option(self.default, *self.names, help=self.help)


MODEL_HELP = "Model name, GGUF file or HF folder (default: SmolLM2-135M-Instruct)."
FLAGS: dict[str, Flag] = {
    "model": Flag(str | None, None, ("--model", "-m"), MODEL_HELP),
    "dtype": Flag(str, "auto", ("--dtype",), "Compute dtype: auto (float32 on CPU unless the weights say "
                  "otherwise), float32/fp32, bfloat16/bf16, float16/fp16."),
    "device": Flag(str, "cpu", ("--device",), "cpu, cuda or cuda:N."),
    "weights": Flag(str, "auto", ("--weights",), "Weight storage: auto (the dtype), fp32, bf16, fp16, int8, int4."),
    "num_threads": Flag(int | None, None, ("--threads",), "CPU threads for PyTorch (default: PyTorch's choice)."),
    "kv_cache_dtype": Flag(str, "auto", ("--kv-dtype",), "KV cache dtype: auto (the model's dtype; bfloat16 where "
                           "the fast path's layer op runs fp32 activations), float32, bfloat16, float16, fp8, int8, "
                           "int8-token, int4 (docs/kv-dtypes.md)."),
    "kv_cache_memory": Flag(float | None, None, ("--kv-cache-memory",), "KV pool budget: bytes (e.g. 2e9) or a "
                            "fraction of free memory (e.g. 0.5)."),
    "kv_window": Flag(int | None, None, ("--kv-window",), "Keep only the last W tokens' KV in every layer (plus "
                      "--sink-tokens): constant memory, generation past the model's context (docs/long-context.md)."),
    "sink_tokens": Flag(int, 0, ("--sink-tokens",), "With --kv-window: also keep the first S tokens (StreamingLLM's "
                        "attention sinks; 4 is the usual choice)."),
    "kv_disk_dir": Flag(str | None, None, ("--kv-disk-dir",), "Keep full KV blocks in this directory (created 0700) "
                        "across restarts and load them on a prefix miss instead of recomputing (docs/kv-disk.md)."),
    "kv_disk_budget": Flag(float | None, None, ("--kv-disk-budget",), "GiB the --kv-disk-dir may hold (LRU "
                           "eviction; default: a quarter of the free space, at most 16)."),
    "compile": Flag(bool, False, ("--compile",), "torch.compile decode steps (slow first run; cached on disk "
                    "afterwards)."),
    "max_num_seqs": Flag(int, 64, ("--max-num-seqs",), "Requests in the running batch at most."),
    "max_model_len": Flag(int | None, None, ("--max-model-len",), "Context limit (default: the model's)."),
}
# the commands that generate or serve (generate, chat, serve, bench serve, cluster, bench cluster), like LLM():
# by default the fastest path that keeps quality on this CPU. The benchmarks without a --weights flag (bench cache,
# seed, throughput, prefix, long, sessions) and eval keep EngineOptions' "auto": the float weights their published
# figures and the seeds' baselines were measured with.
FAST_WEIGHTS = Flag(str, "fast", ("--weights",), "Weight storage: fast (default: int4 weights on kvengine's kernels "
                    "for this CPU, in their activation dtype, when --dtype is left to auto; within 2% perplexity of "
                    "fp32), auto (the dtype's float weights), fp32 (the exact reference), bf16, fp16, int8, int4.")
assert set(FLAGS) == {f.name for f in fields(EngineOptions)}


def engine_options(*names: str, **variants: Flag) -> Callable[[F], F]:
    """Add the engine options `names` (EngineOptions fields; `variants` replaces a flag's default and help) to a
    Typer command that takes `engine: EngineOptions`; the others keep EngineOptions' defaults."""
    flags = {name: variants.get(name, FLAGS[name]) for name in names}

    def decorate(command: F) -> F:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "engine"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=flag.option(),
                                   annotation=flag.type) for name, flag in flags.items()]

        @functools.wraps(command)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            engine = EngineOptions(**{name: kwargs.pop(name, flag.default) for name, flag in flags.items()})
            return command(*args, engine=engine, **kwargs)

        with_options.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        with_options.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return with_options  # type: ignore[return-value]

    return decorate

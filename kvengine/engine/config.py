"""EngineConfig: how the engine runs a model (precision, device, KV cache geometry and budget, batching limits).

Here, above layers/, because resolving `weights="fast"` and the activation dtype asks layers/native.py which
kernel tier this CPU loads. ModelConfig (the model's shape, shared by every layer) stays in kvengine/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvengine.cache.retention import Retention
from kvengine.errors import ConfigError
from kvengine.layers import native

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16", "float": "float32"}
WEIGHT_FORMATS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
# the CLI's default (generate, chat, serve): the fastest path that keeps quality on this CPU (EngineConfig._fast_format)
FAST_WEIGHTS = "fast"
FLOAT_WEIGHTS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def normalize_dtype(name: str) -> str:
    """Canonical dtype name or a ConfigError listing the choices."""
    key = DTYPE_ALIASES.get(name, name)
    if key != "auto" and key not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}' (choose from auto, {', '.join(DTYPES)}, bf16, fp16, fp32)")
    return key


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs a model: precision, device, KV cache geometry and budget, batching limits."""

    dtype: str = "auto"  # compute dtype; auto = float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"
    weights: str = "auto"  # weight storage: auto (dtype), fp32, bf16, fp16, int8, int4; fast (_fast_format)
    block_size: int = 16
    # KV budget: bytes (int > 1) or a fraction of free memory (0 < x <= 1); None = enough for
    # max_num_seqs sequences of max_model_len, capped at a quarter of free memory and at DEFAULT_BUDGET_CAP
    # (cache/pool.py num_blocks_for_budget).
    kv_cache_memory: float | int | None = None
    kv_cache_dtype: str = "auto"  # auto = dtype; bfloat16 where the fused layer op runs fp32 activations (assembly)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    compile: bool = False  # torch.compile decode steps (see engine/compiled.py)
    # run whole decoder layers as one kvengine op each (the fused layer op: every step, cached or not, so cached and
    # uncached tokens are the same; int8/int4 or bf16 weights, Llama family), where it applies (models/llama.py
    # enable_fused_layers)
    fused_layers: bool = True
    # int8/int4 weights on PyTorch's packed kernels (fp32 activations, or a CPU without kvengine's): steps with
    # more rows than this (prefill, large batches) multiply by a dense copy in the compute dtype, where those
    # kernels are slower; None = no dense copy (less memory). kvengine's kernels need no copy.
    dense_above: int | None = 8
    # Bounded cache (StreamingLLM): every layer keeps at most the last kv_window tokens plus the first
    # sink_tokens; generation may then run past the model's context with constant memory.
    kv_window: int | None = None
    sink_tokens: int = 0
    # The KV disk tier (docs/kv-disk.md): a directory that keeps full blocks across restarts, and its budget in
    # bytes (None: a quarter of the free space, at most 16 GiB).
    kv_disk_dir: str | None = None
    kv_disk_budget: float | None = None
    # Set by the resolution of weights="fast" (callers leave it False): True when "fast" chose kvengine's int4
    # path for this CPU, so the run summary can say the default was picked for speed.
    fast_chosen: bool = False

    def __post_init__(self) -> None:
        self.dtype = normalize_dtype(self.dtype)
        if self.weights not in (FAST_WEIGHTS, *WEIGHT_FORMATS):
            raise ConfigError(f"unknown weights format '{self.weights}' (choose from {FAST_WEIGHTS}, "
                              f"{', '.join(WEIGHT_FORMATS)})")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"unknown device '{self.device}' (choose from cpu, cuda, cuda:N)")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be at least 1, got {self.max_model_len}")
        Retention(self.kv_window, self.sink_tokens)  # validates the bound
        if self.dense_above is not None and self.dense_above < 0:
            raise ConfigError(f"dense_above must be >= 0 or None, got {self.dense_above}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.weights == FAST_WEIGHTS:  # resolved here, once: every later reading is plain
            self.weights = self._fast_format()
            self.fast_chosen = self.weights == "int4"

    def _fast_format(self) -> str:
        """weights 'fast' -> a format: int4 weights (int8 LM head unless it lies on Q4_0's grid) on kvengine's kernel
        tier for this CPU, in the tier's activation dtype (layers/native.py; perplexity within 2% of fp32 on held-out
        text, tests/layers), where the dtype is left to auto on a CPU and a tier loads; else 'auto' (the float
        weights of the dtype)."""
        fast = self.dtype == "auto" and self.device == "cpu" and native.chosen() is not None
        return "int4" if fast else "auto"

    def resolved_dtype(self) -> str:
        """The compute (activation) dtype: as asked, else the float weight format's, else for int8/int4 weights
        on a CPU the activations of kvengine's kernel tier (layers/native.py: fp32, or bf16 on the avx512 tier forced
        with KVENGINE_ISA=avx512: never bf16 arithmetic a CPU emulates), else float32 on CPU and bfloat16 on CUDA."""
        float_weights = FLOAT_WEIGHTS.get(self.weights)
        if self.dtype != "auto":
            if float_weights is not None and float_weights != self.dtype:
                raise ConfigError(f"weights '{self.weights}' and dtype '{self.dtype}' disagree; give one of them")
            return self.dtype
        if float_weights is not None:
            return float_weights
        if self.quantized_weights and self.device == "cpu":
            tier = native.chosen()
            return str(tier.act_dtype).removeprefix("torch.") if tier is not None else "float32"
        return "float32" if self.device == "cpu" else "bfloat16"

    @property
    def quantized_weights(self) -> str | None:
        return self.weights if self.weights in ("int8", "int4") else None

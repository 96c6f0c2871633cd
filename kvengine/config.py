"""Configuration dataclasses: ModelConfig (a model's architecture numbers) and EngineConfig (how we run it).

ModelConfig is the one shape every module sees; each model family builds it from a Hugging Face `config.json`
dict or GGUF metadata in its own file (models/registry.py `config_from_hf`, `config_from_gguf`). No torch import:
accounting and the block manager use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from kvengine.cache.retention import Retention
from kvengine.errors import ConfigError


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in HF `rope_scaling` ("linear" or "llama3")."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        if kind not in ("linear", "llama3"):
            raise ConfigError(f"unsupported rope_scaling type '{kind}' (supported: linear, llama3)")
        return RopeScaling(
            kind=kind,
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Architecture numbers of one decoder-only transformer."""

    architecture: str  # the family: a key of models/registry.py FAMILIES ("llama", "gemma3", "gpt2")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate, up, down) vs a plain two-matmul MLP (GPT-2/3 presets)
    # Per layer: the sliding window W (the layer attends to its last W positions) or None (global).
    # Empty means every layer is global.
    layer_windows: tuple[int | None, ...] = ()
    # Gemma 3: local (sliding) layers use their own RoPE base; attention scale is query_pre_attn_scalar**-0.5.
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config field '{name}' must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of K (or V) for one token in one layer: kv heads x head dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return 1.0 / math.sqrt(self.head_dim)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, RopeScaling):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def gpt2_config(name: str, layers: int, width: int, heads: int, vocab: int = 50257, context: int = 1024,
                inner: int | None = None, act: str = "gelu_new", eps: float = 1e-5, bos: int | None = None,
                eos: tuple[int, ...] = ()) -> ModelConfig:
    """A GPT-2-style config (models/gpt2.py): learned positions, LayerNorm, biases everywhere, tied head. Here, not
    in models/, because the accounting presets (accounting/presets.py) build these without the model code."""
    return ModelConfig(architecture="gpt2", vocab_size=vocab, hidden_size=width, intermediate_size=inner or 4 * width,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
                       max_position_embeddings=context, rms_norm_eps=eps, tie_word_embeddings=True,
                       attention_bias=True, hidden_act=act, gated_mlp=False, bos_token_id=bos, eos_token_ids=eos,
                       name=name)


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
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    compile: bool = False  # torch.compile decode steps (see engine/compiled.py)
    # run whole decoder layers as one kvengine op each (the fused layer op: decode steps and prefill steps of short
    # prompts, int8/int4 or bf16 weights, Llama family), where it applies (models/llama.py enable_fused_layers,
    # engine/runner.py FUSED_ROW_KEYS)
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

    def _fast_format(self) -> str:
        """weights 'fast' -> a format: int4 weights (int8 LM head) on kvengine's kernel tier for this CPU, in the
        tier's activation dtype (layers/native.py; perplexity within 2% of fp32 on held-out text, tests/layers),
        where the dtype is left to auto on a CPU and a tier loads; else 'auto' (the float weights of the dtype)."""
        from kvengine.layers import native

        fast = self.dtype == "auto" and self.device == "cpu" and native.chosen() is not None
        return "int4" if fast else "auto"

    def resolved_dtype(self) -> str:
        """The compute (activation) dtype: as asked, else the float weight format's, else for int8/int4 weights
        on a CPU the activations of kvengine's kernel tier (layers/native.py: bf16 with AVX-512 BF16, else fp32:
        never bf16 arithmetic a CPU emulates), else float32 on CPU and bfloat16 on CUDA."""
        float_weights = FLOAT_WEIGHTS.get(self.weights)
        if self.dtype != "auto":
            if float_weights is not None and float_weights != self.dtype:
                raise ConfigError(f"weights '{self.weights}' and dtype '{self.dtype}' disagree; give one of them")
            return self.dtype
        if float_weights is not None:
            return float_weights
        if self.quantized_weights and self.device == "cpu":
            from kvengine.layers import native

            tier = native.chosen()
            return str(tier.act_dtype).removeprefix("torch.") if tier is not None else "float32"
        return "float32" if self.device == "cpu" else "bfloat16"

    @property
    def quantized_weights(self) -> str | None:
        return self.weights if self.weights in ("int8", "int4") else None

"""Configuration dataclasses: ModelConfig (a model's architecture numbers) and EngineConfig (how we run it).

ModelConfig is built from a Hugging Face `config.json` dict or from GGUF metadata; both parsers live
here so every other module sees one shape. No torch import: accounting and the block manager use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from kvengine.cache.retention import Retention
from kvengine.errors import ConfigError, ModelLoadError

# HF `model_type` -> our registry architecture name.
HF_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gpt2": "gpt2",
}
# GGUF `general.architecture` -> our registry architecture name.
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "llama", "gemma3": "gemma3", "gpt2": "gpt2"}


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

    architecture: str  # registry key: "llama" (Llama/Mistral/Qwen2/SmolLM) or "gemma3"
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

    # -- parsers ----------------------------------------------------------------------------------
    @staticmethod
    def from_hf_dict(d: dict[str, Any], name: str = "model") -> ModelConfig:
        """Build from a Hugging Face config.json dict (Llama, Mistral, Qwen2, Gemma 3)."""
        if "text_config" in d and d.get("model_type") == "gemma3":
            d = {**d["text_config"], "model_type": "gemma3_text"}
        model_type = d.get("model_type")
        if model_type == "gpt2":
            return _gpt2_from_hf(d, name)
        arch = HF_MODEL_TYPES.get(model_type or "")
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture '{model_type}' (supported model_type values: "
                f"{', '.join(sorted(HF_MODEL_TYPES))})"
            )
        rope_global, rope_local = _rope_parameters(d)
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            common = dict(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_global.get("rope_theta", 10000.0)),
                rope_scaling=RopeScaling.from_dict(rope_global),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", arch == "gemma3")),
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_tuple(d.get("eos_token_id")),
                name=name,
            )
        except KeyError as e:
            raise ConfigError(f"model config is missing the field {e.args[0]!r}") from None
        n_layers = common["num_layers"]
        if arch == "gemma3":
            common.update(
                layer_windows=_gemma3_windows(d, n_layers),
                rope_local_theta=float(rope_local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))),
                query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", common["head_dim"])),
                final_logit_softcapping=d.get("final_logit_softcapping"),
            )
        elif d.get("sliding_window") and d.get("use_sliding_window", True):
            window = int(d["sliding_window"])
            types = d.get("layer_types") or ["sliding_attention"] * n_layers
            common["layer_windows"] = tuple(window if t == "sliding_attention" else None for t in types)
        return ModelConfig(**common)

    @staticmethod
    def from_gguf_metadata(meta: dict[str, Any], name: str = "model") -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values)."""
        gguf_arch = meta.get("general.architecture")
        arch = GGUF_ARCHITECTURES.get(str(gguf_arch))
        if arch is None:
            raise ModelLoadError(
                f"unsupported GGUF architecture '{gguf_arch}' (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
            )

        def get(key: str, default: Any = None) -> Any:
            full = f"{gguf_arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise ConfigError(f"GGUF metadata is missing '{full}'")
            return default

        num_heads = int(get("attention.head_count"))
        if arch == "gpt2":
            return gpt2_config(name, int(get("block_count")), int(get("embedding_length")), num_heads,
                         int(meta.get("gpt2.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))),
                         int(get("context_length")), int(get("feed_forward_length")), "gelu_new",
                         float(get("attention.layer_norm_epsilon", 1e-5)), meta.get("tokenizer.ggml.bos_token_id"),
                         _as_tuple(meta.get("tokenizer.ggml.eos_token_id")))
        hidden = int(get("embedding_length"))
        n_layers = int(get("block_count"))
        kv_heads = get("attention.head_count_kv", num_heads)
        head_dim = int(get("attention.key_length", hidden // num_heads))
        vocab = meta.get(f"{gguf_arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        common = dict(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=n_layers,
            num_heads=num_heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            attention_bias=False,  # set by the loader when bias tensors are present
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_tuple(meta.get("tokenizer.ggml.eos_token_id")),
            name=name,
        )
        scale_type = meta.get(f"{gguf_arch}.rope.scaling.type")
        if scale_type == "linear":
            common["rope_scaling"] = RopeScaling("linear", float(get("rope.scaling.factor")))
        if arch == "gemma3":
            window = int(get("attention.sliding_window", 512))
            pre_attn = hidden // num_heads if n_layers == 62 else head_dim  # llama.cpp: 27B scales by hidden/heads
            common.update(
                hidden_act="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                layer_windows=tuple(None if (i + 1) % 6 == 0 else window for i in range(n_layers)),
                rope_local_theta=10000.0,
                query_pre_attn_scalar=float(pre_attn),
            )
        return ModelConfig(**common)

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
    """A GPT-2-style config (models/gpt2.py): learned positions, LayerNorm, biases everywhere, tied head."""
    return ModelConfig(architecture="gpt2", vocab_size=vocab, hidden_size=width, intermediate_size=inner or 4 * width,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
                       max_position_embeddings=context, rms_norm_eps=eps, tie_word_embeddings=True,
                       attention_bias=True, hidden_act=act, gated_mlp=False, bos_token_id=bos, eos_token_ids=eos,
                       name=name)


GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")  # models/gpt2.py runs these


def _gpt2_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
    """A Hugging Face GPT-2 config.json (n_embd, n_layer, n_head, n_inner, activation_function, ...)."""
    act = str(d.get("activation_function", "gelu_new"))
    if act not in GPT2_ACTIVATIONS:
        raise ConfigError(f"unsupported activation_function '{act}' in the GPT-2 config "
                          f"(supported: {', '.join(GPT2_ACTIVATIONS)})")
    for field_name in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if d.get(field_name):
            raise ConfigError(f"GPT-2 config field '{field_name}' = true is not supported")
    try:
        width = int(d["n_embd"])
        return gpt2_config(name, int(d["n_layer"]), width, int(d["n_head"]), int(d["vocab_size"]),
                     int(d.get("n_positions", 1024)), int(d.get("n_inner") or 4 * width), act,
                     float(d.get("layer_norm_epsilon", 1e-5)), d.get("bos_token_id"),
                     _as_tuple(d.get("eos_token_id")))
    except KeyError as e:
        raise ConfigError(f"model config is missing the field {e.args[0]!r}") from None


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_parameters(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE settings from either transformers-5 `rope_parameters` or the older
    `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    merged = {**(d.get("rope_scaling") or {}), **params}
    merged.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    return merged, {}


def _gemma3_windows(d: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    window = int(d.get("sliding_window", 512))
    layer_types = d.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    pattern = int(d.get("sliding_window_pattern", 6))
    return tuple(None if (i + 1) % pattern == 0 else window for i in range(n_layers))


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
    # max_num_seqs sequences of max_model_len, capped at half of free memory.
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

"""ModelConfig: a model's architecture numbers (EngineConfig, how we run it, is engine/config.py).

ModelConfig is the one shape every module sees; each model family builds it from a Hugging Face `config.json`
dict or GGUF metadata in its own file (models/registry.py `config_from_hf`, `config_from_gguf`). No torch import:
accounting and the block manager use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

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
    # What else differs between families, as data the family sets (the accounting reads these, never a name):
    linear_bias: bool = False  # a bias on every linear layer (GPT-2), not only on q/k/v (attention_bias)
    layer_norm: bool = False  # LayerNorm (a weight and a bias) instead of RMSNorm (a weight)
    norms_per_layer: int = 2  # before attention and before the MLP; 4 with a norm after each too (Gemma 3)
    qk_norm: bool = False  # a norm over each head of q and of k (Gemma 3)
    learned_positions: bool = False  # learned absolute position embeddings added to the input (GPT-2), no RoPE
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
    def layer_biases(self) -> int:
        """Bias elements of one layer: q/k/v with attention_bias; o_proj and the MLP's too with linear_bias."""
        qkv = self.q_size + 2 * self.kv_size
        mlp_and_out = 2 * self.hidden_size + self.intermediate_size * (2 if self.gated_mlp else 1)  # o, down; up, gate
        return qkv * (self.attention_bias or self.linear_bias) + mlp_and_out * self.linear_bias

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
                       attention_bias=True, hidden_act=act, gated_mlp=False, linear_bias=True, layer_norm=True,
                       learned_positions=True, bos_token_id=bos, eos_token_ids=eos, name=name)

"""Gemma 3 (text): the Llama block plus Gemma's differences.

- embeddings scaled by sqrt(hidden_size) (the scale rounded to the compute dtype, as the reference does);
- RMSNorm scales by (1 + w), in four places per layer: before and after attention, before and after the MLP;
- q and k are RMS-normalized per head (QK-norm) before RoPE; attention scale is query_pre_attn_scalar**-0.5;
- sliding-window ("local") layers use their own RoPE base and the window, global layers the global base
  (with its scaling, if any) and full attention; the per-layer windows come from ModelConfig.layer_windows;
- GeGLU MLP (gelu tanh gate * up -> down); LM head tied to the embeddings; optional final logit soft-capping.

The decoder loop is the shared one (models/decoder.py); this file overrides its embedding, RoPE and logits hooks.
Parameter names follow Hugging Face's Gemma3ForCausalLM; q/k/v and gate/up are stored fused as in llama.py and
loaded by the shared CheckpointWeights. GGUF (llama.cpp) stores every norm weight as 1 + w and does
not permute Q/K rows (Gemma uses rotate-half RoPE there too); `gguf_to_hf` undoes the former only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.layers.norm import RMSNorm
from kvengine.layers.rotary import RotaryEmbedding
from kvengine.models.common import GGUF_LAYER_NAMES, gguf_name_to_hf, uninitialized_embedding
from kvengine.models.config_parse import GGUFMetadata, required_fields, rope_parameters, windows_from_layer_types
from kvengine.models.decoder import DecoderLM, Ropes, tied_head
from kvengine.models.llama import GatedMLP, LlamaAttention, llama_gguf_fields, llama_hf_fields

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
GLOBAL_EVERY = 6  # without a per-layer list, every sixth layer is global and the others slide
NORMS = {"norms_per_layer": 4, "qk_norm": True}  # a norm before and after attention and the MLP; q/k norms

# llama.cpp's Gemma 3 block tensors; `ffn_norm` is the norm *before* the MLP here, not after attention.
GEMMA3_GGUF_LAYER_NAMES = {
    **GGUF_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gemma_norm(dim: int, config: ModelConfig, dtype: torch.dtype) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, offset=GEMMA_NORM_OFFSET, dtype=dtype)


class Gemma3DecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = gemma_norm(hidden, config, dtype)
        self.self_attn = LlamaAttention(config, layer, dtype, qk_norm_offset=GEMMA_NORM_OFFSET)
        self.post_attention_layernorm = gemma_norm(hidden, config, dtype)
        self.pre_feedforward_layernorm = gemma_norm(hidden, config, dtype)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act, dtype)
        self.post_feedforward_layernorm = gemma_norm(hidden, config, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None, rope: Ropes) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch, kv, rope))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(DecoderLM):
    """The shared decoder loop (models/decoder.py) with Gemma's embedding scale, two RoPE bases and soft-capping."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = uninitialized_embedding(config, dtype)
        # sqrt(hidden) made a float32 tensor, then rounded to the compute dtype (bf16 gives 25.25, not 25.30)
        scale = torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32).to(dtype)  # []
        self.register_buffer("embed_scale", scale, persistent=False)
        self.global_rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                           config.rope_scaling, dtype)
        local_theta = config.rope_local_theta if config.rope_local_theta is not None else config.rope_theta
        self.local_rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, local_theta, None, dtype)
        self.layers = torch.nn.ModuleList(Gemma3DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = gemma_norm(config.hidden_size, config, dtype)
        self.lm_head = tied_head(config, self.embed_tokens, dtype)

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_tokens(batch.input_ids) * self.embed_scale  # [T, hidden]

    def layer_ropes(self, batch: StepBatch) -> Sequence[Ropes]:
        # cos, sin [T, 1, D] for each RoPE base, once per step: global layers and sliding-window ("local") ones
        full, local = Ropes.for_batch(self.global_rope, batch), Ropes.for_batch(self.local_rope, batch)
        return [full if self.config.window(i) is None else local for i in range(len(self.layers))]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().logits(x)  # [N, vocab]
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- config ---------------------------------------------------------------------------------------------
    @staticmethod
    def config_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
        """Gemma 3 text configs (`gemma3_text`), or the text tower of a multimodal `gemma3` config."""
        if "text_config" in d and d.get("model_type") == "gemma3":
            d = {**d["text_config"], "model_type": "gemma3_text"}
        rope_global, rope_local = rope_parameters(d)
        with required_fields():
            fields = llama_hf_fields(d, "gemma3", rope_global, name)
        fields.update(
            **NORMS,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            layer_windows=_hf_windows(d, fields["num_layers"]),
            rope_local_theta=float(rope_local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", fields["head_dim"])),
            final_logit_softcapping=d.get("final_logit_softcapping"),
        )
        return ModelConfig(**fields)

    @staticmethod
    def config_from_gguf(meta: GGUFMetadata, name: str) -> ModelConfig:
        """The metadata holds no layer pattern, local RoPE base or query_pre_attn_scalar: llama.cpp's defaults."""
        fields = llama_gguf_fields(meta, "gemma3", name)
        window = int(meta.get("attention.sliding_window", 512))
        n_layers, heads = fields["num_layers"], fields["num_heads"]
        pre_attn = fields["hidden_size"] // heads if n_layers == 62 else fields["head_dim"]  # llama.cpp: 27B
        fields.update(
            **NORMS,
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            layer_windows=_global_every(GLOBAL_EVERY, n_layers, window),
            rope_local_theta=10000.0,
            query_pre_attn_scalar=float(pre_attn),
        )
        return ModelConfig(**fields)

    # -- weights: load_weight / expected_weights come from CheckpointWeights -------------------------
    @staticmethod
    def gguf_to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor] | None:
        """Map a GGUF tensor to (HF name, tensor in HF layout); None for tensors we do not use.

        llama.cpp's converter stores every Gemma norm weight as 1 + w (ggml multiplies by the weight
        directly); Hugging Face keeps w and adds the 1 in the norm. Q/K rows are not permuted for Gemma."""
        hf = gguf_name_to_hf(name, GEMMA3_GGUF_LAYER_NAMES)
        if hf is None:
            return None
        if hf.endswith("norm.weight"):
            tensor = tensor - GEMMA_NORM_OFFSET
        return hf, tensor


def _hf_windows(d: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    window = int(d.get("sliding_window", 512))
    layer_types = d.get("layer_types")
    if layer_types:
        return windows_from_layer_types(layer_types, window)
    return _global_every(int(d.get("sliding_window_pattern", GLOBAL_EVERY)), n_layers, window)


def _global_every(pattern: int, n_layers: int, window: int) -> tuple[int | None, ...]:
    """Layers pattern - 1, 2 * pattern - 1, ... global (None), the others sliding over `window` tokens."""
    return tuple(None if (i + 1) % pattern == 0 else window for i in range(n_layers))

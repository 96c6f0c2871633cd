"""Gemma 3 (text): the Llama block plus Gemma's differences.

- embeddings scaled by sqrt(hidden_size) (the scale rounded to the compute dtype, as the reference does);
- RMSNorm scales by (1 + w), in four places per layer: before and after attention, before and after the MLP;
- q and k are RMS-normalized per head (QK-norm) before RoPE; attention scale is query_pre_attn_scalar**-0.5;
- sliding-window ("local") layers use their own RoPE base and the window, global layers the global base
  (with its scaling, if any) and full attention; the per-layer windows come from ModelConfig.layer_windows;
- GeGLU MLP (gelu tanh gate * up -> down); LM head tied to the embeddings; optional final logit soft-capping.

Parameter names follow Hugging Face's Gemma3ForCausalLM; q/k/v and gate/up are stored fused as in llama.py,
whose weight-loading methods this class shares. GGUF (llama.cpp) stores every norm weight as 1 + w and does
not permute Q/K rows (Gemma uses rotate-half RoPE there too); `gguf_to_hf` undoes the former only.
"""

from __future__ import annotations

import torch

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.layers.linear import Linear
from kvengine.layers.norm import RMSNorm
from kvengine.layers.rotary import RotaryEmbedding
from kvengine.models.common import GGUF_LAYER_NAMES, CheckpointWeights, gguf_name_to_hf, uninitialized_embedding
from kvengine.models.llama import GatedMLP, LlamaAttention, Ropes

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + weight)

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


class Gemma3ForCausalLM(CheckpointWeights, torch.nn.Module):
    """forward(batch, kv) -> logits of the rows `batch.logits_indices`: [N, vocab]."""

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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids) * self.embed_scale  # [T, hidden]
        # cos, sin [T, 1, D] for each RoPE base, once per step: global layers and sliding-window ("local") ones
        full, local = Ropes.for_batch(self.global_rope, batch), Ropes.for_batch(self.local_rope, batch)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, kv, full if self.config.window(i) is None else local)
        x = self.norm(x[batch.logits_indices])  # [N, hidden]: only rows that are sampled
        logits = self.lm_head(x).float()  # [N, vocab]
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

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

"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): RoPE, grouped-query attention, RMSNorm, SwiGLU.

Parameter names follow Hugging Face checkpoints, except that q/k/v and gate/up are stored fused
(`qkv_proj`, `gate_up_proj`); `load_weight` routes the separate checkpoint tensors into their slices.
GGUF tensor names and layout are translated by `gguf_to_hf`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.errors import ModelLoadError
from kvengine.layers.attention import attend
from kvengine.layers.linear import Linear
from kvengine.layers.norm import RMSNorm
from kvengine.layers.rotary import RotaryEmbedding

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.attn_scale
        self.window = config.window(layer)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, False, dtype)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(n, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(n, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = self.rotary(batch.positions, q, k)
        layer_kv = kv.layer(self.layer) if kv is not None else None
        out = attend(q, k, v, layer_kv, batch, self.scale, self.window)  # [T, Hq, D]
        return self.o_proj(out.view(n, self.q_size))


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation '{act}' (supported: {', '.join(ACTIVATIONS)})")
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, False, dtype)
        self.down_proj = Linear(intermediate, hidden, False, dtype)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [T, I] each
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, layer, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(torch.nn.Module):
    """forward(batch, kv) -> logits of the rows `batch.logits_indices`: [N, vocab]."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling, dtype)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(x, batch, kv)
        x = self.norm(x[batch.logits_indices])  # [N, hidden]: only rows that are sampled
        return self.lm_head(x).float()  # [N, vocab]

    # -- weights ----------------------------------------------------------------------------------
    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Copy one checkpoint tensor (HF name) into its parameter; returns the parameter name it filled."""
        name = name.removeprefix("model.")
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return "lm_head.weight"  # tied: the embedding already holds it
        target, shard = _fused_target(name, self.config)
        params = self._params()
        if target not in params:
            raise ModelLoadError(f"unexpected tensor '{name}' in checkpoint")
        param = params[target]
        region = param.data if shard is None else param.data.narrow(0, *shard)
        if region.shape != tensor.shape:
            raise ModelLoadError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(region.shape)}")
        region.copy_(tensor)
        return target if shard is None else f"{target}[{shard[0]}:{shard[0] + shard[1]}]"

    def _params(self) -> dict[str, torch.nn.Parameter]:
        if not hasattr(self, "_param_index"):
            self._param_index = dict(self.named_parameters(remove_duplicate=False))
        return self._param_index

    def expected_weights(self) -> set[str]:
        """Every region load_weight must fill (fused parameters listed by slice)."""
        out: set[str] = set()
        for name, _ in self.named_parameters():
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                c = self.config
                out |= {f"{name}[0:{c.q_size}]", f"{name}[{c.q_size}:{c.q_size + c.kv_size}]",
                        f"{name}[{c.q_size + c.kv_size}:{c.q_size + 2 * c.kv_size}]"}
            elif name.endswith("gate_up_proj.weight"):
                i = self.config.intermediate_size
                out |= {f"{name}[0:{i}]", f"{name}[{i}:{2 * i}]"}
            else:
                out.add(name)
        return out

    @staticmethod
    def gguf_to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor] | None:
        """Map a GGUF tensor to (HF name, tensor in HF layout); None for tensors we do not use."""
        hf = gguf_name_to_hf(name)
        if hf is None:
            return None
        # llama.cpp's converter reorders Q/K rows for its interleaved RoPE; put them back in HF order.
        if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
            tensor = unpermute_rope_rows(tensor, config.num_heads)
        elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
            tensor = unpermute_rope_rows(tensor, config.num_kv_heads)
        return hf, tensor


GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_name_to_hf(name: str, layer_names: dict[str, str] = GGUF_LAYER_NAMES) -> str | None:
    m = _BLK.match(name)
    if m:
        part = layer_names.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    base = GGUF_GLOBAL_NAMES.get(stem)
    return None if base is None else f"{base}.{kind}"


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows (pair, 2) -> (2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _fused_target(name: str, config: ModelConfig) -> tuple[str, tuple[int, int] | None]:
    """HF tensor name -> (our parameter name, (row offset, rows) slice or None)."""
    for proj, offset, size in (("q_proj", 0, config.q_size), ("k_proj", config.q_size, config.kv_size),
                               ("v_proj", config.q_size + config.kv_size, config.kv_size)):
        if f".self_attn.{proj}." in name:
            return name.replace(proj, "qkv_proj"), (offset, size)
    for proj, offset in (("gate_proj", 0), ("up_proj", config.intermediate_size)):
        if f".mlp.{proj}." in name:
            return name.replace(proj, "gate_up_proj"), (offset, config.intermediate_size)
    return name, None

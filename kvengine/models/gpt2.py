"""The GPT-2 family (GPT-2, and the seeds' GPT-style models): learned absolute positions, LayerNorm with a bias,
fused QKV with biases, a plain two-matmul GELU MLP, an LM head tied to the token embeddings.

Parameter names follow Hugging Face's GPT2LMHeadModel without its `transformer.` prefix (`wte`, `wpe`,
`h.N.attn.c_attn`, `ln_f`, ...), so checkpoints from GPT2Model and GPT2LMHeadModel both load. Hugging Face keeps
these linears as Conv1D, weight [in, out]; `load_weight` transposes them into `Linear`'s [out, in]. GGUF
(llama.cpp's `gpt2` architecture) stores them already transposed; `gguf_to_hf` turns them back into HF's
layout so one path loads both.

Attention, the paged KV cache, the scheduler and the prefix cache are the shared ones (layers/attention.py);
positions are added once at the embedding, so nothing in a layer depends on where a token sits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig, gpt2_config
from kvengine.errors import ConfigError, ModelLoadError
from kvengine.layers.backends import attend
from kvengine.layers.linear import Linear
from kvengine.models.common import gguf_name_to_hf
from kvengine.models.config_parse import GGUFMetadata, int_tuple, required_fields
from kvengine.models.decoder import DecoderLM, Ropes, tied_head

# HF `activation_function` values GPT-2 checkpoints use; "gelu_new" is GELU with the tanh approximation.
GPT2_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# buffers some GPT-2 checkpoints carry (the causal mask); not weights
IGNORED = (".attn.bias", ".attn.masked_bias")
GPT2_GGUF_LAYER_NAMES = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
GPT2_GGUF_GLOBAL_NAMES = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}
FUSED_LAYERS_REASON = ("kvengine's fused layer op runs RMSNorm, RoPE and a bias-free SiLU-gated MLP; GPT-2 has "
                       "LayerNorm with a bias, learned positions, biases on every linear and a plain GELU MLP")


class GPT2Attention(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim, self.scale = config.num_heads, config.head_dim, config.attn_scale
        self.c_attn = Linear(config.hidden_size, 3 * config.q_size, True, dtype)
        self.c_proj = Linear(config.q_size, config.hidden_size, True, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.c_attn(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, D] each
        view = batch.kv[kv.group_of[self.layer]] if kv is not None and batch.kv is not None else None
        layer_kv = kv.layer(self.layer) if view is not None else None
        out = attend(q, k, v, layer_kv, view, batch, self.scale)  # [T, H, D]
        return self.c_proj(out.reshape(n, -1))


class GPT2MLP(torch.nn.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, True, dtype)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, True, dtype)
        self.act = gpt2_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def gpt2_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in GPT2_ACTIVATIONS:
        raise ModelLoadError(f"unsupported activation_function '{name}' (supported: {', '.join(GPT2_ACTIVATIONS)})")
    return GPT2_ACTIVATIONS[name]


def layer_norm(config: ModelConfig, dtype: torch.dtype) -> torch.nn.LayerNorm:
    return torch.nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class GPT2Block(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = layer_norm(config, dtype)
        self.attn = GPT2Attention(config, layer, dtype)
        self.ln_2 = layer_norm(config, dtype)
        self.mlp = GPT2MLP(config, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None, rope: Ropes | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, kv)
        return x + self.mlp(self.ln_2(x))


class GPT2ForCausalLM(DecoderLM):
    """The shared decoder loop (models/decoder.py) over HF's names: `h` its layers, `ln_f` its final norm; the
    embedding adds the learned positions, and no layer takes RoPE tables."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        # [vocab, hidden] and [positions, hidden]; the checkpoint (or random_init) fills them
        self.wte = torch.nn.Embedding(config.vocab_size, config.hidden_size, _freeze=True,
                                      _weight=torch.empty(config.vocab_size, config.hidden_size, dtype=dtype))
        self.wpe = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size, _freeze=True,
                                      _weight=torch.empty(config.max_position_embeddings, config.hidden_size,
                                                          dtype=dtype))
        self.h = torch.nn.ModuleList(GPT2Block(config, i, dtype) for i in range(config.num_layers))
        self.ln_f = layer_norm(config, dtype)
        self.lm_head = tied_head(config, self.wte, dtype)

    @property
    def layers(self) -> torch.nn.ModuleList:  # type: ignore[override]
        return self.h

    @property
    def norm(self) -> torch.nn.Module:  # type: ignore[override]
        return self.ln_f

    def embed(self, batch: StepBatch) -> torch.Tensor:
        if int(batch.positions.max()) >= self.config.max_position_embeddings:
            raise ModelLoadError(f"position {int(batch.positions.max())} is past the model's "
                                 f"{self.config.max_position_embeddings} learned positions")
        return self.wte(batch.input_ids) + self.wpe(batch.positions)  # [T, hidden]

    def enable_fused_layers(self, kv_dtype: torch.dtype | None) -> str:
        """GPT-2 runs layer by layer; the reason goes into the run summary."""
        return FUSED_LAYERS_REASON

    # -- config -----------------------------------------------------------------------------------------------
    @staticmethod
    def config_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
        """A Hugging Face GPT-2 config.json (n_embd, n_layer, n_head, n_inner, activation_function, ...)."""
        act = str(d.get("activation_function", "gelu_new"))
        if act not in GPT2_ACTIVATIONS:
            raise ConfigError(f"unsupported activation_function '{act}' in the GPT-2 config "
                              f"(supported: {', '.join(GPT2_ACTIVATIONS)})")
        for field_name in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if d.get(field_name):
                raise ConfigError(f"GPT-2 config field '{field_name}' = true is not supported")
        with required_fields():
            width = int(d["n_embd"])
            return gpt2_config(name, int(d["n_layer"]), width, int(d["n_head"]), int(d["vocab_size"]),
                               int(d.get("n_positions", 1024)), int(d.get("n_inner") or 4 * width), act,
                               float(d.get("layer_norm_epsilon", 1e-5)), d.get("bos_token_id"),
                               int_tuple(d.get("eos_token_id")))

    @staticmethod
    def config_from_gguf(meta: GGUFMetadata, name: str) -> ModelConfig:
        heads = int(meta.get("attention.head_count"))
        return gpt2_config(name, int(meta.get("block_count")), int(meta.get("embedding_length")), heads,
                           meta.vocab_size(), int(meta.get("context_length")), int(meta.get("feed_forward_length")),
                           "gelu_new", float(meta.get("attention.layer_norm_epsilon", 1e-5)), meta.bos_token_id,
                           meta.eos_token_ids)

    # -- weights ------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, config: ModelConfig, seed: int) -> GPT2ForCausalLM:
        model = cls(config, torch.float32)
        model.random_init(seed)
        return model

    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """One HF GPT-2 tensor (Conv1D weights [in, out]) into its parameter; returns the parameter name."""
        name = name.removeprefix("transformer.")
        if name.endswith(IGNORED) and tensor.dim() > 1:
            return name  # the causal-mask buffer of older checkpoints
        if name.endswith(CONV1D):
            expected = tuple(self._params()[name].shape[::-1]) if name in self._params() else None
            if expected is not None and tuple(tensor.shape) != expected:
                raise ModelLoadError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {expected} "
                                     "(Conv1D: [in, out])")
            tensor = tensor.t()
        return super().load_weight(name, tensor)

    @staticmethod
    def gguf_to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor] | None:
        """Map a GGUF tensor to (HF GPT-2 name, tensor in HF layout); None for tensors we do not use.
        llama.cpp's converter transposed the Conv1D weights to [out, in]; HF keeps [in, out]."""
        hf = gguf_name_to_hf(name, GPT2_GGUF_LAYER_NAMES, GPT2_GGUF_GLOBAL_NAMES)
        if hf is None:
            return None
        hf = hf.replace("model.layers.", "h.")
        return hf, tensor.t() if hf.endswith(CONV1D) else tensor

    def random_init(self, seed: int) -> None:
        """GPT-2's initialisation from a seed: N(0, 0.02) weights and embeddings, zero biases, unit norms (the
        residual projections scaled by 1/sqrt(2 * layers), as GPT-2 does)."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / (2 * self.config.num_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if ".ln_" in name or name.startswith("ln_f"):
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    std = residual_std if name.endswith("c_proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

"""What every model family shares: loading Hugging Face-named checkpoint tensors into fused parameters,
the GGUF tensor-name table, and an embedding left uninitialized for the checkpoint to fill.

Models store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`; `load_weight` routes each separate
checkpoint tensor into its slice and `expected_weights` lists every slice that must be filled.
"""

from __future__ import annotations

import re

import torch

from kvengine.config import ModelConfig
from kvengine.errors import ModelLoadError

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_name_to_hf(name: str, layer_names: dict[str, str] = GGUF_LAYER_NAMES,
                    global_names: dict[str, str] = GGUF_GLOBAL_NAMES) -> str | None:
    m = _BLK.match(name)
    if m:
        part = layer_names.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    base = global_names.get(stem)
    return None if base is None else f"{base}.{kind}"


def uninitialized_embedding(config: ModelConfig, dtype: torch.dtype) -> torch.nn.Embedding:
    """[vocab, hidden] embedding without random init (the checkpoint fills it; init of a large table takes seconds)."""
    weight = torch.empty(config.vocab_size, config.hidden_size, dtype=dtype)  # [vocab, hidden]
    return torch.nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight, _freeze=True)


class CheckpointWeights:
    """Mixin for models (torch.nn.Module subclasses with a `config: ModelConfig`)."""

    config: ModelConfig

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

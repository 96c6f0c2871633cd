"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): RoPE, grouped-query attention, RMSNorm, SwiGLU.

Parameter names follow Hugging Face checkpoints, except that q/k/v and gate/up are stored fused
(`qkv_proj`, `gate_up_proj`); `load_weight` routes the separate checkpoint tensors into their slices.
GGUF tensor names and layout are translated by `gguf_to_hf`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvengine.batch import StepBatch
from kvengine.cache.pool import KVPool, step_scratch
from kvengine.config import ModelConfig, RopeScaling
from kvengine.errors import ModelLoadError
from kvengine.layers import native
from kvengine.layers.backends import FusedLayersMetadata, attend, no_cache_rows
from kvengine.layers.linear import Linear, PackedLinear
from kvengine.layers.norm import RMSNorm
from kvengine.layers.rotary import RotaryEmbedding, rotate
from kvengine.models.common import gguf_name_to_hf, uninitialized_embedding
from kvengine.models.config_parse import (
    GGUFMetadata,
    int_tuple,
    required_fields,
    rope_parameters,
    windows_from_layer_types,
)
from kvengine.models.decoder import DecoderLM, Ropes, tied_head

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype,
                 qk_norm_offset: float | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.attn_scale
        self.window = config.window(layer)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, False, dtype)
        # QK-norm (Gemma 3, Qwen3): each q and k head RMS-normalized over head_dim before RoPE
        self.q_norm = self.k_norm = None
        if qk_norm_offset is not None:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, qk_norm_offset, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, qk_norm_offset, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None, rope: Ropes) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        view = batch.kv[kv.group_of[self.layer]] if kv is not None and batch.kv is not None else None
        q_pre = None  # the query before RoPE, kept when sink keys need it at another position
        if self.q_norm is None and not (view is not None and view.sinks):  # q, k adjacent in qkv: rotate at once
            qk = rotate(qkv[:, :self.q_size + self.kv_size].view(n, -1, self.head_dim), *rope.text)  # [T, Hq+Hkv, D]
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        else:
            q_pre = qkv[:, :self.q_size].view(n, self.num_heads, self.head_dim)  # [T, Hq, D]
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            if self.q_norm is not None:
                q_pre, k = self.q_norm(q_pre), self.k_norm(k)
            q, k = rotate(q_pre, *rope.text), rotate(k, *rope.text)
        q_sink = rotate(q_pre, *rope.cache) if view is not None and view.sinks and rope.cache is not None else None
        layer_kv = kv.layer(self.layer) if view is not None else None
        out = attend(q, k, v, layer_kv, view, batch, self.scale, self.window, q_sink)  # [T, Hq, D]
        return self.o_proj(out.reshape(n, self.q_size))


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
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, layer, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVPool | None, rope: Ropes) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, kv, rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_weights(self) -> list[torch.Tensor] | None:
        """The weights `kvengine::decode_layer` (layers/csrc/decode_layer.cpp) takes for this layer, or None when
        the layer has a part that op does not run: a linear layer neither on kvengine's tile kernels nor with
        bf16 weights, or with a bias; QK-norm; an activation other than SiLU; a sliding window."""
        attn, mlp = self.self_attn, self.mlp
        tiles = [fused_operands(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if (any(op is None for op in tiles) or attn.q_norm is not None or mlp.act is not F.silu
                or attn.window is not None or self.input_layernorm.offset):
            return None
        qkv, o, gate_up, down = tiles
        return [self.input_layernorm.weight, *qkv, *o, self.post_attention_layernorm.weight, *gate_up, *down]


class LlamaForCausalLM(DecoderLM):
    """The shared decoder loop (models/decoder.py) with one RoPE base for every layer; steps the runner planned
    for the fused layer op (enable_fused_layers) run each layer as one kvengine op instead."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = uninitialized_embedding(config, dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, dtype)
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = tied_head(config, self.embed_tokens, dtype)
        # the fused layer op's weights (enable_fused_layers), layer after layer, WEIGHTS_PER_LAYER each, as
        # decode_layers takes them; None while the model runs layer by layer
        self.fused_layer_weights: list[torch.Tensor] | None = None
        self.fused_tier = ""  # the kernel tier (layers/native.py) whose decode_layer runs them
        self.fused_kv_dtype = dtype  # the engine pool's K/V dtype, which no-cache steps' scratch K/V take too

    def enable_fused_layers(self, kv_dtype: torch.dtype | None) -> str:
        """Run every step as one `kvengine::decode_layer` op per layer (all of them in one `decode_layers` call):
        decode steps (one sequence or several), prefill of any length, and no-cache steps (the PyTorch ops'
        dispatch otherwise costs more than their arithmetic in decode steps; compilation removes it too, but
        traces again in every process). One path for every step is what makes cached and uncached tokens the
        same: the op computes each row on its own, so a token's keys, values and logits do not depend on the step
        that computed it. `kv_dtype`: the engine pool's plain dtype (cache/pool.py plain_kv_dtype). Returns ""
        when enabled, else why not, for the run summary."""
        tier = native.tier_for(self.norm.weight.dtype)
        weights = [layer.fused_weights() for layer in self.layers]
        if tier is None or any(w is None for w in weights):
            chosen = native.chosen()
            act = "bf16" if chosen is None or chosen.act_dtype == torch.bfloat16 else "fp32"
            bf16 = " or bf16 weights" if act == "bf16" else ""
            return f"it needs {act} activations, and kvengine's tile kernels{bf16} in every linear layer"
        if not tier.reads_kv(kv_dtype):
            names = [str(d).removeprefix("torch.") for d in (tier.act_dtype, *tier.narrow_kv)]
            kinds = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
            return f"it needs a {kinds} KV cache that keeps every token"
        if self.config.head_dim % tier.head_dim_step:
            return f"it needs a head_dim that is a multiple of {tier.head_dim_step}"
        self.fused_layer_weights, self.fused_tier = [w for layer in weights for w in layer], tier.name
        self.fused_kv_dtype = kv_dtype
        return ""

    @property
    def fused_layers_enabled(self) -> bool:
        return self.fused_layer_weights is not None

    def fused_layers_read(self, pool: KVPool) -> bool:
        """Whether the enabled op can read `pool`: the engine's pool was checked by enable_fused_layers, but a
        runner of its own (eval's scoring runner, a quantized or bf16 KV cache) may hold another; that one's steps
        run layer by layer."""
        return self.fused_layers_enabled and native.tier(self.fused_tier).reads_kv(pool.plain_dtype())

    def runs_fused_layers(self, batch: StepBatch, kv: KVPool | None) -> bool:
        """Whether forward(batch, kv) takes the one-op-per-layer path: every step once enable_fused_layers took the
        layers, a no-cache step (kv None) too; a cached step as the runner planned it (engine/runner.py
        `_backend_for`). The pool was checked once, by enable_fused_layers."""
        if not self.fused_layers_enabled:
            return False
        return kv is None or (batch.kv is not None and batch.kv[0].backend.runs_whole_layers)

    def _forward_fused(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        """The step through the op. With the pool, each layer writes and reads its slots as the runner planned;
        without (kv None: the no-cache baseline), every layer writes all the step's K/V into one scratch that is
        dropped with the step, and each token reads its own sequence's up to itself (`no_cache_rows`)."""
        assert self.fused_layer_weights is not None
        c = self.config
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        if kv is None:
            meta = no_cache_rows(batch)
            scratch = step_scratch(batch.num_tokens, c.num_kv_heads, c.head_dim, self.fused_kv_dtype,
                                   x.device)  # [Hkv, T, D] each
            layer_kvs = [scratch] * len(self.layers)
        else:
            meta, layer_kvs = batch.kv[0].metadata, kv.layers
        assert isinstance(meta, FusedLayersMetadata)
        cos, sin = self.rotary.table(batch.positions, batch.max_context_len)  # [T, 1, D] each
        # every layer in one call (layers/csrc/layer_stack.h): a call per layer cost more than a small layer's work
        x = native.ops(self.fused_tier).decode_layers(
            x, self.fused_layer_weights, cos, sin, [kv.k for kv in layer_kvs], [kv.v for kv in layer_kvs], meta.slots,
            meta.row_seq, meta.row_lens, c.num_heads, c.num_kv_heads, c.rms_norm_eps, c.attn_scale)  # [T, hidden]
        x = self.norm(x[batch.logits_indices])  # [N, hidden]
        head = self.lm_head
        if (type(head) is Linear and head.weight.dtype == torch.bfloat16 and len(x) <= BF16_MM_ROWS
                and head.bias is None and head.in_features % 32 == 0):
            return native.ops(self.fused_tier).bf16_mm(x, head.weight).float()  # [N, vocab]: read at memory speed
        return head(x).float()  # [N, vocab]

    def forward(self, batch: StepBatch, kv: KVPool | None) -> torch.Tensor:
        if self.runs_fused_layers(batch, kv):
            return self._forward_fused(batch, kv)
        return super().forward(batch, kv)

    def layer_ropes(self, batch: StepBatch) -> Sequence[Ropes]:
        return [Ropes.for_batch(self.rotary, batch)] * len(self.layers)  # cos, sin [T, 1, D], shared by every layer

    # -- config -------------------------------------------------------------------------------------------------
    @staticmethod
    def config_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
        """Llama, Mistral and Qwen2 configs; Mistral's and Qwen2's sliding windows where they use them."""
        rope, _ = rope_parameters(d)
        with required_fields():
            fields = llama_hf_fields(d, "llama", rope, name)
        if d.get("sliding_window") and d.get("use_sliding_window", True):
            types = d.get("layer_types") or ["sliding_attention"] * fields["num_layers"]
            fields["layer_windows"] = windows_from_layer_types(types, int(d["sliding_window"]))
        return ModelConfig(**fields)

    @staticmethod
    def config_from_gguf(meta: GGUFMetadata, name: str) -> ModelConfig:
        return ModelConfig(**llama_gguf_fields(meta, "llama", name))

    # -- weights: load_weight / expected_weights come from CheckpointWeights -------------------------
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


WEIGHTS_PER_LAYER = 10  # decode_layer's weights for one layer (LlamaDecoderLayer.fused_weights; layer_flow.h)
BF16_MM_ROWS = 4  # steps of at most this many rows multiply bf16 weights with bf16_mm (decode_layer.cpp's kFewRows)


def fused_operands(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A linear layer's pair for `kvengine::decode_layer`: its tiles (kvengine's gemm kernels), or a bf16 weight
    and an unused empty tensor (the avx512 tier's bf16_mm); None for anything else (a bias, fp32 weights, other
    kernels)."""
    if isinstance(layer, PackedLinear):
        return layer.tile_operands()
    tier = native.tier_for(torch.bfloat16)
    if (isinstance(layer, Linear) and layer.bias is None and layer.weight.dtype == torch.bfloat16
            and tier is not None and tier.row_kernels):
        return layer.weight, layer.weight.new_empty(0)
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows (pair, 2) -> (2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_hf_fields(d: dict[str, Any], architecture: str, rope: dict[str, Any], name: str) -> dict[str, Any]:
    """The ModelConfig fields of a Llama-style config.json (Gemma 3 reads these too), with the global RoPE
    settings `rope` (config_parse.rope_parameters). A missing required field is a KeyError."""
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    return dict(
        architecture=architecture,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling.from_dict(rope),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
        hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=int_tuple(d.get("eos_token_id")),
        name=name,
    )


def llama_gguf_fields(meta: GGUFMetadata, architecture: str, name: str) -> dict[str, Any]:
    """The ModelConfig fields of a Llama-style GGUF file's metadata (Gemma 3 reads these too)."""
    num_heads = int(meta.get("attention.head_count"))
    hidden = int(meta.get("embedding_length"))
    n_layers = int(meta.get("block_count"))
    kv_heads = int(meta.get("attention.head_count_kv", num_heads))
    head_dim = int(meta.get("attention.key_length", hidden // num_heads))
    fields: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=meta.vocab_size(),
        hidden_size=hidden,
        intermediate_size=int(meta.get("feed_forward_length")),
        num_layers=n_layers,
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.get("context_length")),
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        attention_bias=False,  # set by the loader when bias tensors are present
        bos_token_id=meta.bos_token_id,
        eos_token_ids=meta.eos_token_ids,
        name=name,
    )
    if meta.optional("rope.scaling.type") == "linear":
        fields["rope_scaling"] = RopeScaling("linear", float(meta.get("rope.scaling.factor")))
    return fields

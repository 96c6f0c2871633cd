"""Engine assembly: a loaded model, its tokenizer and an EngineConfig in; a ready LLMEngine out.

Assembly changes the model in place where the config asks for it: int8/int4 weights swap its linear layers
(layers/linear.py `quantize_linears`), and the fused layer op takes its layers' weights (models/llama.py
`enable_fused_layers`). It then sizes the KV pool from the budget, opens the KV disk tier over a DiskStore,
and hands the engine its parts with one line describing the weights for run summaries.
"""

from __future__ import annotations

import torch

from kvengine.cache.disk_store import DiskStore
from kvengine.cache.disk_tier import KVDiskTier
from kvengine.cache.fingerprint import kv_fingerprint
from kvengine.cache.pool import KVPool, num_blocks_for_budget, plain_kv_dtype
from kvengine.cache.retention import max_blocks
from kvengine.cache.spec import KVCacheSpec
from kvengine.cache.spec import kv_dtype as resolve_kv_dtype
from kvengine.config import ModelConfig
from kvengine.engine.config import EngineConfig
from kvengine.engine.engine import LLMEngine
from kvengine.errors import ConfigError
from kvengine.layers import native
from kvengine.layers.linear import PackedLinear, describe_kernels, quantize_linears
from kvengine.models.protocol import CausalLM
from kvengine.weights.tokenizer import Tokenizer

UNBOUNDED_CONTEXT = 1 << 30  # the length limit when a KV window bounds the cache (kv_window set)


def build_engine(model: CausalLM, tokenizer: Tokenizer | None, config: EngineConfig,
                 disk: DiskStore | None = None, model_id: str | None = None, weights_note: str = "",
                 dtype: torch.dtype | None = None) -> LLMEngine:
    """The engine for `model` under `config` (the model is changed in place: see the module docstring), with the
    KV disk tier over `disk` keyed by `model_id` and the rest of the fingerprint. `weights_note` goes before the
    weights' description in run summaries. `dtype`: the compute dtype where the model was loaded in another (float32
    weights quantized for bf16 activations); else the model's own."""
    mc: ModelConfig = model.config
    native.requested()  # a KVENGINE_ISA this CPU cannot run is a one-line error, whatever the weights
    max_len = context_limit(config, mc)
    dtype = dtype or next(model.parameters()).dtype
    weights = prepare_weights(model, config, dtype)
    fused = config.fused_layers and (config.quantized_weights or dtype == torch.bfloat16)
    narrow = fast_kv_dtype(config, dtype) if fused else None
    spec = pool_spec(config, mc, narrow or dtype)
    why_not = model.enable_fused_layers(plain_kv_dtype(spec)) if fused else None  # None: nothing to say
    if narrow is not None and why_not != "":  # the op does not take the model: "auto" is its dtype after all
        spec = pool_spec(config, mc, dtype)
        why_not = model.enable_fused_layers(plain_kv_dtype(spec))
    pool = allocate_pool(config, spec, max_len)  # (once: the op's answer needs only the pool's spec)
    if why_not is not None:
        weights += "; steps: " + (f"layer by layer ({why_not})" if why_not else "one kvengine op per layer")
    tier = None
    if disk is not None and config.enable_prefix_caching and pool.spec.prefix_cacheable:
        fingerprint = kv_fingerprint(model_id or "unknown", mc, pool.spec, weights, str(dtype).removeprefix("torch."))
        tier = KVDiskTier(disk, pool, fingerprint)
    return LLMEngine(model, tokenizer, config, pool, max_len, tier, weights_note + weights)


def context_limit(config: EngineConfig, mc: ModelConfig) -> int:
    """The longest sequence (prompt and output) the engine accepts."""
    if config.kv_window is not None:  # a bounded cache: generation may run past the model's context
        return config.max_model_len or UNBOUNDED_CONTEXT
    max_len = config.max_model_len or mc.max_position_embeddings
    if max_len > mc.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_len} exceeds the model's context of {mc.max_position_embeddings}")
    return max_len


def prepare_weights(model: torch.nn.Module, config: EngineConfig, dtype: torch.dtype) -> str:
    """Quantize the model's linear layers where the config asks; returns how the weights are stored."""
    if not config.quantized_weights:
        return describe_weights(dtype)
    if torch.device(config.device).type != "cpu":
        raise ConfigError(f"weights '{config.weights}' use CPU kernels; on {config.device} use bf16 or fp32")
    chosen = quantize_linears(model, config.quantized_weights, dtype, config.dense_above)
    cast_float_parts(model, dtype)
    dense = any(getattr(m, "dense", None) is not None for m in model.modules())
    return describe_weights(dtype, chosen, config.dense_above if dense else None, describe_kernels(model, dtype))


def cast_float_parts(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The float parameters and buffers outside the quantized layers (embeddings, norms, rotary tables), to `dtype`
    where they are another float dtype (a model loaded in float32 for its weights to be quantized exactly). float64
    tables and the quantized layers' own buffers (the kernels' formats) stay as they are."""
    def recast(t: torch.Tensor) -> bool:
        return t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.dtype != dtype

    packed = {id(m) for q in model.modules() if isinstance(q, PackedLinear) for m in q.modules()}
    for m in model.modules():
        if id(m) in packed:
            continue
        for p in m.parameters(recurse=False):
            if recast(p):
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if recast(b):
                m._buffers[name] = b.to(dtype)


def fast_kv_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The KV dtype "auto" means where the fused layer op runs on fp32 activations: bf16, half the bytes a token
    (the op rounds each key and value once as it writes it, and widens it exactly as it reads it; the no-cache
    steps' scratch K/V are bf16 too, so cached and uncached tokens stay identical). On the default model that cost
    +0.25% perplexity and bought 2x the sequences a budget holds (docs/kv-dtypes.md). None: "auto" is the compute
    dtype (another KV dtype asked for, or activations the tier keeps in its own dtype)."""
    tier = native.tier_for(dtype) if config.kv_cache_dtype == "auto" else None
    return torch.bfloat16 if tier is not None and torch.bfloat16 in tier.narrow_kv else None


def pool_spec(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> KVCacheSpec:
    """The KV pool's geometry, in `config.kv_cache_dtype` or, for "auto", `dtype`."""
    kv_name = str(dtype).removeprefix("torch.") if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
    return KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, resolve_kv_dtype(kv_name).name, config.block_size,
                       mc.layer_windows, config.kv_window, config.sink_tokens)


def allocate_pool(config: EngineConfig, spec: KVCacheSpec, max_len: int) -> KVPool:
    """The KV pool of `spec`, sized from `config.kv_cache_memory` (and no larger than max_num_seqs sequences need)."""
    per_seq = max_blocks(spec.groups, max_len, config.max_num_batched_tokens, config.block_size)
    num_blocks = num_blocks_for_budget(spec, config.kv_cache_memory, config.device, config.max_num_seqs * per_seq)
    return KVPool.allocate(spec, num_blocks, config.device)


def describe_weights(act_dtype: torch.dtype, chosen: dict[str, str] | None = None,
                     dense_above: int | None = None, kernels: str = "") -> str:
    """One line for the run summary: how the weights are stored and what the activations are."""
    act = str(act_dtype).removeprefix("torch.")
    if not chosen:
        return f"weights {act}"
    counts: dict[str, int] = {}
    for fmt in chosen.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    parts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items()))
    dense = f"; steps over {dense_above} rows use a dense {act} copy" if dense_above is not None else ""
    kernels = f"; {kernels}" if kernels else ""
    return f"weights quantized ({parts} linear layers; int4 groups of 32{dense}), activations {act}{kernels}"

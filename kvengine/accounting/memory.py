"""Memory accounting: KV cache bytes per token / sequence / batch, weight bytes, and what fits in a budget.

The KV byte math is `KVCacheSpec`'s (kvengine/cache/spec.py); this module only builds the spec for a
ModelConfig and reads it. `assume_mha=True` gives every query head its own K and V (the figure seeds 002
and 003 use), to set beside the model's real grouped-query cache.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from kvengine.accounting.flops import require_positive
from kvengine.cache.spec import KVCacheSpec, kv_dtype
from kvengine.config import ModelConfig
from kvengine.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'80GB' (decimal), '24GiB' (binary), '1e9' or a number -> bytes; ConfigError on anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read '{text}' as a size (examples: 80GB, 24GiB, 512MiB, 1e9)")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ConfigError(f"a memory size must be positive, got '{text}'")
    return int(value * _UNITS[unit])


def kv_cache_spec_for(config: ModelConfig, kv_dtype: str = "bfloat16", block_size: int = 16,
                      assume_mha: bool = False, kv_window: int | None = None, sink_tokens: int = 0) -> KVCacheSpec:
    """The KV cache geometry of `config` (its sliding windows included); with `assume_mha` one KV head per
    query head; with `kv_window` every layer bounded to its last kv_window tokens plus `sink_tokens`."""
    return KVCacheSpec(
        num_layers=config.num_layers,
        num_kv_heads=config.num_heads if assume_mha else config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=_kv_dtype_name(kv_dtype),
        block_size=block_size,
        layer_windows=config.layer_windows,
        kv_window=kv_window,
        sink_tokens=sink_tokens,
    )


def _kv_dtype_name(name: str) -> str:
    return kv_dtype(name).name  # canonical name; raises ConfigError listing the choices


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the model: embeddings, every layer's linears, biases and norms, the LM head if untied."""
    d, q, kv, ff = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    attention = d * q + 2 * d * kv + q * d
    mlp = (3 if config.gated_mlp else 2) * d * ff
    per_norm = 2 if config.layer_norm else 1  # LayerNorm: a weight and a bias per element; RMSNorm: a weight
    norms = per_norm * (config.norms_per_layer * d + 2 * config.head_dim * config.qk_norm)
    embeddings = config.vocab_size * d + config.max_position_embeddings * d * config.learned_positions
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * d
    layer = attention + mlp + config.layer_biases + norms
    return embeddings + config.num_layers * layer + per_norm * d + lm_head


def weights_bytes(config: ModelConfig, bits_per_weight: float = 16) -> int:
    """Bytes to hold every parameter at `bits_per_weight` (16 = bf16/fp16; about 4.5-5 for 4-bit GGUF)."""
    if not bits_per_weight > 0:
        raise ConfigError(f"bits per weight must be positive, got {bits_per_weight}")
    return math.ceil(parameter_count(config) * bits_per_weight / 8)


@dataclass(slots=True)
class MemoryReport:
    """What the KV cache and the weights of one model cost, and what fits in a memory budget."""

    model: str
    kv_dtype: str
    assume_mha: bool
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    context_len: int
    batch: int
    bytes_per_token_per_layer: float
    bytes_per_token: float  # every layer holding the token
    bytes_per_sequence: float  # one sequence of context_len tokens, sliding-window layers capped
    bytes_per_batch: float
    parameters: int
    weights_bits: float
    weights_bytes: int
    budget_bytes: int | None = None
    kv_budget_bytes: int | None = None  # budget left after the weights (0 when they do not fit)
    tokens_fit: int | None = None  # tokens (every layer holding each) that fit in the KV budget
    users_fit: int | None = None  # sequences of context_len tokens that fit in the KV budget
    kv_window: int | None = None  # every layer bounded to its last kv_window tokens (plus sink_tokens)
    sink_tokens: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def memory_report(config: ModelConfig, context_len: int, batch: int = 1, kv_dtype: str = "bfloat16",
                  budget_bytes: int | None = None, weights_bits: float = 16, assume_mha: bool = False,
                  block_size: int = 16, kv_window: int | None = None, sink_tokens: int = 0) -> MemoryReport:
    """KV bytes per token, per sequence of `context_len` tokens and per `batch` of them; weight bytes; and,
    given `budget_bytes`, how many tokens and users (at `context_len`) fit beside the weights."""
    require_positive(context_len, "context_len")
    require_positive(batch, "batch")
    spec = kv_cache_spec_for(config, kv_dtype, block_size, assume_mha, kv_window, sink_tokens)
    per_sequence = spec.bytes_for_sequence(context_len)
    weights = weights_bytes(config, weights_bits)
    report = MemoryReport(
        model=config.name, kv_dtype=spec.dtype, assume_mha=assume_mha, num_layers=spec.num_layers,
        kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, block_size=spec.block_size,
        context_len=context_len, batch=batch, bytes_per_token_per_layer=spec.bytes_per_token_per_layer,
        bytes_per_token=spec.bytes_per_token,
        bytes_per_sequence=per_sequence, bytes_per_batch=batch * per_sequence,
        parameters=parameter_count(config), weights_bits=weights_bits, weights_bytes=weights,
        kv_window=kv_window, sink_tokens=sink_tokens,
    )
    if budget_bytes is not None:
        budget = parse_bytes(budget_bytes)
        kv_budget = max(0, budget - weights)
        report.budget_bytes = budget
        report.kv_budget_bytes = kv_budget
        report.tokens_fit = math.floor(kv_budget / spec.bytes_per_token)
        report.users_fit = math.floor(kv_budget / per_sequence)
    return report

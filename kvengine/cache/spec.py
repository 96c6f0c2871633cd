"""KVCacheSpec: the shape and byte math of the KV cache. Every other module asks it how big the cache is.

bytes per token = 2 (K and V) x layers x kv heads x head dim x bytes per element, plus the scales that a
quantized KV dtype stores. A sliding-window layer holds at most its window of tokens.
No torch import: the accounting CLI and the block manager use this without loading PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvengine.cache.retention import KVGroup, Retention, kv_groups, layer_retentions
from kvengine.errors import ConfigError


@dataclass(slots=True, frozen=True)
class KVDtype:
    """How one K or V element is stored, and what scales come with it (kvengine/cache/pool.py stores exactly this).

    Scale bytes are counted for K and V together. Per-token scales are per token and kv head; per-channel key
    scales are kept per block (their bytes are amortized over `block_size` tokens); value groups split a head's
    channels into groups of `group(head_dim)` channels, each with its own scale and minimum.
    """

    name: str
    element_bits: int
    token_scale_bytes: int = 0  # per token, per kv head, K and V together (fp8, int8-token: a float16 scale each)
    block_channel_scale_bytes: int = 0  # per block, per kv head, per channel: K's float16 scale + minimum
    group_size: int = 0  # V quantized per token in groups of up to this many channels (0 = all channels)
    group_scale_bytes: int = 0  # per V group: float16 scale + minimum

    @property
    def is_float(self) -> bool:
        """Stored as a plain float tensor (no codes, no scales)."""
        return self.name in FLOAT_KV_DTYPES

    def group(self, head_dim: int) -> int:
        """Channels per V group: the largest divisor of head_dim up to group_size (group_size 32, head_dim 80 -> 16)."""
        return math.gcd(head_dim, self.group_size) if self.group_size else head_dim

    def scale_bytes(self, head_dim: int, block_size: int) -> float:
        """Scale bytes for one token in one kv head (K and V together), block-level scales amortized."""
        per_token = float(self.token_scale_bytes)
        if self.block_channel_scale_bytes:
            per_token += self.block_channel_scale_bytes * head_dim / block_size
        if self.group_scale_bytes:
            per_token += self.group_scale_bytes * (head_dim // self.group(head_dim))
        return per_token


FLOAT_KV_DTYPES = ("float32", "bfloat16", "float16")
KV_DTYPES: dict[str, KVDtype] = {
    "float32": KVDtype("float32", 32),
    "bfloat16": KVDtype("bfloat16", 16),
    "float16": KVDtype("float16", 16),
    # e4m3, one float16 scale (amax / 448) per token and kv head for K and for V.
    "fp8": KVDtype("fp8", 8, token_scale_bytes=4),
    # int8 in KIVI's layout: K per channel over each block (float16 scale + minimum per channel per block), V per
    # token (float16 scale + minimum per token and kv head).
    "int8": KVDtype("int8", 8, block_channel_scale_bytes=4, group_scale_bytes=4),
    # int8 with one symmetric float16 scale per token and kv head for K and for V (a simpler, less exact layout).
    "int8-token": KVDtype("int8-token", 8, token_scale_bytes=4),
    # KIVI-style int4: K per channel over each block (float16 scale + minimum per channel per block), V per token
    # in groups of 32 channels (float16 scale + minimum per group).
    "int4": KVDtype("int4", 4, block_channel_scale_bytes=4, group_size=32, group_scale_bytes=4),
}
KV_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                    "fp8_e4m3": "fp8", "e4m3": "fp8"}


def kv_dtype(name: str) -> KVDtype:
    key = KV_DTYPE_ALIASES.get(name, name)
    if key not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype '{name}' (choose from {', '.join(KV_DTYPES)})")
    return KV_DTYPES[key]


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    """The KV cache's geometry: what one token, one block and one sequence cost in bytes."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    block_size: int = 16
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window or None (global); empty = all global
    kv_window: int | None = None  # every layer keeps at most this many recent tokens (plus sinks); None = no bound
    sink_tokens: int = 0  # with kv_window: the first tokens of the text kept too (StreamingLLM)
    # derived once in __post_init__ from the fields above (cache/retention.py)
    retentions: tuple[Retention, ...] = field(init=False, repr=False, compare=False)  # what each layer keeps
    groups: tuple[KVGroup, ...] = field(init=False, repr=False, compare=False)  # layers sharing a block table

    def __post_init__(self) -> None:
        kv_dtype(self.dtype)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"KV cache {name} must be at least 1, got {getattr(self, name)}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        Retention(self.kv_window, self.sink_tokens)  # validates the bound
        retentions = layer_retentions(self.layer_windows, self.num_layers, self.kv_window, self.sink_tokens)
        object.__setattr__(self, "retentions", retentions)
        object.__setattr__(self, "groups", kv_groups(retentions))
        if self.kv_dtype.element_bits == 4 and self.head_dim % 2:
            raise ConfigError(f"KV cache dtype '{self.dtype}' packs two values per byte and needs an even head_dim, "
                              f"got {self.head_dim}")

    @property
    def kv_dtype(self) -> KVDtype:
        return kv_dtype(self.dtype)

    @property
    def bytes_per_token_per_layer(self) -> float:
        """K and V of one token in one layer, scales included."""
        d = self.kv_dtype
        data = 2 * self.num_kv_heads * self.head_dim * d.element_bits / 8
        return data + self.num_kv_heads * d.scale_bytes(self.head_dim, self.block_size)

    @property
    def bytes_per_token(self) -> float:
        """K and V of one token across every layer (what a token costs while every layer holds it)."""
        return self.num_layers * self.bytes_per_token_per_layer

    @property
    def layers_per_group(self) -> int:
        return len(self.groups[0].layers)

    @property
    def prefix_cacheable(self) -> bool:
        """Prefix caching needs every block of a prefix kept: one group that keeps everything."""
        groups = self.groups
        return len(groups) == 1 and groups[0].retention.is_full

    @property
    def bytes_per_block(self) -> float:
        """One pool block (page): block_size tokens of one group's layers."""
        return self.block_size * self.layers_per_group * self.bytes_per_token_per_layer

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def tokens_held(self, layer: int, context_len: int) -> int:
        """How many tokens layer `layer` keeps for a sequence of `context_len` tokens."""
        return self.retentions[layer].tokens_held(context_len)

    def bytes_for_sequence(self, context_len: int) -> float:
        """KV bytes one sequence of `context_len` tokens holds, windowed layers capped at what they keep."""
        return sum(self.tokens_held(i, context_len) for i in range(self.num_layers)) * self.bytes_per_token_per_layer

"""Readers every family's config parser uses: a Hugging Face `config.json` dict and GGUF metadata.

Each family turns these into a ModelConfig in its own file (`config_from_hf`, `config_from_gguf`);
models/registry.py picks the family from `model_type` or `general.architecture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvengine.errors import ConfigError


@contextmanager
def required_fields() -> Iterator[None]:
    """A config.json field read with `d[key]` and missing becomes a one-line ConfigError."""
    try:
        yield
    except KeyError as e:
        raise ConfigError(f"model config is missing the field {e.args[0]!r}") from None


def int_tuple(value: Any) -> tuple[int, ...]:
    """None, one id or a list of ids (`eos_token_id`) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def rope_parameters(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE settings from either transformers-5 `rope_parameters` or the older
    `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    merged = {**(d.get("rope_scaling") or {}), **params}
    merged.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    return merged, {}


def windows_from_layer_types(layer_types: list[str], window: int) -> tuple[int | None, ...]:
    """Per layer: the window for "sliding_attention" layers, None (global) for the others."""
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


@dataclass(frozen=True, slots=True)
class GGUFMetadata:
    """GGUF key/value metadata (decoded to Python values); `get("block_count")` reads `<arch>.block_count`."""

    values: dict[str, Any]

    @property
    def arch(self) -> str:
        """`general.architecture`: the prefix of the architecture's own keys (e.g. "qwen2")."""
        return str(self.values.get("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        """`<arch>.<key>`; a missing key without a default is a ConfigError."""
        full = f"{self.arch}.{key}"
        if full in self.values:
            return self.values[full]
        if default is None:
            raise ConfigError(f"GGUF metadata is missing '{full}'")
        return default

    def optional(self, key: str) -> Any:
        """`<arch>.<key>`, or None where the file does not have it."""
        return self.values.get(f"{self.arch}.{key}")

    def vocab_size(self) -> int:
        """`<arch>.vocab_size`, else the length of the tokenizer's token list."""
        return int(self.optional("vocab_size") or len(self.values.get("tokenizer.ggml.tokens", ())))

    @property
    def bos_token_id(self) -> int | None:
        return self.values.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return int_tuple(self.values.get("tokenizer.ggml.eos_token_id"))

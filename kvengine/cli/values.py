"""Parsing and checking option values: a bad value is one ConfigError line naming its option."""

from __future__ import annotations

from kvengine.engine.config import WEIGHT_FORMATS, normalize_dtype
from kvengine.errors import ConfigError


def parse_int_list(text: str, name: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; a one-line ConfigError naming the option `name` otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{name} takes positive integers, got '{text}'")
    return values


def parse_dtype_list(text: str) -> list[str]:
    """--dtypes 'float32,bf16' -> ['float32', 'bfloat16']; explicit dtypes only."""
    values = [normalize_dtype(x.strip()) for x in text.split(",") if x.strip()]
    if not values or "auto" in values:
        raise ConfigError(f"--dtypes takes explicit dtypes such as float32,bfloat16, got '{text}'")
    return values


def parse_weights_list(text: str) -> list[str]:
    """--weights 'auto,int4' -> ['auto', 'int4'], each a known weight format."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in WEIGHT_FORMATS]
    if not values or bad:
        raise ConfigError(f"--weights takes a comma list of {', '.join(WEIGHT_FORMATS)}; got "
                          f"'{bad[0] if bad else text}'")
    return values


def at_least_one(value: int, name: str) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def count_or_zero(value: int, name: str) -> int:
    if value < 0:
        raise ConfigError(f"{name} must be 0 (skip) or a positive number, got {value}")
    return value

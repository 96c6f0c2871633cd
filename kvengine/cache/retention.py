"""Retention: which of a sequence's tokens a layer's KV cache keeps, and how layers share block tables.

A layer keeps one of three things:
- every token (global attention);
- its sliding window: a query at position p sees positions p - W + 1 .. p (the token and W - 1 before it);
- attention sinks plus a window (StreamingLLM): the first S tokens of the text and the last W.

Layers with the same retention share block tables. They are cut into groups of `layers_per_group` layers
(the greatest common divisor of the counts), so one pool page (block_size tokens x layers_per_group layers)
serves any group: a windowed group frees the pages that left its window while a global group keeps them,
and a hybrid model (Gemma 3: five local layers to one global) holds what the accounting says it holds.

Sinks and positions: a query at p >= S + W - 1 sees S sinks and W recent tokens; StreamingLLM places them at
cache positions 0 .. S + W - 1 with the query last, at S + W - 1. Recent keys keep their distances to the
query either way, so they are stored rotated at their text positions; only the sinks' distances change, so
the query is rotated a second time, at its cache position (`cache_position`), for its scores against sinks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvengine.errors import ConfigError


@dataclass(slots=True, frozen=True)
class Retention:
    window: int | None = None  # recent tokens kept (the query included); None = all
    sinks: int = 0  # first tokens of the text always kept (only with a window)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ConfigError(f"kv_window must be at least 1 token, got {self.window}")
        if self.sinks < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {self.sinks}")
        if self.sinks and self.window is None:
            raise ConfigError("sink_tokens needs kv_window (the recent tokens kept beside the sinks)")

    @property
    def is_full(self) -> bool:
        return self.window is None

    def window_start(self, position: int) -> int:
        """The earliest recent (non-sink) position a query at `position` sees."""
        return 0 if self.window is None else max(0, position - self.window + 1)

    def key_positions(self, start: int, end: int) -> tuple[range, range]:
        """Positions whose keys the queries at start .. end - 1 read: (sinks, recent), ascending and disjoint.
        Sinks are the first S positions whether or not a query's window still covers them (a query whose
        window has not slid past them is at its text position in the cache too, so both scorings agree)."""
        sinks = range(min(self.sinks, end))
        return sinks, range(max(self.window_start(start), len(sinks)), end)

    def cache_position(self, position: int) -> int:
        """Where StreamingLLM puts a query at `position`: its text position until the window slides past the
        sinks, then the last cache slot, S + W - 1."""
        return position if self.window is None or not self.sinks else min(position, self.sinks + self.window - 1)

    def droppable_blocks(self, start: int, block_size: int) -> range:
        """Block indices no query from `start` on reads: past the sink blocks, wholly before the window."""
        first = -(-self.sinks // block_size)  # blocks holding a sink token are kept whole
        return range(first, self.window_start(start) // block_size)

    def tokens_held(self, context_len: int) -> int:
        """Tokens whose keys this layer keeps for a sequence of `context_len` tokens (exact, not block-rounded)."""
        return context_len if self.window is None else min(context_len, self.sinks + self.window)

    def max_blocks(self, context_len: int, chunk: int, block_size: int) -> int:
        """The most blocks a sequence of `context_len` tokens holds while computing chunks of `chunk` tokens."""
        full = -(-context_len // block_size)
        if self.window is None:
            return full
        recent = -(-(self.window - 1 + chunk) // block_size) + 1  # the window before a chunk, the chunk, one edge
        return min(full, -(-self.sinks // block_size) + recent)


@dataclass(slots=True, frozen=True)
class KVGroup:
    """Layers that share a block table per sequence (and the retention that frees its blocks)."""

    retention: Retention
    layers: tuple[int, ...]


def layer_retentions(layer_windows: tuple[int | None, ...], num_layers: int, kv_window: int | None = None,
                     sink_tokens: int = 0) -> tuple[Retention, ...]:
    """Each layer's retention: its own sliding window if it has one, else everything; `kv_window` (with
    `sink_tokens`) bounds every layer whose own window is wider or absent."""
    retentions = []
    for i in range(num_layers):
        own = layer_windows[i] if layer_windows else None
        if kv_window is not None and (own is None or kv_window < own):
            retentions.append(Retention(kv_window, sink_tokens))
        else:
            retentions.append(Retention(own))
    return tuple(retentions)


def kv_groups(retentions: tuple[Retention, ...]) -> tuple[KVGroup, ...]:
    """Layers bucketed by retention (in order of first appearance), each bucket cut into equal groups."""
    buckets: dict[Retention, list[int]] = {}
    for i, r in enumerate(retentions):
        buckets.setdefault(r, []).append(i)
    size = math.gcd(*(len(layers) for layers in buckets.values()))
    return tuple(KVGroup(r, tuple(layers[j:j + size])) for r, layers in buckets.items()
                 for j in range(0, len(layers), size))


def max_blocks(groups: tuple[KVGroup, ...], context_len: int, chunk: int, block_size: int) -> int:
    """The most blocks one sequence of `context_len` tokens holds at once over every group, its tokens computed
    at most `chunk` at a time."""
    return sum(g.retention.max_blocks(context_len, chunk, block_size) for g in groups)

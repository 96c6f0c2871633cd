"""Analytic FLOP and memory accounting: what the KV cache saves and costs, for any ModelConfig.

No torch import: the `flops` and `memory` commands and the engine's live reports use it cheaply.
"""

from __future__ import annotations

from kvengine.accounting.flops import (
    FLOP_CONVENTION,
    CompletionFlops,
    ExtraFlops,
    StepFlops,
    completion_flops,
    request_flops,
    step_flops,
)
from kvengine.accounting.memory import (
    MemoryReport,
    kv_cache_spec_for,
    memory_report,
    parameter_count,
    parse_bytes,
    weights_bytes,
)
from kvengine.accounting.presets import PRESETS, get_preset, preset_names

__all__ = [
    "FLOP_CONVENTION", "PRESETS", "CompletionFlops", "ExtraFlops", "MemoryReport", "StepFlops",
    "completion_flops", "get_preset", "kv_cache_spec_for", "memory_report", "parameter_count",
    "parse_bytes", "preset_names", "request_flops", "step_flops", "weights_bytes",
]

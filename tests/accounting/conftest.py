"""Measured FLOPs: what torch's FlopCounterMode counts while a forward runs, to check the analytic counts.

FlopCounterMode counts matmul-like ops only (mm, addmm, bmm, baddbmm, fused SDPA kernels), each as
2·m·n·p, the same convention as kvengine.accounting. A fused SDPA kernel is counted as its QK^T plus
attention × V over the whole query × key rectangle (no causal discount); the CPU flash kernel, which torch
leaves out, is added here the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def measured_flops_by_op(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs per aten op counted while `fn()` runs under no_grad."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_MAPPING)
    with torch.no_grad(), counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def measured_flops(fn: Callable[[], object]) -> int:
    """Total matmul FLOPs counted while `fn()` runs under no_grad."""
    return sum(measured_flops_by_op(fn).values())


@pytest.fixture
def flop_meter() -> Callable[[Callable[[], object]], int]:
    """`measured_flops`, for any test in this folder (any model's forward, cached or not)."""
    return measured_flops


@pytest.fixture
def flop_meter_by_op() -> Callable[[Callable[[], object]], dict[str, int]]:
    """`measured_flops_by_op`, for any test in this folder."""
    return measured_flops_by_op

"""Where a step finds each sequence's keys in the pool: sequence_indexes and slot_list against slots_of, the
per-position formula, for consecutive and scattered block tables."""

from __future__ import annotations

import torch

from kvengine.cache.pool import sequence_indexes, slot_list, slots_of

BS = 4
TABLES = [[3, 4, 5], [9, 2, 7], [6], [0, 1, 8, 10]]  # consecutive, scattered, one block, scattered at the end
LENGTHS = [10, 9, 3, 14]


def _slots(index: int | torch.Tensor, length: int) -> list[int]:
    return list(range(index, index + length)) if isinstance(index, int) else index.tolist()


def test_sequence_indexes_give_every_positions_slot():
    for as_slots in (False, True):
        got = sequence_indexes(TABLES, LENGTHS, BS, "cpu", as_slots)
        for table, length, index in zip(TABLES, LENGTHS, got, strict=True):
            assert _slots(index, length) == slots_of(table, torch.arange(length), BS, "cpu").tolist()
        kinds = [isinstance(index, int) for index in got]
        assert kinds == ([False] * 4 if as_slots else [True, False, True, False])


def test_slot_list_is_slots_of_a_span():
    for table, length in zip(TABLES, LENGTHS, strict=True):
        for start in (0, 1, length - 1):
            want = slots_of(table, torch.arange(start, length), BS, "cpu").tolist()
            assert slot_list(table, start, length, BS) == want

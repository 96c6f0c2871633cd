"""`kvengine bench cache --runs N --seed NNN` on a tiny random GPT-2 folder: every run timed, seed 004's summary
lines from their means, the seed's published table beside ours, the extrapolation labelled, the seed's FLOP
tables reproduced by the accounting. No speed is asserted."""

from __future__ import annotations

import pytest
from gpt2test import make_gpt2_folder

from kvengine.bench.cache import TimedRun
from kvengine.bench.seeds import SEED004_FLOPS, extrapolated_total_s, seed000_flops_table, seed004_flops_table


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return make_gpt2_folder(tmp_path_factory.mktemp("bench-gpt2") / "tiny-gpt2")


def test_runs_and_seed004_table(gpt2_folder, run_bench):
    _, last, data, out = run_bench("cache", "-m", str(gpt2_folder), "-n", "10", "--no-cache-max-tokens", "6",
                                   "--runs", "2", "--warmup", "0", "--seed", "004", "--raw", "--prompt", "The file")
    assert last["runs"] == 2 and last["new_tokens"] == 10 and last["no_cache_tokens"] == 6
    cached, uncached = data["results"]["cached"], data["results"]["no_cache"]
    assert len(cached["times_s"]) == 10 and len(uncached["times_s"]) == 6
    assert last["mean_speedup"] == pytest.approx(last["speedup"])  # capped: the per-token comparison
    assert last["time_reduction_pct"] == pytest.approx((1 - 1 / last["mean_speedup"]) * 100)
    table = dict((r[0], r[1:]) for r in data["results"]["seed004"]["table"])
    assert table["without KV cache"][0] == "43.33 s" and table["speedup"][0] == "5.18x"
    assert table["time reduction"][0] == "80.70%"
    assert table["new tokens (cache / no cache)"][1] == "10 / 6"
    assert "EXTRAPOLATED to 1,000 tokens: without / with" in table
    report = (out / "report.md").read_text()
    assert "Seed 004's published run beside kvengine's" in report and "NVIDIA T4 GPU" in report
    assert "It is an estimate, not a measurement." in report and "time = c0 + c1·FLOPs" in report
    assert "Seed 004's closed-form FLOPs for GPT3-medium" in report


def test_seed004_closed_form_rows_match_the_seed():
    """kvengine's kv-only convention is seed 004's closed form: every published row to its three digits."""
    rows = seed004_flops_table().rows
    assert [r[0] for r in rows] == [f"{s:,}" for s in SEED004_FLOPS]
    for row, (without, with_) in zip(rows, SEED004_FLOPS.values(), strict=True):
        assert float(row[4]) == pytest.approx(without, rel=0.006) and float(row[5]) == pytest.approx(with_, rel=0.006)
        assert float(row[7]) > float(row[4])  # exact adds attention scores and the causal prefill


def test_seed000_flop_table():
    (without, with_) = seed000_flops_table().rows
    assert without[1:] == ["277e9", "277.0e9"] and with_[1:] == ["23e9", "22.9e9"]


def test_extrapolation_recovers_a_known_trend():
    """Per-token times exactly 0.01 s + 1 ns per FLOP of each step: the fit sums them over 100 tokens' steps
    exactly, with and without the cache (the no-cache steps' FLOPs grow with the text)."""
    from kvengine.accounting.flops import completion_flops
    from kvengine.accounting.presets import get_preset

    short, long = (completion_flops(get_preset("gpt2"), 5, n, lm_head="last") for n in (20, 100))
    for measured, target in ((short.steps_with, long.steps_with), (short.steps_without, long.steps_without)):
        times, t = [], 0.0
        for k, f in enumerate(measured):
            t += 0.5 if k == 0 else 0.01 + 1e-9 * f
            times.append(t)
        run = TimedRun("x", True, 5, list(range(20)), times)
        assert extrapolated_total_s(run, measured, target) == pytest.approx(
            0.5 + sum(0.01 + 1e-9 * f for f in target[1:]))


def test_bench_seed_runs_the_seeds_setup_on_a_random_preset(run_bench):
    """`bench seed 002` = preset:gpt2 (random weights, said in the table), seed 004's prompt as is, the seed's
    published 42 s / 9 s beside ours; -n shortens it for the test."""
    _, last, data, out = run_bench("seed", "002", "-n", "2", "--warmup", "0")
    assert last["model"] == "preset:gpt2" and last["new_tokens"] == last["no_cache_tokens"] == 2
    assert data["params"]["prompt"] == "Hello, I'm a language model" and data["params"]["chat_template"] is False
    table = dict((r[0], r[1:]) for r in data["results"]["seed002"]["table"])
    assert table["without KV cache"][0] == "42.00 s" and table["with KV cache"][0] == "9.00 s"
    assert table["model"][1].startswith("preset:gpt2: RANDOM weights")
    assert "EXTRAPOLATED to 100 tokens" in (out / "report.md").read_text()


def test_unknown_seed_is_one_error_line(monkeypatch, capsys):
    from kvtest import run_main

    code, _, err = run_main(monkeypatch, capsys, "bench", "seed", "003")
    assert code == 2 and err.strip() == "error: unknown seed experiment '003' (choose from 004, 002, 000)"

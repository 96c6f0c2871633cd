"""`kvengine bench long` on a tiny random model: the pure pieces (segment perplexities, modes, options), one
end-to-end run past the model's context with a small window, and one-line errors. No speed is asserted."""

from __future__ import annotations

import math
import sys

import pytest

import kvengine.cli.bench_long  # noqa: F401  registers `bench long`
from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.bench.long import (
    LongPlan,
    ModeRun,
    Segment,
    _lockstep,
    parse_modes,
    ppl_over,
    segment_perplexities,
)
from kvengine.cache.retention import Retention
from kvengine.cli import main
from kvengine.errors import ConfigError
from kvengine.weights.source import open_model_source

LN2, LN8 = math.log(2), math.log(8)


def test_segment_perplexities_from_nll():
    nll = [LN2] * 4 + [LN8] * 4 + [LN2, LN8]  # predictions at positions 0..9
    segs = segment_perplexities(nll, 4, 10)
    assert [(s.start, s.end, s.tokens) for s in segs] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert [s.ppl for s in segs] == pytest.approx([2.0, 8.0, 4.0])  # the last: exp(mean(ln 2, ln 8)) = 4
    # a run that stopped after 6 predictions: the second segment is partial, the third empty
    short = segment_perplexities(nll[:6], 4, 10)
    assert short[1] == Segment(4, 8, 2, pytest.approx(8.0)) and short[2] == Segment(8, 10, 0, None)
    assert ppl_over(nll, 3, 5) == pytest.approx(4.0) and ppl_over(nll, 10, 12) is None


def test_modes_and_plan_validation():
    assert parse_modes("sinks, full") == ("sinks", "full")
    for text, message in (("foo", "unknown mode 'foo' in --modes"), ("", "unknown mode ''"),
                          ("full,full", "lists a mode twice")):
        with pytest.raises(ConfigError, match=message):
            parse_modes(text)
    plan = LongPlan(None, kv_window=256, sink_tokens=4)
    assert plan.tokens_for(8192) == 12288 and LongPlan(300).tokens_for(8192) == 300
    assert [plan.cache_bound(m) for m in ("full", "window", "sinks")] == [(None, 0), (256, 0), (256, 4)]
    assert plan.label("sinks") == "4 sinks + window 256"
    for kwargs, message in ((dict(tokens=1), "--tokens must be at least 2"),
                            (dict(tokens=10, chunk=0), "--chunk must be a positive integer, got 0"),
                            (dict(tokens=10, kv_window=0), "--kv-window must be a positive integer, got 0"),
                            (dict(tokens=10, sink_tokens=-1), "--sink-tokens must be 0 or more"),
                            (dict(tokens=10, sink_tokens=0), "the sinks mode needs --sink-tokens of at least 1")):
        with pytest.raises(ConfigError, match=message):
            LongPlan(**kwargs)
    assert LongPlan(10, sink_tokens=0, modes=("full", "window")).sink_tokens == 0


def test_lockstep_interleaves_until_every_stream_ends():
    order = list(_lockstep({"a": iter([1, 2]), "b": iter([10, 20, 30])}))
    assert order == [("a", 1), ("b", 10), ("a", 2), ("b", 20), ("b", 30)]


def test_time_growth_flat_and_growing():
    run = ModeRun("window", "w", 8, 0, 100, seconds=[0.2] * 20, chunk_tokens=[4] * 20)
    assert run.per_token_s == pytest.approx([0.05] * 20) and run.time_growth() == pytest.approx(1.0)
    run.seconds = [0.1 * (i + 1) for i in range(20)]  # chunk i takes i + 1 times the first: last 2 / first 2
    assert run.time_growth() == pytest.approx(1.95 / 0.15)
    assert ModeRun("full", "f", None, 0, 4, seconds=[0.1], chunk_tokens=[4]).time_growth() is None


def test_bench_long_runs_past_the_context(bench_folder, run_bench, check_common):
    window, sinks, chunk, n = 64, 4, 32, 700  # the tiny folder's context is 512
    result, last, data, out = run_bench("long", "-m", str(bench_folder), "--tokens", str(n), "--kv-window",
                                        str(window), "--sink-tokens", str(sinks), "--chunk", str(chunk),
                                        "--segment", "64")
    check_common(data, last, out, "long")
    assert {"kv_memory.png", "time_per_token.png", "perplexity.png"} <= set(data["files"])
    assert last["tokens"] == n and last["context"] == 512 and last["full_stopped_at"] == 512
    assert last["modes"] == ["full", "window", "sinks"] and last["kv_dtype"] == "float32"
    runs = data["results"]["runs"]
    full, win, snk = runs["full"], runs["window"], runs["sinks"]
    # full stops at the context: 512 tokens fed, 512 predictions (the query at 511 predicts token 512)
    assert full["tokens"] == 512 and full["stopped_at"] == 512 and full["predictions"] == len(full["nll"]) == 512
    assert win["predictions"] == snk["predictions"] == n - 1 and win["stopped_at"] is None
    segs = last["segment_ppl"]
    assert set(segs) == {"full", "window", "sinks"} and all(len(v) == math.ceil((n - 1) / 64) for v in segs.values())
    assert all(v is not None for v in segs["full"][:8]) and segs["full"][8:] == [None] * 3
    assert None not in segs["window"] + segs["sinks"]
    for mode in runs:  # the summary's numbers are the per-token NLLs', segment by segment
        nll = runs[mode]["nll"]
        assert segs[mode][1] == pytest.approx(math.exp(sum(nll[64:128]) / 64))
    # no token has left the window before position W: every mode scores the same there, and differs after
    assert win["nll"][:window] == pytest.approx(full["nll"][:window], abs=1e-4)
    assert snk["nll"][:window] == pytest.approx(full["nll"][:window], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(win["nll"][window:512], full["nll"][window:512], strict=True)) > 1e-3
    assert max(abs(a - b) for a, b in zip(win["nll"][window:], snk["nll"][window:], strict=True)) > 1e-3
    # memory: bytes held = blocks x bytes per block; windowed modes bounded by what the retention allows
    spec = kv_cache_spec_for(open_model_source(str(bench_folder)).model_config(), "float32", 16)
    assert last["peak_kv_bytes"]["full"] == full["analytic_kv_bytes"] == 32 * spec.bytes_per_block
    for run, s in ((win, 0), (snk, sinks)):
        assert run["kv_bytes"] == [b * spec.bytes_per_block for b in run["blocks"]]
        assert max(run["blocks"]) <= Retention(window, s).max_blocks(n, chunk, 16) < 32
        assert run["analytic_kv_bytes"] == (window + s) * spec.bytes_per_token
        assert run["positions"] == [min(n, i + chunk) for i in range(0, n, chunk)]
    assert last["peak_kv_bytes"]["window"] < last["peak_kv_bytes"]["full"]
    report = (out / "report.md").read_text()
    assert "The full cache stopped at token 512, the model's context" in report
    assert "Perplexity over the same predictions, query positions 64..511" in report
    ratio = ppl_over(win["nll"], window, 512) / ppl_over(full["nll"], window, 512)
    assert f"window 64 {ppl_over(win['nll'], window, 512):,.2f} ({ratio:.2f}x the full cache's)" in report
    assert "Perplexity per segment of 64 query positions" in result.stdout


def test_bench_long_modes_option(bench_folder, run_bench):
    _, last, data, _ = run_bench("long", "-m", str(bench_folder), "--tokens", "200", "--modes", "sinks",
                                 "--kv-window", "32", "--chunk", "50", "--segment", "100")
    assert last["modes"] == ["sinks"] and list(data["results"]["runs"]) == ["sinks"]
    assert last["full_stopped_at"] is None and len(last["segment_ppl"]["sinks"]) == 2


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["kvengine", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--sink-tokens", "4", "--kv-window", "0"], "error: --kv-window must be a positive integer, got 0"),
    (["--modes", "foo"], "error: unknown mode 'foo' in --modes (choose from full, window, sinks)"),
    (["--tokens", "1"], "error: --tokens must be at least 2 (one prediction), got 1"),
    (["--sink-tokens", "0"], "error: the sinks mode needs --sink-tokens of at least 1"),
    (["--kv-dtype", "fp7"], "error: unknown KV cache dtype 'fp7'"),
    (["--text", "/nonexistent/long.txt"], "error: text file '/nonexistent/long.txt' does not exist"),
])
def test_bad_options_are_one_line(monkeypatch, capsys, args, message):
    code, err = _run_main(monkeypatch, capsys, "bench", "long", *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_text_shorter_than_tokens_is_one_line(monkeypatch, capsys, bench_folder, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a short text")
    code, err = _run_main(monkeypatch, capsys, "bench", "long", "-m", str(bench_folder), "--text", str(short),
                          "--tokens", "600", "--out", str(tmp_path / "r"))
    assert code == 2 and err.startswith("error: the text has ") and "fewer than the 600 asked for" in err

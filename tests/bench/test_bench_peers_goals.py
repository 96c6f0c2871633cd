"""`kvengine bench peers`' issue-7 goals: the kvengine variants rule, the goals arithmetic for given rates, the new
options' one-line errors, and short real runs on a tiny model that produce the variants, concurrent-requests,
prefill and goals tables and their JSON keys."""

from __future__ import annotations

import sys

import pytest
import torch

from kvengine.bench.peers import PeersPlan, Variant, common_prefix, kvengine_variants, quantized_dtype
from kvengine.bench.peers_report import GOAL_TARGETS, compute_goals
from kvengine.errors import ConfigError
from kvengine.layers import native


def test_variant_rule():
    v = kvengine_variants
    assert v(["auto"], None) == [Variant("fp32", "float32")]
    assert v(["auto"], ["float32", "bfloat16"]) == [Variant("fp32", "float32"), Variant("bf16", "bfloat16")]
    # int8/int4 compute in the engine's own dtype for this CPU's tier unless --dtypes names dtypes (bfloat16 only
    # with AVX-512 BF16: never a bf16 matmul the CPU emulates); float formats keep their own dtype
    tier = native.chosen()
    own = str(tier.act_dtype).removeprefix("torch.") if tier is not None else "float32"
    assert quantized_dtype() == own
    assert v(["fp32", "int4"], None) == [Variant("fp32", "float32"), Variant("int4", own)]
    assert v(["int4"], None, device="cuda") == [Variant("int4", "bfloat16")]
    assert v(["int8", "bf16"], ["float32"]) == [Variant("int8", "float32"), Variant("bf16", "bfloat16")]
    assert v(["auto", "fp32", "fp32"], None) == [Variant("fp32", "float32")]  # no duplicates
    labels = [x.label for x in v(["fp32", "bf16", "int4"], None, compile=True)]
    assert labels == ["float32+compile", "bfloat16+compile", f"int4+{own}+compile"]
    assert Variant("int8", "float32").label == "int8+float32"


def test_goal_length_prefers_200():
    assert PeersPlan([20, 200, 1000], [], ["float32"]).goal_length == 200
    assert PeersPlan([16, 64], [], ["float32"]).goal_length == 64


def test_compute_goals_for_given_rates():
    goals = {g.key: g for g in compute_goals(
        {"decode": {"float32": 17.0, "int4+bfloat16": 82.0, "int8+bfloat16": None},
         "concurrent": {"float32": 150.0, "int4+bfloat16": 390.0},
         "prefill": {"float32": 500.0, "int4+bfloat16": 416.0}},
        {"decode": 80.0, "concurrent": 80.0, "prefill": 208.0})}
    assert list(goals) == list(GOAL_TARGETS) == ["decode", "concurrent", "prefill"]
    d, c, p = goals["decode"], goals["concurrent"], goals["prefill"]
    assert (d.variant, d.kvengine, d.llama_cpp, d.target) == ("int4+bfloat16", 82.0, 80.0, 1.0)
    assert d.ratio == pytest.approx(82 / 80) and d.met is True
    assert (c.variant, c.target) == ("int4+bfloat16", 5.0)
    assert c.ratio == pytest.approx(390 / 80) and c.met is False  # 4.875 < 5
    assert p.variant == "float32" and p.ratio == pytest.approx(500 / 208) and p.met is True
    assert p.to_dict() == {"goal": "prefill", "title": "prefill", "kvengine": 500.0, "kvengine_variant": "float32",
                           "llama_cpp": 208.0, "ratio": pytest.approx(500 / 208), "target_ratio": 2.0, "met": True}


def test_goals_without_llama_cpp_or_measurements_are_unknown():
    goals = {g.key: g for g in compute_goals({"decode": {"float32": 17.0}, "concurrent": {}}, {"decode": None})}
    assert goals["decode"].kvengine == 17.0 and goals["decode"].ratio is None and goals["decode"].met is None
    assert goals["concurrent"].variant is None and goals["prefill"].kvengine is None
    exact = compute_goals({"decode": {"a": 80.0}}, {"decode": 80.0})[0]
    assert exact.ratio == 1.0 and exact.met is True  # the target is "at least"


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5, 6], [5, 6, 7]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "int3"], "--weights takes a comma list of auto, fp32, bf16, fp16, int8, int4; got 'int3'"),
    (["--weights", " , "], "--weights takes a comma list of auto, fp32, bf16, fp16, int8, int4; got ' , '"),
    (["--concurrency", "-1"], "--concurrency must be 0 (skip) or a positive number, got -1"),
    (["--prefill-tokens", "-5"], "--prefill-tokens must be 0 (skip) or a positive number, got -5"),
    (["--concurrent-tokens", "0"], "--concurrent-tokens must be a positive integer, got 0"),
])
def test_bad_options_are_one_line(bench_folder, monkeypatch, capsys, args, message):
    from kvengine.cli import main

    monkeypatch.setattr(sys, "argv", ["kvengine", "bench", "peers", "-m", str(bench_folder), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_prefill_longer_than_the_context_is_an_error(bench_folder, run_bench):
    # the tiny folder's context is 512 tokens; the default --prefill-tokens is 1024
    with pytest.raises(ConfigError, match=r"--prefill-tokens 1024 does not fit tiny's context of 512 tokens"):
        run_bench("peers", "-m", str(bench_folder), "-n", "2", "--peers", "", "--concurrency", "0")


def test_bench_peers_goals_tables_and_keys(bench_folder, run_bench, check_common):
    _, last, data, out = run_bench("peers", "-m", str(bench_folder), "-n", "3,5", "--weights", "fp32,int8",
                                   "--peers", "transformers", "--concurrency", "3", "--concurrent-tokens", "4",
                                   "--prefill-tokens", "40", "--no-cache-max-tokens", "1", "--warmup", "1")
    check_common(data, last, out, "peers")
    own = quantized_dtype()  # int8 with no --dtypes computes in the engine's own dtype for this CPU
    res = data["results"]
    assert data["params"]["variants"] == ["float32", f"int8+{own}"] and data["params"]["dtypes"] == ["float32"]
    assert [(v["weights"], v["dtype"], v["compile"], v["compile_s"]) for v in res["variants"]] == [
        ("fp32", "float32", False, None), ("int8", own, False, None)]
    assert "int8" in res["variants"][1]["weights_desc"] and f"activations {own}" in res["variants"][1]["weights_desc"]
    # concurrent: both kvengine variants and transformers' batched reference, 3 requests x 4 tokens each
    assert [(r["system"], r["weights"], r["requests"], r["tokens"]) for r in res["concurrent"]] == [
        ("kvengine", "float32", 3, 12), ("kvengine", f"int8+{own}", 3, 12), ("transformers", "float32", 3, 12)]
    # prefill: exactly 40 ids, the same for every system
    assert len(res["prefill_prompt_ids"]) == 40
    assert [(r["system"], r["weights"], r["tokens"]) for r in res["prefill"]] == [
        ("kvengine", "float32", 40), ("kvengine", f"int8+{own}", 40), ("transformers", "float32", 40)]
    for r in res["concurrent"] + res["prefill"]:
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    # goals: judged at the longest length (no 200 here); no llama.cpp, so no ratio and no verdict
    assert res["goal_length"] == 5
    goals = last["goals"]
    assert list(goals) == ["decode", "concurrent", "prefill"] and res["goals"] == list(goals.values())
    kv_decode = {r["weights"]: r["decode_tokens_per_s"] for r in res["runs"]
                 if r["system"] == "kvengine" and r["setting"] == "KV cache" and r["new_tokens"] == 5}
    best = max(kv_decode, key=kv_decode.get)
    assert (goals["decode"]["kvengine_variant"], goals["decode"]["kvengine"]) == (best, kv_decode[best])
    best_c = max((r for r in res["concurrent"] if r["system"] == "kvengine"), key=lambda r: r["tokens_per_s"])
    assert goals["concurrent"]["kvengine"] == best_c["tokens_per_s"]
    assert all(g["llama_cpp"] is None and g["ratio"] is None and g["met"] is None for g in goals.values())
    assert [g["target_ratio"] for g in goals.values()] == [1.0, 5.0, 2.0]
    # token agreement against the fp32 variant, from the runs' own token ids
    tokens = {r["weights"]: r["token_ids"] for r in res["runs"]
              if r["system"] == "kvengine" and r["setting"] == "KV cache" and r["new_tokens"] == 5}
    k = common_prefix(tokens["float32"], tokens[f"int8+{own}"])
    assert res["token_agreement"][f"int8+{own}"] == {"equal_leading_tokens": k, "compared": 5}
    assert last["same_first_tokens_as_fp32"] == {"float32": True, f"int8+{own}": k == 5}
    report = (out / "report.md").read_text()
    for title in ("Issue 7 goals", "kvengine variants", f"kvengine int8+{own}: decode speed",
                  "3 concurrent greedy requests, 4 new tokens each", "prefill of a 40-token prompt"):
        assert title in report
    assert "goals.png" not in data["files"]  # no llama.cpp: no ratio to plot


def test_bench_peers_compile_reports_compile_seconds(bench_folder, run_bench, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the plumbing, without Inductor's minute
    _, last, data, out = run_bench("peers", "-m", str(bench_folder), "-n", "4", "--peers", "", "--compile",
                                   "--concurrency", "0", "--prefill-tokens", "0", "--no-cache-max-tokens", "1",
                                   "--warmup", "0")
    (variant,) = data["results"]["variants"]
    assert variant["label"] == "float32+compile" and variant["compile"] is True
    assert variant["compile_s"] is not None and variant["compile_s"] >= 0
    assert last["compile_s"] == {"float32+compile": variant["compile_s"]}
    assert data["results"]["concurrent"] == [] and data["results"]["prefill"] == []
    assert "skipped: --concurrency 0" in last["goals"]["concurrent"]["title"]
    assert "| float32+compile | fp32 | float32 | yes |" in (out / "report.md").read_text()

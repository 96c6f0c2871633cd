"""`eval kv` (kvengine/eval/kv.py, kvengine/cli/eval.py) on tiny models: the reference row, byte ratios from
KVCacheSpec, capacity counted by the engine's own admission, greedy agreement, the table and the JSON line."""

from __future__ import annotations

import json

import pytest
from kvtest import make_tiny_hf_folder, tiny_pair
from typer.testing import CliRunner

import kvengine.cli.eval  # noqa: F401  registers `eval kv`
from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.cli.app import app
from kvengine.errors import ConfigError
from kvengine.eval.kv import evaluate_kv_dtypes, held_text, identical_prefix, max_concurrent, text_tokens
from kvengine.layers import native
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

TOKENS = [(5 * j * j + 11 * j + 3) % 96 for j in range(80)]
PROMPTS = [[(3 * j + i) % 96 for j in range(12 + i)] for i in range(3)]


@pytest.fixture(scope="module")
def model():
    return tiny_pair(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                     intermediate_size=128)[0]


@pytest.fixture(scope="module")
def report(model):
    return evaluate_kv_dtypes(model, None, TOKENS, PROMPTS, ["bf16", "int8", "int4"], generate=8, chunk_size=32,
                              block_size=8, budget=1 << 20, seq_len=64)


def test_reference_row_first_and_exact(report):
    assert [r.kv_dtype for r in report.results] == ["float32", "bfloat16", "int8", "int4"]
    ref = report.results[0]
    assert report.reference == "float32" and report.tokens == 80
    assert (ref.ppl_change_pct, ref.mean_abs_logit_diff, ref.max_abs_logit_diff, ref.top1_agreement) == (0, 0, 0, 1)
    assert ref.greedy_identical == [8, 8, 8] and ref.greedy_margin_at_divergence == [None, None, None]


def test_bytes_and_ratios_come_from_the_spec(report, model):
    for r in report.results:
        per_token = kv_cache_spec_for(model.config, r.kv_dtype, 8).bytes_per_token
        assert r.bytes_per_token == per_token
        assert r.ratio_to_reference == per_token / kv_cache_spec_for(model.config, "float32", 8).bytes_per_token
    ratios = {r.kv_dtype: r.ratio_to_bf16 for r in report.results}
    assert ratios == {"float32": 2.0, "bfloat16": 1.0, "int8": 164 / 256, "int4": 104 / 256}


def test_quality_columns_order_by_precision(report):
    bf16, int8, int4 = report.results[1:]
    assert 0 < bf16.mean_abs_logit_diff < int8.mean_abs_logit_diff < int4.mean_abs_logit_diff
    assert bf16.max_abs_logit_diff < int4.max_abs_logit_diff
    assert all(abs(r.ppl_change_pct) < 0.5 for r in report.results)
    for r in report.results:
        assert len(r.greedy_identical) == 3 and all(0 <= n <= 8 for n in r.greedy_identical)
        for n, margin in zip(r.greedy_identical, r.greedy_margin_at_divergence, strict=True):
            assert (margin is None) == (n == 8) and (margin is None or margin >= 0)


def test_capacity_is_what_the_engine_runs(report, model):
    """max_concurrent (one scheduler step, no forward) equals what a real step runs with the same budget."""
    for r in report.results:
        llm = LLM.from_model(model, None, kv_cache_dtype=r.kv_dtype, kv_cache_memory=1 << 20, block_size=8,
                             max_num_seqs=512, max_num_batched_tokens=1 << 16, enable_prefix_caching=False)
        for i in range(r.max_concurrent_seqs + 2):
            llm.engine.add_request(None, SamplingParams(max_tokens=2), prompt_token_ids=[i % 96] * 63)
        llm.engine.step()
        assert llm.engine.stats().running == r.max_concurrent_seqs
    counts = {r.kv_dtype: r.max_concurrent_seqs for r in report.results}
    assert counts["int4"] >= 2 * counts["bfloat16"] >= 4 * counts["float32"] > 0
    assert max_concurrent(model, "int4", 1 << 20, 64, 8) == counts["int4"]


def test_identical_prefix():
    assert identical_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert identical_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert identical_prefix([4], [1]) == 0


def test_held_text(tmp_path):
    name, text = held_text()
    assert name == "pydoc_data.topics" and "assignment" in text and len(text) > 100_000
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 50)
    assert held_text(f) == (str(f), "hello world " * 50)
    with pytest.raises(ConfigError, match="does not exist"):
        held_text(tmp_path / "missing.txt")


# -- the command --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny-eval"), max_position_embeddings=256)


def test_eval_kv_command_prints_table_then_json(tiny_folder):
    args = ["eval", "kv", "--model", str(tiny_folder), "--tokens", "96", "--generate", "6", "--dtypes",
            "int8,int4", "--budget", "1MiB", "--seq-len", "64", "--chunk", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    data = json.loads(lines[-1])
    assert data["eval"] == "kv" and data["tokens"] == 96 and data["text"] == "pydoc_data.topics"
    assert [r["kv_dtype"] for r in data["results"]] == ["float32", "int8", "int4"]
    assert all(len(r["greedy_identical"]) == 4 for r in data["results"])  # the four built-in chat prompts
    table = "\n".join(lines[:-1])
    assert "int4" in table and "ppl" in table and "bf16" in table
    only_json = CliRunner().invoke(app, [*args, "--json"])
    assert only_json.exit_code == 0 and len(only_json.stdout.strip().splitlines()) == 1


def test_eval_kv_perplexity_only_and_weights(tiny_folder):
    """--generate 0 scores perplexity alone; --weights picks the weights the model is evaluated with."""
    args = ["eval", "kv", "--model", str(tiny_folder), "--tokens", "64", "--generate", "0", "--dtypes", "float32",
            "--chunk", "32", "--seq-len", "64", "--json"]
    runs = {w: CliRunner().invoke(app, [*args, "--weights", w]) for w in ("fp32", "int8")}
    for result in runs.values():
        assert result.exit_code == 0, result.output
    ppl = {w: json.loads(r.stdout.strip().splitlines()[-1])["results"][0] for w, r in runs.items()}
    assert all(r["greedy_identical"] == [] for r in ppl.values())
    assert ppl["fp32"]["ppl"] != ppl["int8"]["ppl"]


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--dtypes", "int3"], "unknown KV cache dtype 'int3'"),
    (["--text", "/nonexistent.txt"], "does not exist"),
    (["--budget", "lots"], "cannot read 'lots' as a size"),
])
def test_eval_kv_user_errors(tiny_folder, args, message):
    result = CliRunner().invoke(app, ["eval", "kv", "--model", str(tiny_folder), "--generate", "0", *args])
    assert isinstance(result.exception, ConfigError) and message in result.exception.message


def test_text_tokens_needs_enough_text(tiny_folder):
    llm = LLM(str(tiny_folder), weights="fp32")
    assert len(text_tokens(llm.tokenizer, held_text()[1], 50)) == 50
    with pytest.raises(ConfigError, match="fewer than the 500 asked for"):
        text_tokens(llm.tokenizer, "short text", 500)


def test_eval_kv_fast_weights_with_other_kv_dtypes(tmp_path):
    """--weights fast runs the engine's steps as one kernel op per layer over a float KV cache of the activation
    dtype; the scoring runners of the other KV dtypes hold pools the op cannot read, so their steps run layer by
    layer (this crashed with the op's operand error before)."""
    if native.chosen() is None:
        pytest.skip(f"no kernel tier loads here: {native.reason()}")
    folder = make_tiny_hf_folder(tmp_path, hidden_size=128, intermediate_size=128, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256)  # shapes the op's tiles take
    assert "one kvengine op per layer" in LLM(str(folder), weights="fast").engine.weights_desc
    act = str(native.chosen().act_dtype).removeprefix("torch.")  # the reference KV dtype, scored first
    others = [d for d in ("float32", "bfloat16", "int8") if d != act]  # pools of another dtype than the op's
    args = ["eval", "kv", "--model", str(folder), "--tokens", "64", "--generate", "4", "--dtypes",
            ",".join(others), "--chunk", "32", "--seq-len", "64", "--weights", "fast", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    assert [r["kv_dtype"] for r in rows] == [act, *others]
    assert all(abs(r["ppl_change_pct"]) < 5 for r in rows)

"""`kvengine flops` and `kvengine memory`: tables, --json, and one-line errors through the real main()."""

from __future__ import annotations

import json

import pytest
import transformers
from kvtest import run_main
from typer.testing import CliRunner

import kvengine.cli.accounting  # noqa: F401  registers the commands on `app`
from kvengine.cli import app

runner = CliRunner()


def invoke_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_flops_json_reproduces_seed000():
    data = invoke_json("flops", "--preset", "seed000", "-p", "5", "-n", "20", "--step", "1")
    assert "2·m·n·p" in data["flop_convention"]
    assert data["convention"] == "exact"
    step = data["step"]
    assert step["index"] == 1
    assert step["without_cache"]["total"] == pytest.approx(4.8e9, rel=0.01)
    assert step["without_cache"] == step["with_cache"]  # step 1 is the prefill either way
    totals = data["totals"]
    assert totals["without_cache"] == pytest.approx(277e9, rel=0.01)
    assert totals["with_cache"] == pytest.approx(23e9, rel=0.01)
    assert totals["lm_head"] == "all"


def test_flops_table_names_its_conventions():
    result = runner.invoke(app, ["flops", "--preset", "seed000", "--extra", "--all-steps"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "FLOP convention: 2·m·n·p" in out
    assert "Step 2: computing token 7" in out
    assert "276,983,398,400" in out and "22,931,619,840" in out
    assert "convention exact:" in out
    assert "softmax (estimate)" in out and "not in matmul total" in out


def test_flops_kv_only_reproduces_seed004_row():
    data = invoke_json("flops", "--preset", "gpt3-medium", "--convention", "kv-only", "-p", "1", "-n", "8000")
    assert data["step"] is None
    assert data["totals"]["without_cache"] == pytest.approx(3.23e15, rel=0.01)
    assert data["totals"]["with_cache"] == pytest.approx(5.66e12, rel=0.01)
    assert 100 * data["totals"]["reduction"] == pytest.approx(99.82, rel=0.01)
    assert data["totals"]["description"].startswith("kv-only")


def test_memory_shows_gqa_and_assumed_mha():
    data = invoke_json("memory", "--preset", "llama3-70b", "--context", "4000", "--assume-mha")
    assert data["bytes_per_token"] == 320 * 1024
    assert data["mha"]["bytes_per_token"] == 2.5 * 2**20
    assert data["mha"]["bytes_per_sequence"] == pytest.approx(10.5e9, rel=0.01)
    result = runner.invoke(app, ["memory", "--preset", "llama3-70b", "-c", "4000", "--assume-mha",
                                 "--budget", "80GB", "--weights-bits", "4.5"])
    assert result.exit_code == 0, result.output
    assert "320 KiB" in result.stdout and "2.5 MiB" in result.stdout and "10.5 GB" in result.stdout
    assert "users at 4,000 tokens that fit" in result.stdout


def test_memory_from_a_config_json(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_dict()))
    data = invoke_json("memory", "--config", str(tmp_path), "--kv-dtype", "fp32", "-b", "3")
    assert data["context_len"] == 128  # the model's maximum by default
    assert data["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert data["bytes_per_batch"] == 3 * 128 * data["bytes_per_token"]
    flops = invoke_json("flops", "--config", str(tmp_path / "config.json"), "-p", "3", "-n", "2")
    assert flops["step"]["with_cache"]["new_tokens"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["flops", "--preset", "gpt5"], "error: unknown preset 'gpt5' (known presets: gpt2, "),
    (["flops", "--preset", "gpt2", "-n", "0"], "error: --new-tokens must be a positive integer, got 0"),
    (["flops", "--preset", "gpt2", "-p", "-3"], "error: --prompt-tokens must be a positive integer, got -3"),
    (["flops", "--preset", "gpt2", "-n", "4", "--step", "5"],
     "error: --step must be between 1 and --new-tokens (4), got 5"),
    (["flops", "--preset", "gpt2", "--convention", "x"],
     "error: unknown --convention 'x' (choose from exact, kv-only)"),
    (["memory", "--preset", "gpt2", "--config", "c.json"],
     "error: give only one of --model, --config, --preset"),
    (["memory", "--preset", "gpt2", "-c", "0"], "error: --context must be a positive integer, got 0"),
    (["memory", "--preset", "gpt2", "--kv-dtype", "fp7"], "error: unknown KV cache dtype 'fp7'"),
    (["memory", "--preset", "gpt2", "--budget", "lots"], "error: cannot read 'lots' as a size"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert out == ""


def test_config_missing_a_field_is_one_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 96, "num_attention_heads": 4,
                                "intermediate_size": 112, "num_hidden_layers": 2}))
    code, _, err = run_main(monkeypatch, capsys, "flops", "--config", str(path))
    assert (code, err) == (2, "error: model config is missing the field 'hidden_size'\n")

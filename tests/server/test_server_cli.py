"""`kvengine serve` (uvicorn.run replaced, so nothing listens) and a short `kvengine bench serve` run against a
child server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kvengine.cli.serve  # noqa: F401  registers `serve` and `bench serve` on the app
from kvengine.cli.app import app
from kvengine.errors import ConfigError


@pytest.fixture
def captured(monkeypatch):
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda application, **kw: calls.append((application, kw)))
    return calls


def test_serve_defaults_to_loopback_and_builds_the_app(tiny_folder, captured):
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_folder), "--kv-cache-memory", "1e6",
                                      "--max-num-seqs", "4", "--max-waiting", "9"])
    assert result.exit_code == 0, result.output
    (application, kw), = captured
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8000
    state = application.state.kv
    assert state.model_name == "tiny" and state.api_keys == [] and state.engine.max_waiting == 9
    assert state.engine.engine.scheduler.max_num_seqs == 4
    assert "warning" not in result.output


def test_serve_with_keys_and_a_public_host(tiny_folder, captured):
    args = ["serve", "--model", str(tiny_folder), "--host", "0.0.0.0", "--port", "9001", "--kv-cache-memory", "1e6"]
    open_result = CliRunner().invoke(app, args)
    assert open_result.exit_code == 0 and "without --api-key" in open_result.output
    keyed = CliRunner().invoke(app, [*args, "--api-key", "a", "--api-key", "b", "--served-model-name", "mine"])
    assert keyed.exit_code == 0 and "without --api-key" not in keyed.output
    application, kw = captured[-1]
    assert kw["host"] == "0.0.0.0" and kw["port"] == 9001
    assert application.state.kv.api_keys == [b"a", b"b"] and application.state.kv.model_name == "mine"


def test_serve_rejects_a_bad_port(tiny_folder, captured):
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_folder), "--port", "70000"])
    assert isinstance(result.exception, ConfigError) and "--port" in result.exception.message
    assert captured == []


def test_bench_serve_short_run(tiny_folder, tmp_path):
    pytest.importorskip("openai")
    result = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_folder), "--concurrency", "1,4",
                                      "--requests", "4", "--max-tokens", "4", "--kv-cache-memory", "2e6",
                                      "--out", str(tmp_path / "out"), "--timeout", "120"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "serve" and summary["model"] == "tiny"
    assert [lv["concurrency"] for lv in summary["levels"]] == [1, 4]
    assert all(lv["failed"] == 0 and lv["tokens_per_s"] > 0 for lv in summary["levels"])
    assert summary["blocks_used_after"] == 0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "serving.png").is_file()
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [lv["requests"] for lv in data["results"]["levels"]] == [4, 4]


def test_bench_serve_refuses_bad_weights_before_starting_a_server(tiny_folder, tmp_path):
    for args, message in ((["--weights", "int3"], "unknown weights format 'int3'"),
                          (["--weights", "bf16", "--dtype", "float32"], "weights 'bf16' and dtype 'float32' disagree")):
        result = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_folder), "--out",
                                          str(tmp_path / "out"), *args])
        assert isinstance(result.exception, ConfigError) and message in result.exception.message
    assert not (tmp_path / "out").exists()



def test_bench_serve_compares_decode_speed_with_the_disk_tier(tiny_folder, tmp_path):
    disk = tmp_path / "kv"
    result = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_folder), "--concurrency", "1,2",
                                      "--requests", "3", "--max-tokens", "4", "--kv-cache-memory", "2e6",
                                      "--out", str(tmp_path / "out"), "--timeout", "120", "--compare-disk",
                                      "--kv-disk-dir", str(disk)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = summary["disk_comparison"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["tokens_per_s_no_disk"] > 0 and r["tokens_per_s_disk"] > 0 and r["ratio"] > 0 for r in rows)
    assert "Decode speed with and without the KV disk tier" in result.stdout
    assert any(disk.rglob("*"))  # the second server wrote blocks there


def test_bench_serve_compare_disk_refuses_a_url(tmp_path):
    result = CliRunner().invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9", "--compare-disk", "--out",
                                      str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError) and "--compare-disk" in result.exception.message
    assert not (tmp_path / "out").exists()

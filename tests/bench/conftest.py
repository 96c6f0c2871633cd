"""Bench test fixtures: a tiny real HF model folder and a runner that invokes `kvengine bench ...` in-process
and returns (exit result, the final JSON line, result.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kvtest import make_tiny_hf_folder
from typer.testing import CliRunner

import kvengine.cli.bench  # noqa: F401  registers the bench commands
from kvengine.cli.app import app


@pytest.fixture(scope="session")
def bench_folder(tmp_path_factory) -> Path:
    return make_tiny_hf_folder(tmp_path_factory.mktemp("bench") / "tiny", max_position_embeddings=512)


@pytest.fixture()
def run_bench(tmp_path):
    """run_bench('cache', '-n', '8', ...) -> (CliRunner result, last stdout line as JSON, result.json, out dir)."""
    def run(*args: str) -> tuple[Any, dict[str, Any], dict[str, Any], Path]:
        out = tmp_path / "results"
        result = CliRunner().invoke(app, ["bench", *args, "--out", str(out)])
        if result.exception is not None:
            raise result.exception
        assert result.exit_code == 0, result.output
        last = json.loads(result.stdout.strip().splitlines()[-1])
        return result, last, json.loads((out / "result.json").read_text()), out
    return run


def _check_png(path: Path, min_width: int = 500, min_height: int = 300) -> None:
    """The file is a real PNG image of a readable size."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= min_height, (path, width, height)


def _check_common(data: dict[str, Any], last: dict[str, Any], out: Path, bench: str) -> None:
    """What every bench writes: the files it lists, the machine block, the same summary as the last line."""
    assert data["bench"] == last["bench"] == bench
    for key in ("cpu_model", "logical_cores", "memory_bytes", "torch_version", "torch_threads", "gpu"):
        assert key in data["machine"]
    assert data["machine"]["memory_bytes"] > 0 and data["machine"]["torch_threads"] >= 1
    assert data["summary"] == last
    assert last["out_dir"] == str(out) and last["machine"] == data["machine"]["summary"]
    for name in data["files"]:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            _check_png(out / name)
    report = (out / "report.md").read_text()
    assert "## Machine" in report and data["machine"]["cpu_model"] in report
    for name in data["files"]:
        if name.endswith(".png"):
            assert f"]({name})" in report


@pytest.fixture()
def check_png():
    return _check_png


@pytest.fixture()
def check_common():
    return _check_common

"""cli/options.py: EngineOptions names EngineConfig's fields, converts the command line's units, and
`engine_options` adds exactly the chosen flags to a command."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer
from typer.testing import CliRunner

from kvengine.cli.options import FAST_WEIGHTS, EngineOptions, engine_options
from kvengine.engine.config import EngineConfig
from kvengine.errors import ConfigError


def test_engine_options_are_engine_config_fields():
    names = {f.name for f in fields(EngineOptions)} - {"model"}
    assert names <= {f.name for f in fields(EngineConfig)}


def test_engine_args_convert_units():
    args = EngineOptions(kv_cache_memory=2e6, kv_disk_budget=0.5).engine_args(max_num_seqs=3)
    assert args["kv_cache_memory"] == 2_000_000 and isinstance(args["kv_cache_memory"], int)
    assert args["kv_disk_budget"] == 2**29 and args["max_num_seqs"] == 3
    assert EngineOptions(kv_cache_memory=0.25).engine_args()["kv_cache_memory"] == 0.25
    with pytest.raises(ConfigError, match="--kv-disk-budget must be a positive number of GiB"):
        EngineOptions(kv_disk_budget=-1.0).config()


def test_the_decorator_adds_only_the_chosen_flags():
    app = typer.Typer()
    seen: list[EngineOptions] = []

    @app.command()
    @engine_options("model", "num_threads", "weights", weights=FAST_WEIGHTS)
    def run(n: int = typer.Option(1, "--n"), *, engine: EngineOptions) -> None:
        seen.append(engine)

    result = CliRunner().invoke(app, ["--n", "2", "-m", "tiny", "--threads", "3"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == EngineOptions(model="tiny", num_threads=3, weights="fast")
    assert CliRunner().invoke(app, ["--kv-dtype", "int8"]).exit_code != 0  # not one of this command's options

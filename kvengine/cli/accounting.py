"""`kvengine flops` and `kvengine memory`: what the KV cache saves in FLOPs and costs in bytes, for any model.

Both take the model from `--model` (name, GGUF or HF folder; default SmolLM2), `--config` (a config.json)
or `--preset` (see kvengine/accounting/presets.py), read without loading weights. Tables by default,
one JSON object with `--json`. Every output names its counting convention.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from kvengine.accounting.flops import (
    ATTENTION_MODES,
    CONVENTIONS,
    FLOP_CONVENTION,
    LM_HEAD_MODES,
    CompletionFlops,
    StepFlops,
    completion_flops,
    completion_steps,
    require_choice,
    require_positive,
    step_flops,
)
from kvengine.accounting.memory import MemoryReport, memory_report
from kvengine.accounting.presets import get_preset, preset_names
from kvengine.cli.app import app
from kvengine.cli.options import FLAGS
from kvengine.config import ModelConfig
from kvengine.errors import ConfigError

KV_FORMULA = "KV bytes per token = 2 (K and V) × layers × KV heads × head dim × bytes per element (+ scales)"

ModelOpt = FLAGS["model"].option()
ConfigOpt = typer.Option(None, "--config", help="A Hugging Face config.json (or its folder).")
PresetOpt = typer.Option(None, "--preset", help=f"A named model: {', '.join(preset_names())}.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of tables.")


def resolve_model_config(model: str | None, config: str | None, preset: str | None) -> ModelConfig:
    """The ModelConfig named by exactly one of --model, --config, --preset (none: the default model)."""
    if sum(x is not None for x in (model, config, preset)) > 1:
        raise ConfigError("give only one of --model, --config, --preset")
    if preset is not None:
        return get_preset(preset)
    if config is not None:
        from kvengine.weights.source import load_hf_config

        path = Path(config)
        return load_hf_config(path / "config.json" if path.is_dir() else path)
    from kvengine.weights.source import open_model_source

    return open_model_source(model).model_config()


def describe_model(c: ModelConfig) -> str:
    mlp = "gated MLP" if c.gated_mlp else "MLP"
    windows = sorted({w for w in c.layer_windows if w is not None})
    sliding = sum(w is not None for w in c.layer_windows)
    slide = f", {sliding} sliding layers (window {'/'.join(map(str, windows))})" if windows else ""
    return (f"{c.name}: {c.num_layers} layers, width {c.hidden_size}, {c.num_heads} heads × {c.head_dim} "
            f"({c.num_kv_heads} KV heads), {mlp} {c.intermediate_size}, vocab {c.vocab_size:,}{slide}")


def _console() -> Console:
    # Piped output gets a wide fixed width so the tables do not wrap.
    return Console() if sys.stdout.isatty() else Console(width=150)


def _g(n: float) -> str:
    return f"{n:,.0f} ({n:.3g})"


# -- flops ------------------------------------------------------------------------------------------------
@app.command("flops")
def flops(
    model: str | None = ModelOpt,
    config: str | None = ConfigOpt,
    preset: str | None = PresetOpt,
    prompt_tokens: int = typer.Option(5, "--prompt-tokens", "-p", help="Prompt length P."),
    new_tokens: int = typer.Option(20, "--new-tokens", "-n", help="Tokens to generate N."),
    step: int | None = typer.Option(None, "--step", help="Step 1..N to break down (default 2)."),
    convention: str = typer.Option("exact", "--convention", help="exact, or kv-only (seed 004)."),
    lm_head: str = typer.Option("all", "--lm-head", help="LM head on all (seed 000) or last."),
    attention: str = typer.Option("causal", "--attention", help="causal or dense (full rectangle)."),
    extra: bool = typer.Option(False, "--extra", help="Estimate norms, softmax, adds too."),
    all_steps: bool = typer.Option(False, "--all-steps", help="List the FLOPs of every step."),
    as_json: bool = JsonOpt,
) -> None:
    """Matmul FLOPs of one step (per component) and of a whole completion, with and without the KV cache."""
    p = require_positive(prompt_tokens, "--prompt-tokens")
    n = require_positive(new_tokens, "--new-tokens")
    k = _check_flops_choices(n, step, convention, lm_head, attention)
    cfg = resolve_model_config(model, config, preset)
    totals = completion_flops(cfg, p, n, convention, lm_head, attention=attention)
    pair: tuple[StepFlops, StepFlops] | None = None
    if convention == "exact":
        without, with_ = completion_steps(p, n, lm_head)
        pair = (step_flops(cfg, *without[k - 1], attention=attention),
                step_flops(cfg, *with_[k - 1], attention=attention))
    if as_json:
        print(json.dumps(_flops_json(cfg, totals, k, pair, all_steps)))
        return
    console = _console()
    console.print(describe_model(cfg))
    console.print(f"FLOP convention: {FLOP_CONVENTION}")
    if pair is not None:
        console.print(_step_table(k, p, pair, extra))
    console.print(_totals_table(totals))
    console.print(f"convention {totals.describe()}")
    if all_steps:
        console.print(_steps_table(totals))


def _check_flops_choices(n: int, step: int | None, convention: str, lm_head: str, attention: str) -> int:
    """Refuse an unknown convention, LM-head or attention mode; the step to break down (default 2)."""
    require_choice(convention, CONVENTIONS, "--convention")
    require_choice(lm_head, LM_HEAD_MODES, "--lm-head")
    require_choice(attention, ATTENTION_MODES, "--attention")
    k = step if step is not None else min(2, n)
    if isinstance(k, bool) or not 1 <= k <= n:
        raise ConfigError(f"--step must be between 1 and --new-tokens ({n}), got {k}")
    return k


def _flops_json(cfg: ModelConfig, totals: CompletionFlops, k: int, pair: tuple[StepFlops, StepFlops] | None,
                all_steps: bool) -> dict[str, Any]:
    step = None
    if pair is not None:
        step = {"index": k, "without_cache": pair[0].to_dict(), "with_cache": pair[1].to_dict()}
    return {"model": cfg.name, "model_config": cfg.to_dict(), "flop_convention": FLOP_CONVENTION,
            "convention": totals.convention, "step": step, "totals": totals.to_dict(per_step=all_steps)}


def _step_table(k: int, p: int, pair: tuple[StepFlops, StepFlops], extra: bool) -> Table:
    without, with_ = pair
    cached = "prefill" if k == 1 else f"1 new position, {with_.context_len} keys"
    table = Table(title=f"Step {k}: computing token {p + k} (no cache: {without.new_tokens} positions; "
                        f"KV cache: {cached}); matmul shapes per layer, FLOPs over all layers")
    for name in ("component", "layers", "matmul, no cache", "FLOPs, no cache", "matmul, KV cache",
                 "FLOPs, KV cache"):
        if name.startswith("matmul"):
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="left" if name == "component" else "right", no_wrap=True)
    rows = zip(without.as_rows(), with_.as_rows(), strict=True)
    for (label, shape0, times, f0), (_, shape1, _, f1) in rows:
        table.add_row(label, str(times), shape0, f"{f0:,}", shape1, f"{f1:,}")
    table.add_section()
    table.add_row("total (matmul)", "", "", _g(without.total), "", _g(with_.total), style="bold")
    if extra:
        table.add_section()
        for name, f0 in without.extra.to_dict().items():
            label = "extra total (not in matmul total)" if name == "total" else f"{name} (estimate)"
            table.add_row(label, "", "", f"{f0:,}", "", f"{with_.extra.to_dict()[name]:,}", style="dim")
    return table


def _totals_table(t: CompletionFlops) -> Table:
    table = Table(title=f"Completion: {t.prompt_tokens}-token prompt + {t.new_tokens} new tokens "
                        f"({t.convention})")
    table.add_column("quantity")
    table.add_column("matmul FLOPs", justify="right")
    table.add_row("without KV cache", _g(t.without_cache))
    table.add_row("with KV cache", _g(t.with_cache))
    table.add_row("saved", _g(t.saved))
    table.add_row("ratio (without / with)", f"{t.ratio:.2f}×")
    table.add_row("reduction", f"{100 * t.reduction:.2f}%")
    return table


def _steps_table(t: CompletionFlops) -> Table:
    table = Table(title=f"FLOPs per step ({t.convention})")
    for name in ("step", "without KV cache", "with KV cache"):
        table.add_column(name, justify="right")
    for i, (f0, f1) in enumerate(zip(t.steps_without, t.steps_with, strict=True), start=1):
        table.add_row(str(i), _g(f0), _g(f1))
    table.add_section()
    table.add_row("total", _g(t.without_cache), _g(t.with_cache), style="bold")
    return table


# -- memory -----------------------------------------------------------------------------------------------
@app.command("memory")
def memory(
    model: str | None = ModelOpt,
    config: str | None = ConfigOpt,
    preset: str | None = PresetOpt,
    context: int | None = typer.Option(None, "--context", "-c", help="Tokens per sequence (default: max)."),
    batch: int = typer.Option(1, "--batch", "-b", help="Sequences held at once."),
    kv_dtype: str = typer.Option("bfloat16", "--kv-dtype", help="float32, bfloat16, fp8, int8, int4..."),
    budget: str | None = typer.Option(None, "--budget", help="Weights + KV memory, e.g. 80GB."),
    weights_bits: float = typer.Option(16.0, "--weights-bits", help="Bits per weight (~4.5 for Q4)."),
    assume_mha: bool = typer.Option(False, "--assume-mha", help="Also show 1 KV head per head."),
    block_size: int = typer.Option(16, "--block-size", help="KV block size (int4 scales)."),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Bound every layer to its last W tokens."),
    sink_tokens: int = typer.Option(0, "--sink-tokens", help="With --kv-window: also keep the first S tokens."),
    as_json: bool = JsonOpt,
) -> None:
    """KV cache bytes per token, per sequence and per batch; weight bytes; what fits in a memory budget."""
    cfg = resolve_model_config(model, config, preset)
    ctx = require_positive(context if context is not None else cfg.max_position_embeddings, "--context")
    require_positive(batch, "--batch")
    bound = (kv_window, sink_tokens)
    reports = [memory_report(cfg, ctx, batch, kv_dtype, budget, weights_bits, False, block_size, *bound)]
    if assume_mha:
        reports.append(memory_report(cfg, ctx, batch, kv_dtype, budget, weights_bits, True, block_size, *bound))
    if as_json:
        out: dict[str, Any] = {"formula": KV_FORMULA, **reports[0].to_dict()}
        if assume_mha:
            out["mha"] = reports[1].to_dict()
        print(json.dumps(out))
        return
    console = _console()
    console.print(describe_model(cfg))
    console.print(KV_FORMULA)
    console.print(_memory_table(cfg, reports))


_DECIMAL = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    dec = next(f"{n / s:.3g} {u}" for s, u in _DECIMAL if abs(n) >= s or u == "B")
    binary = next(f"{n / s:.3g} {u}" for s, u in _BINARY if abs(n) >= s or u == "B")
    return f"{n:,.0f} B = {dec} = {binary}"


def _memory_table(cfg: ModelConfig, reports: list[MemoryReport]) -> Table:
    r0 = reports[0]
    table = Table(title=f"KV cache and weights ({r0.kv_dtype} KV, weights at {r0.weights_bits:g} bits)")
    table.add_column("quantity")
    real = "as the model is (GQA)" if cfg.num_kv_heads < cfg.num_heads else "as the model is"
    for r in reports:
        kind = "MHA assumed (seeds 002/003)" if r.assume_mha else real
        table.add_column(f"{r.kv_heads} KV heads: {kind}", justify="right")
    windowed = any(w is not None for w in cfg.layer_windows) or r0.kv_window is not None
    rows: list[tuple[str, Any]] = [
        ("KV bytes per token per layer", lambda r: _bytes(r.bytes_per_token_per_layer)),
        ("KV bytes per token (all layers)", lambda r: _bytes(r.bytes_per_token)),
        (f"per sequence of {r0.context_len:,} tokens" + (" (windows capped)" if windowed else ""),
         lambda r: _bytes(r.bytes_per_sequence)),
    ]
    if windowed:
        rows += [
            ("KV bytes per token at that length (windows capped)",
             lambda r: _bytes(r.bytes_per_sequence / r.context_len)),
            (f"per sequence of {r0.context_len:,} tokens if no layer had a window",
             lambda r: _bytes(r.bytes_per_token * r.context_len)),
        ]
    rows += [
        (f"per batch of {r0.batch}", lambda r: _bytes(r.bytes_per_batch)),
        ("parameters", lambda r: f"{r.parameters:,}"),
        ("weights", lambda r: _bytes(r.weights_bytes)),
    ]
    if r0.budget_bytes is not None:
        rows += [
            ("budget", lambda r: _bytes(r.budget_bytes)),
            ("left for the KV cache after weights", lambda r: _bytes(r.kv_budget_bytes)),
            ("tokens that fit (every layer holding each)", lambda r: f"{r.tokens_fit:,}"),
            (f"users at {r0.context_len:,} tokens that fit", lambda r: f"{r.users_fit:,}"),
        ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in reports))
    return table

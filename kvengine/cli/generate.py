"""`kvengine generate` and `kvengine chat`: stream text, then show what the KV cache held and saved."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from kvengine.cli.app import app
from kvengine.cli.options import FAST_WEIGHTS, EngineOptions, engine_options
from kvengine.cli.report import run_summary
from kvengine.engine.output import RequestOutput
from kvengine.sampling import SamplingParams

GENERATE_OPTIONS = ("model", "dtype", "device", "num_threads", "kv_cache_dtype", "kv_cache_memory", "weights",
                    "kv_window", "sink_tokens", "compile")


def _sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
              ignore_eos: bool, stop: list[str] | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          ignore_eos=ignore_eos, stop=stop or [])


@app.command()
@engine_options(*GENERATE_OPTIONS, weights=FAST_WEIGHTS)
def generate(
    prompt: str = typer.Argument(..., help="The prompt. With a chat model it is sent as one user message."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="New tokens at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    seed: int | None = typer.Option(None, "--seed"),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past end-of-sequence."),
    no_cache: bool = typer.Option(False, "--no-cache", help="The seeds' baseline: recompute everything each step."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    system: str | None = typer.Option(None, "--system", help="System message (chat models)."),
    verify: bool = typer.Option(False, "--verify", help="Also recompute without any cache and compare logits."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout (text is not streamed)."),
    *, engine: EngineOptions,
) -> None:
    """Generate text from PROMPT, streaming it, with and (--no-cache) without the KV cache."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, ignore_eos, stop)
    llm = engine.open_llm(max_num_seqs=1)
    tok = llm.tokenizer
    if raw or tok.chat_template is None:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    final: RequestOutput | None = None
    for out in llm.stream(prompt_token_ids=ids, sampling_params=params, use_cache=not no_cache, verify=verify):
        if not as_json:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
        final = out
    assert final is not None and final.metrics is not None
    if not as_json:
        sys.stdout.write("\n")
    run_summary(llm, final, file=sys.stderr)
    if as_json:
        print(json.dumps(output_json(llm, final)))


def output_json(llm, out: RequestOutput) -> dict[str, Any]:
    m = out.metrics
    data: dict[str, Any] = {
        "model": llm.model_name,
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "ttft_s": m.ttft_s,
        "decode_tokens_per_s": m.decode_tokens_per_s,
        "kv_cache_bytes": m.kv_cache_bytes,
        "use_cache": m.use_cache,
        "metrics": m.to_dict(),
    }
    if out.verify is not None:
        v = out.verify
        data["verify"] = {"tokens_checked": v.tokens_checked, "max_abs_logit_diff": v.max_abs_logit_diff,
                          "first_divergence": v.first_divergence, "divergence_margin": v.divergence_margin,
                          "tolerance": v.tolerance, "passed": v.passed}
    return data


@app.command()
@engine_options(*GENERATE_OPTIONS, "kv_disk_dir", "kv_disk_budget", weights=FAST_WEIGHTS)
def chat(
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None, "--seed"),
    system: str | None = typer.Option(None, "--system", help="System message."),
    *, engine: EngineOptions,
) -> None:
    """Interactive multi-turn chat; each turn reuses the KV cache of the turns before it (and, with
    --kv-disk-dir, of earlier runs with the same model)."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, False, None)
    llm = engine.open_llm(max_num_seqs=4)
    if llm.tokenizer.chat_template is None:
        from kvengine.errors import ConfigError

        raise ConfigError(f"model '{llm.model_name}' has no chat template; use `kvengine generate --raw`")
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print(f"kvengine chat with {llm.model_name} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        final = _answer(llm, llm.tokenizer.encode_chat(messages), params)
        messages.append({"role": "assistant", "content": final.text})
        run_summary(llm, final, file=sys.stderr, turn=True)
    if llm.engine.disk is not None:
        llm.engine.disk.flush()  # the conversation's last blocks reach the disk before the process ends


def _answer(llm, ids: list[int], params: SamplingParams) -> RequestOutput:
    """Stream one assistant turn to stdout; its final output."""
    final = None
    sys.stdout.write("assistant> ")
    for out in llm.stream(prompt_token_ids=ids, sampling_params=params):
        sys.stdout.write(out.delta_text)
        sys.stdout.flush()
        final = out
    sys.stdout.write("\n")
    assert final is not None
    return final

"""`kvengine generate` and `kvengine chat`: stream text, then show what the KV cache held and saved."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from kvengine.cli.app import app
from kvengine.cli.report import run_summary
from kvengine.engine.output import RequestOutput
from kvengine.sampling import SamplingParams

ModelOpt = typer.Option(None, "--model", "-m",
                        help="Model name, GGUF file or HF folder (default: SmolLM2-135M-Instruct).")
DtypeOpt = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32/fp32, bfloat16/bf16, float16/fp16.")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for PyTorch (default: PyTorch's choice).")
WeightsOpt = typer.Option("auto", "--weights", help="Weight storage: auto (the dtype), fp32, bf16, fp16, int8, int4.")
# generate, chat and serve: by default the fastest path that keeps quality on this CPU
FastWeightsOpt = typer.Option("fast", "--weights", help="Weight storage: fast (default: int4 weights on kvengine's "
                              "kernels for this CPU, in their activation dtype, when --dtype is left to auto; within "
                              "2% perplexity of fp32), auto (the dtype's float weights), fp32 (the exact reference), "
                              "bf16, fp16, int8, int4.")
KVDtypeOpt = typer.Option("auto", "--kv-dtype", help="KV cache dtype: auto (the model's dtype), float32, bfloat16, "
                          "float16, fp8, int8, int8-token, int4 (docs/kv-dtypes.md).")
KVMemOpt = typer.Option(None, "--kv-cache-memory", help="KV pool budget: bytes (e.g. 2e9) or a fraction of free "
                        "memory (e.g. 0.5).")
KVWindowOpt = typer.Option(None, "--kv-window", help="Keep only the last W tokens' KV in every layer (plus "
                           "--sink-tokens): constant memory, generation past the model's context "
                           "(docs/long-context.md).")
SinkOpt = typer.Option(0, "--sink-tokens", help="With --kv-window: also keep the first S tokens (StreamingLLM's "
                       "attention sinks; 4 is the usual choice).")
DiskDirOpt = typer.Option(None, "--kv-disk-dir", help="Keep full KV blocks in this directory (created 0700) across "
                          "restarts and load them on a prefix miss instead of recomputing (docs/kv-disk.md).")
DiskBudgetOpt = typer.Option(None, "--kv-disk-budget", help="GiB the --kv-disk-dir may hold (LRU eviction; default: a "
                             "quarter of the free space, at most 16).")
CompileOpt = typer.Option(False, "--compile", help="torch.compile decode steps (slow first run; "
                          "cached on disk afterwards).")


def _sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
              ignore_eos: bool, stop: list[str] | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          ignore_eos=ignore_eos, stop=stop or [])


def _open_llm(model: str | None, dtype: str, device: str, threads: int | None, kv_dtype: str,
              kv_memory: float | None, weights: str = "auto", kv_window: int | None = None, sink_tokens: int = 0,
              compile_decode: bool = False, kv_disk_dir: str | None = None, kv_disk_gib: float | None = None,
              **kw: Any):
    from kvengine.llm import LLM

    budget = int(kv_memory) if kv_memory is not None and kv_memory > 1 else kv_memory
    return LLM(model, dtype=dtype, device=device, num_threads=threads, kv_cache_dtype=kv_dtype,
               kv_cache_memory=budget, weights=weights, kv_window=kv_window, sink_tokens=sink_tokens,
               compile=compile_decode, kv_disk_dir=kv_disk_dir, kv_disk_budget=disk_budget_bytes(kv_disk_gib), **kw)


def disk_budget_bytes(gib: float | None) -> int | None:
    """--kv-disk-budget GiB in bytes; a negative, zero or not-a-number budget is one ConfigError."""
    if gib is None:
        return None
    if not gib > 0 or gib == float("inf"):
        from kvengine.errors import ConfigError

        raise ConfigError(f"--kv-disk-budget must be a positive number of GiB, got {gib}")
    return int(gib * 2**30)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt. With a chat model it is sent as one user message."),
    model: str | None = ModelOpt,
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
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    kv_dtype: str = KVDtypeOpt,
    kv_memory: float | None = KVMemOpt,
    weights: str = FastWeightsOpt,
    kv_window: int | None = KVWindowOpt,
    sink_tokens: int = SinkOpt,
    compile_decode: bool = CompileOpt,
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout (text is not streamed)."),
) -> None:
    """Generate text from PROMPT, streaming it, with and (--no-cache) without the KV cache."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, ignore_eos, stop)
    llm = _open_llm(model, dtype, device, threads, kv_dtype, kv_memory, weights, kv_window, sink_tokens,
                    compile_decode, max_num_seqs=1)
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
def chat(
    model: str | None = ModelOpt,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None, "--seed"),
    system: str | None = typer.Option(None, "--system", help="System message."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    kv_dtype: str = KVDtypeOpt,
    kv_memory: float | None = KVMemOpt,
    weights: str = FastWeightsOpt,
    kv_window: int | None = KVWindowOpt,
    sink_tokens: int = SinkOpt,
    compile_decode: bool = CompileOpt,
    kv_disk_dir: str | None = DiskDirOpt,
    kv_disk_budget: float | None = DiskBudgetOpt,
) -> None:
    """Interactive multi-turn chat; each turn reuses the KV cache of the turns before it (and, with
    --kv-disk-dir, of earlier runs with the same model)."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, False, None)
    llm = _open_llm(model, dtype, device, threads, kv_dtype, kv_memory, weights, kv_window, sink_tokens,
                    compile_decode, kv_disk_dir, kv_disk_budget, max_num_seqs=4)
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
        ids = llm.tokenizer.encode_chat(messages)
        final = None
        sys.stdout.write("assistant> ")
        for out in llm.stream(prompt_token_ids=ids, sampling_params=params):
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            final = out
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": final.text})
        run_summary(llm, final, file=sys.stderr, turn=True)
    if llm.engine.disk is not None:
        llm.engine.disk.flush()  # the conversation's last blocks reach the disk before the process ends

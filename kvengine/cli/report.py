"""The short summary printed after every run: speed, what the KV cache held, what it saved."""

from __future__ import annotations

from typing import TextIO

from kvengine.engine.output import RequestOutput


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def disk_line(m) -> str:
    """Where the reused tokens came from, what reading them cost, and what recomputing them would have cost."""
    line = (f"KV disk tier: reused {m.memory_tokens} tokens from memory, {m.disk_tokens} from disk "
            f"({human_bytes(m.disk_bytes_read)} read in {m.disk_load_s * 1000:.0f} ms)")
    reuse = m.reuse_flops_memory + m.reuse_flops_disk
    if reuse:
        line += f"; recomputing them: {human_count(reuse)} FLOPs"
        if m.recompute_s is not None:
            line += f", ~{m.recompute_s:.2f} s at this engine's measured prefill rate"
    return line


def run_summary(llm, out: RequestOutput, file: TextIO, turn: bool = False) -> None:
    m = out.metrics
    ttft = f"{m.ttft_s * 1000:.0f} ms" if m.ttft_s is not None else "-"
    decode = f"{m.decode_tokens_per_s:.1f} tok/s" if m.decode_tokens_per_s else "-"
    mode = "KV cache" if m.use_cache else "no cache (recompute every step)"
    mode += f"; {llm.engine.weights_desc}" if llm.engine.weights_desc else ""
    lines = [
        f"[{mode}] prompt {m.prompt_tokens} tok, generated {m.completion_tokens} tok ({out.finish_reason}); "
        f"time to first token {ttft}, decode {decode}, total {m.total_s:.2f} s",
    ]
    if m.use_cache:
        lines.append(_cache_line(llm, m, turn))
    if m.use_cache and llm.engine.disk is not None:
        lines.append(disk_line(m))
    ratio = m.flops_no_cache / m.flops if m.flops else 0.0
    lines.append(
        f"matmul FLOPs (2mnp): {human_count(m.flops)} spent; a no-cache run computes "
        f"{human_count(m.flops_no_cache)} ({ratio:.1f}x)"
    )
    lines += _compile_lines(llm)
    if out.verify is not None:
        lines.append(_verify_line(out.verify))
    for line in lines:
        print(line, file=file)


def _cache_line(llm, m, turn: bool) -> str:
    """What the KV cache held and which prompt tokens it reused."""
    spec = llm.kv_cache_spec
    return (
        f"KV cache held {human_bytes(m.kv_cache_bytes)} ({human_bytes(spec.bytes_per_token)}/token x "
        f"{round(m.kv_cache_bytes / spec.bytes_per_token)} tokens, {m.blocks_held} blocks of {spec.block_size}, "
        f"{spec.dtype}); prompt tokens computed {m.computed_prompt_tokens}, reused {m.cached_tokens}"
        + (f" (rest not reused: {m.miss_reason})" if m.miss_reason and turn and not m.disk_tokens else "")
        + (f"; bounded: every layer keeps at most {spec.sink_tokens} sink + {spec.kv_window} recent tokens"
           if spec.kv_window is not None else "")
    )


def _compile_lines(llm) -> list[str]:
    """The first compiled decode steps' time, once per process."""
    compiled = llm.engine.runner.compiled
    first_calls = compiled.untold_first_calls() if compiled is not None else {}
    if not first_calls:
        return []
    took = ", ".join(f"{kind} {s:.1f} s" for kind, s in first_calls.items())
    return [f"torch.compile: first compiled decode steps took {took} (tracing, then compiling or loading "
            "Inductor's disk cache); that time is inside this run's decode rate; later requests in this "
            "process skip it, a new process traces again (Dynamo keeps no disk cache)"]


def _verify_line(v) -> str:
    """--verify: the run against a recomputation without any cache."""
    verdict = "identical" if v.passed else "DIFFERENT"
    div = "none" if v.first_divergence is None else f"token {v.first_divergence}"
    if v.divergence_margin is not None:
        tie = " (a near-tie, within the dtype's tolerance)" if v.divergence_margin <= v.tolerance else ""
        div += f", where the no-cache run ranks its own pick {v.divergence_margin:.3g} above this run's{tie}"
    return (f"verify: recomputed without cache: {verdict}; max |logit diff| {v.max_abs_logit_diff:.2e} over "
            f"{v.tokens_checked} steps (tolerance {v.tolerance:g}), first diverging token: {div}")

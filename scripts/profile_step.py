#!/usr/bin/env python
"""Where a step's time goes on one kernel tier: (a) the tile matmuls q4_gemm / q8_gemm alone on the model's linear
shapes at a few row counts (median ms, effective GMAC/s), (b) the real engine's decode steps at batch 1 and at
many concurrent rows, profiled with torch.profiler (ms per step by op). A table per part, then one JSON line.

    KVENGINE_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        .venv/bin/python scripts/profile_step.py --weights int4 --threads 2

The four variables keep PyTorch's own ops (the fp32 matmuls, attention, norms) on AVX2 too, so the avx2 tier is
measured as an AVX2-only CPU would run it; the header prints what PyTorch reports it uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from kvengine.layers import native
from kvengine.layers.linear import INT4_GROUP, quantize_int4, quantize_int8
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path (default: kvengine's default model)")
    p.add_argument("--weights", default="int4", help="weight format of the engine steps (int4, int8, fp32)")
    p.add_argument("--rows", default="1,32,1024", help="row counts M of the matmul timings")
    p.add_argument("--batch", type=int, default=32, help="concurrent requests of the many-row step")
    p.add_argument("--prefill", type=int, default=0, help="also profile the prefill of one prompt of this many tokens")
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled per batch size")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per matmul (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--skip-engine", action="store_true", help="time the matmuls only")
    return p.parse_args()


def timed_s(fn: Any, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of `repeats` calls after one warm call; under load the best is the kernel's own
    cost (a 2-thread op waits whenever another process holds one of the cores)."""
    fn()  # warm: first-touch, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def linear_shapes(llm: LLM) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of one layer's linears (fused projections as the engine runs them)."""
    mc = llm.model_config
    h, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    return {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * mc.intermediate_size),
            "down": (mc.intermediate_size, h)}


def gemm_rows(shapes: dict[str, tuple[int, int]], rows: list[int], repeats: int) -> list[dict[str, Any]]:
    tier = native.chosen()
    if tier is None:
        return []
    ops = native.ops(tier.name)
    out = []
    for name, (K, N) in shapes.items():
        w = torch.randn(N, K) * 0.05  # [N, K]
        q4, s4, m4 = quantize_int4(w, INT4_GROUP)
        q8, s8 = quantize_int8(w)
        w4 = (native.tile_int4(q4), native.tile_int4_scales(torch.stack([s4, m4], 1).half()))
        w8 = (native.tile_int8(q8), s8)
        for m in rows:
            x = torch.randn(m, K).to(tier.act_dtype)  # [M, K]
            for fmt, op, wt in (("int4", ops.q4_gemm, w4), ("int8", ops.q8_gemm, w8)):
                med, best = timed_s(lambda op=op, wt=wt, x=x: op(x, *wt), repeats)
                out.append({"linear": name, "K": K, "N": N, "M": m, "weights": fmt, "ms": med * 1e3,
                            "best_ms": best * 1e3, "gmac_s": m * K * N / best / 1e9})
    return out


def profile_steps(llm: LLM, batch: int, steps: int) -> dict[str, Any]:
    """Prefill `batch` short prompts, then profile `steps` decode steps of all of them: ms per step by op."""
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    prompts = [[1 + (7 * i + j) % 1000 for j in range(16)] for i in range(batch)]
    llm._submit(None, params, prompts, True, False, None)
    while llm.engine.scheduler.waiting:  # the prefills
        llm.engine.step()
    for _ in range(2):  # decode steps unprofiled (warm)
        llm.engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        wall = time.perf_counter() - t0
    while llm.engine.has_unfinished():
        llm.engine.step()
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total / 1e3 / steps  # ms per step, self time
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"batch": batch, "step_ms": wall * 1e3 / steps, "tok_s": batch * steps / wall, "self_ms_by_op": top}


def linear_share(gemm: list[dict[str, Any]], weights: str, batch: int, layers: int) -> float | None:
    """ms per step the layers' linears take at `batch` rows, from the matmul timings (None if not timed)."""
    ms = [r["best_ms"] for r in gemm if r["M"] == batch and r["weights"] == weights]
    return sum(ms) * layers if ms else None


def profile_prefill(llm: LLM, tokens: int) -> dict[str, Any]:
    """The steps that prefill one `tokens`-token prompt (max_tokens 1), profiled: ms by op over the whole prefill."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompt = [[1 + (13 * j) % 1000 for j in range(tokens)]]
    llm._submit(None, params, prompt, True, False, None)  # warm run: first-touch of the activations
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm._submit(None, params, prompt, True, False, None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        while llm.engine.has_unfinished():
            llm.engine.step()
        wall = time.perf_counter() - t0
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total / 1e3
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"batch": tokens, "prefill": True, "step_ms": wall * 1e3, "tok_s": tokens / wall, "self_ms_by_op": top,
            "linears_ms_est": None}


def print_gemm(rows: list[dict[str, Any]]) -> None:
    print(f"{'linear':8} {'K':>5} {'N':>5} {'M':>5} {'weights':7} {'median ms':>9} {'best ms':>9} {'GMAC/s':>8}")
    for r in rows:
        print(f"{r['linear']:8} {r['K']:5} {r['N']:5} {r['M']:5} {r['weights']:7} {r['ms']:9.3f} {r['best_ms']:9.3f} "
              f"{r['gmac_s']:8.1f}")
    print("(GMAC/s from the best time)")


def print_profile(p: dict[str, Any]) -> None:
    what = "prefill of one prompt" if p.get("prefill") else "decode step"
    print(f"\n{p['batch']} rows: {p['step_ms']:.2f} ms per {what} ({p['tok_s']:.1f} tok/s); self ms:")
    if p["linears_ms_est"] is not None:
        print(f"  (the layers' linears alone, from the matmul timings at M={p['batch']}: {p['linears_ms_est']:.2f} ms)")
    for op, ms in p["self_ms_by_op"].items():
        print(f"  {op[:60]:60} {ms:8.3f}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tier = native.chosen()
    print(f"tier {tier.name if tier else None}; torch cpu capability {torch.backends.cpu.get_cpu_capability()}; "
          f"threads {torch.get_num_threads()}")
    llm = LLM(args.model, quiet=True, weights=args.weights, num_threads=args.threads,
              enable_prefix_caching=False)
    gemm = gemm_rows(linear_shapes(llm), [int(m) for m in args.rows.split(",")], args.repeats)
    print_gemm(gemm)
    profiles = [] if args.skip_engine else [profile_steps(llm, b, args.steps) for b in (1, args.batch)]
    if args.prefill and not args.skip_engine:
        profiles.append(profile_prefill(llm, args.prefill))
    for p in profiles:
        p["linears_ms_est"] = linear_share(gemm, args.weights, p["batch"], llm.model_config.num_layers)
        print_profile(p)
    print(json.dumps({"tier": tier.name if tier else None, "capability": torch.backends.cpu.get_cpu_capability(),
                      "weights": args.weights, "gemm": gemm, "steps": profiles}))


if __name__ == "__main__":
    main()

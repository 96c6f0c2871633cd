"""The `bench peers` report: the performance goals (kvengine's best variant against llama.cpp, ratios measured in one
run), the kvengine variants, the batch-1 decode tables, the concurrent-requests and prefill tables, and the
`result.json` / final-JSON-line keys. `compute_goals` is the pure part: rates in, goals out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvengine.bench import plots
from kvengine.bench.peer_systems import KVENGINE, LLAMA_CPP, SYSTEMS, TRANSFORMERS
from kvengine.bench.peers import PeerRun, PeersBench, PeersPlan, RateRun, common_prefix, common_words, quantized_dtype
from kvengine.bench.report import Report, Table, ms, num

GOAL_TARGETS = {"decode": 1.0, "concurrent": 5.0, "prefill": 2.0}  # kvengine / llama.cpp at least this
AGREE_TOKENS = 32  # the goal: greedy output equal to the full-precision reference for the first 32 tokens
COMPARE_WORDS = 8  # "starts with the same words": the first this many words of kvengine's text
KV = "KV cache"


@dataclass(slots=True)
class Goal:
    """One performance goal: kvengine's best rate over its variants against llama.cpp's, and the target."""

    key: str  # "decode", "concurrent" or "prefill"
    title: str
    target: float
    kvengine: float | None = None
    variant: str | None = None  # which kvengine variant gave `kvengine`
    llama_cpp: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.kvengine / self.llama_cpp if self.kvengine and self.llama_cpp else None

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.key, "title": self.title, "kvengine": self.kvengine, "kvengine_variant": self.variant,
                "llama_cpp": self.llama_cpp, "ratio": self.ratio, "target_ratio": self.target, "met": self.met}


def best_rate(rates: dict[str, float | None]) -> tuple[float | None, str | None]:
    """(the highest known rate, its variant), or (None, None)."""
    known = {k: v for k, v in rates.items() if v}
    if not known:
        return None, None
    key = max(known, key=lambda k: known[k])
    return known[key], key


def compute_goals(kvengine: dict[str, dict[str, float | None]], llama_cpp: dict[str, float | None],
                  titles: dict[str, str] | None = None) -> list[Goal]:
    """kvengine[goal][variant] and llama_cpp[goal] are tok/s (llama.cpp's "concurrent" is its batch-1 decode
    rate); every goal of GOAL_TARGETS comes back, unmeasured parts as None."""
    return [Goal(key, (titles or {}).get(key, key), target, *best_rate(kvengine.get(key, {})), llama_cpp.get(key))
            for key, target in GOAL_TARGETS.items()]


def token_agreement(bench: PeersBench) -> dict[str, tuple[int, int]]:
    """variant label -> (leading greedy tokens equal to the fp32 variant's, tokens compared), at the goal length
    with the KV cache (the fp32 variant itself included); empty when no fp32 variant ran."""
    ref_variant = next((v for v in bench.plan.variants if v.weights == "fp32"), None)
    n = bench.plan.goal_length
    ref = bench.find(KVENGINE, KV, ref_variant.label, n) if ref_variant else None
    if ref is None:
        return {}
    want = ref.run.token_ids[:AGREE_TOKENS]
    out = {}
    for v in bench.plan.variants:
        run = bench.find(KVENGINE, KV, v.label, n)
        if run is not None:
            out[v.label] = (common_prefix(want, run.run.token_ids[:AGREE_TOKENS]), len(want))
    return out


def _rates(runs: list[RateRun], system: str) -> dict[str, float | None]:
    return {r.weights: r.tokens_per_s for r in runs if r.system == system}


def _decode_rates(bench: PeersBench, system: str) -> dict[str, float | None]:
    return {r.weights: r.run.decode_tokens_per_s for r in bench.runs[bench.plan.goal_length]
            if r.system == system and r.setting == KV}


def bench_goals(bench: PeersBench) -> list[Goal]:
    plan = bench.plan
    llama_decode = next(iter(_decode_rates(bench, LLAMA_CPP).values()), None)
    kv = {"decode": _decode_rates(bench, KVENGINE), "concurrent": _rates(bench.concurrent, KVENGINE),
          "prefill": _rates(bench.prefill, KVENGINE)}
    llama = {"decode": llama_decode, "concurrent": llama_decode,
             "prefill": next(iter(_rates(bench.prefill, LLAMA_CPP).values()), None)}
    skip = {"concurrent": " (skipped: --concurrency 0)" if not plan.concurrency else "",
            "prefill": " (skipped: --prefill-tokens 0)" if not plan.prefill_tokens else ""}
    titles = {"decode": f"batch-1 decode tok/s at {plan.goal_length} new tokens",
              "concurrent": f"aggregate tok/s of {plan.concurrency} concurrent requests x {plan.concurrent_tokens} "
                            f"new tokens, against llama.cpp's batch-1 decode{skip['concurrent']}",
              "prefill": f"prefill tok/s of a {plan.prefill_tokens:,}-token prompt{skip['prefill']}"}
    return compute_goals(kv, llama, titles)


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _agree_cell(agree: tuple[int, int] | None) -> str:
    return "-" if agree is None else f"{_yes(agree[0] == agree[1])} ({agree[0]} of {agree[1]})"


def goals_table(goals: list[Goal], agreement: dict[str, tuple[int, int]]) -> Table:
    rows = [[g.title, f"{num(g.kvengine, 1)} ({g.variant})" if g.variant else "-", num(g.llama_cpp, 1),
             num(g.ratio), f">= {g.target:.1f}", _yes(g.met)] for g in goals]
    decode = next(g.variant for g in goals if g.key == "decode")
    if decode is not None:
        agree = agreement.get(decode)
        count = agree[1] if agree else AGREE_TOKENS
        rows.append([f"first {count} greedy tokens of {decode} equal kvengine fp32's", _agree_cell(agree),
                     "-", "-", "equal (or perplexity +<2%)",
                     "-" if agree is None else ("yes" if agree[0] == agree[1] else "no: check perplexity")])
    return Table("Issue 7 goals: kvengine's best variant against llama.cpp, measured in this run",
                 ["goal", "kvengine (best variant)", "llama.cpp", "kvengine / llama.cpp", "target", "met"], rows)


def variants_table(bench: PeersBench, agreement: dict[str, tuple[int, int]]) -> Table:
    plan = bench.plan
    decode, conc, pre = _decode_rates(bench, KVENGINE), _rates(bench.concurrent, KVENGINE), \
        _rates(bench.prefill, KVENGINE)
    rows = [[v.label, v.weights, v.dtype, _yes(v.compile),
             "-" if bench.compile_s.get(v.label) is None else f"{bench.compile_s[v.label]:,.1f} s",
             num(decode.get(v.label), 1), num(conc.get(v.label), 1), num(pre.get(v.label), 1),
             "reference" if v.weights == "fp32" else _agree_cell(agreement.get(v.label))] for v in plan.variants]
    return Table("kvengine variants", [
        "variant", "weights", "compute dtype", "compiled decode", "compile time",
        f"decode tok/s ({plan.goal_length} new)", f"{plan.concurrency} concurrent: tok/s",
        f"prefill tok/s ({plan.prefill_tokens})", f"first {AGREE_TOKENS} tokens = fp32"], rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _same_start(run: PeerRun, ref: PeerRun | None) -> tuple[bool | None, int]:
    if ref is None:
        return None, 0
    k = common_words(ref.run.text, run.run.text)
    return k >= min(COMPARE_WORDS, len(ref.run.text.split())), k


def _decode_tables(bench: PeersBench, report: Report, model_name: str) -> list[dict[str, Any]]:
    """One table per kvengine variant (its rows, transformers at its compute dtype, llama.cpp), ratios against
    the variant at the same length and cache setting; then the pivot by length and the bar plot."""
    rows_json, pivot = [], {}
    for v in bench.plan.variants:
        rows = []
        for n in bench.lengths:
            for r in sorted(bench.runs[n], key=lambda r: (SYSTEMS.index(r.system), r.setting)):
                if (r.system, r.weights) not in ((KVENGINE, v.label), (TRANSFORMERS, v.dtype)) \
                        and r.system != LLAMA_CPP:
                    continue
                ref = bench.find(KVENGINE, r.setting if r.system != LLAMA_CPP else KV, v.label, n)
                mine, theirs = (ref.run.decode_tokens_per_s if ref else None), r.run.decode_tokens_per_s
                same, k = _same_start(r, bench.find(KVENGINE, KV, v.label, n))
                rows.append([str(n), r.system, r.setting, r.weights, r.version, ms(r.run.ttft_s), num(theirs),
                             num(r.run.tokens_per_s), num(_ratio(theirs, mine)), num(_ratio(mine, theirs)),
                             "-" if same is None else f"{'yes' if same else 'no'} ({k})"])
                rows_json.append({**r.to_dict(), "compared_with": v.label, "compared_with_dtype": v.dtype,
                                  "peer_over_kvengine": _ratio(theirs, mine), "kvengine_over_peer":
                                  _ratio(mine, theirs), "same_start": same, "common_leading_words": k})
                key = f"{r.system}, {r.setting}, {r.weights}"
                pivot.setdefault(key, {})[n] = (theirs, r.run.tokens_per_s)
        report.tables.append(Table(
            f"{model_name}, kvengine {v.label}: decode speed, {bench.prompt_tokens}-token prompt, greedy",
            ["new tokens", "system", "setting", "weights", "version", "TTFT", "decode tok/s", "end-to-end tok/s",
             "peer / kvengine", "kvengine / peer", f"same first {COMPARE_WORDS} words"], rows))
    report.tables.append(Table("decode tok/s (end-to-end tok/s) by new tokens",
                               ["system, setting, weights", *(f"{n} new" for n in bench.lengths)],
                               [[k, *(f"{num(c[n][0], 1)} ({num(c[n][1], 1)})" if n in c else "-"
                                      for n in bench.lengths)] for k, c in pivot.items()]))
    plots.bars(report.plot_path("peers.png", "Decode tok/s of every system and setting, by new tokens"),
               [f"{n} new tokens" for n in bench.lengths],
               {k: [c.get(n, (None,))[0] for n in bench.lengths] for k, c in pivot.items()}, "decode tokens/s",
               f"{model_name}: decode speed, same prompt, greedy", report.machine.describe())
    return rows_json


def _rate_table(title: str, runs: list[RateRun], baseline: tuple[str, float | None], first: list[str],
                cells: Callable[[RateRun], list[str]]) -> Table:
    """tok/s of each run and its ratio to `baseline` (header, llama.cpp's rate)."""
    rows = [[r.system, r.weights, r.version, *cells(r), num(r.tokens_per_s, 1),
             num(_ratio(r.tokens_per_s, baseline[1]))] for r in runs]
    return Table(title, ["system", "weights", "version", *first, "tok/s", baseline[0]], rows)


def weight_read_rates(bench: PeersBench) -> list[dict[str, Any]]:
    """Batch-1 decode at the goal length as weight bytes read per second, for each system and weights format
    whose bytes per token are known, beside the machine's measured read bandwidth."""
    out = []
    for (system, weights), per_token in bench.read_bytes.items():
        run = bench.find(system, KV, weights, bench.plan.goal_length)
        rate = run.run.decode_tokens_per_s if run else None
        gbs = per_token * rate / 1e9 if rate else None
        ceiling = bench.read_bandwidth / 1e9 if bench.read_bandwidth else None
        out.append({"system": system, "weights": weights, "bytes_per_token": per_token, "decode_tokens_per_s": rate,
                    "weights_gb_per_s": gbs, "machine_gb_per_s": ceiling,
                    "of_machine": gbs / ceiling if gbs and ceiling else None})
    return out


def _bandwidth_table(bench: PeersBench) -> Table:
    rows = [[r["system"], r["weights"], f"{r['bytes_per_token'] / 1e6:,.1f} MB", num(r["decode_tokens_per_s"], 1),
             num(r["weights_gb_per_s"], 2), "-" if r["of_machine"] is None else f"{r['of_machine']:.0%}"]
            for r in weight_read_rates(bench)]
    ceiling = f"{bench.read_bandwidth / 1e9:,.1f} GB/s" if bench.read_bandwidth else "not measured"
    return Table(f"weight reads in batch-1 decode at {bench.plan.goal_length} new tokens (this machine reads "
                 f"{ceiling}: a 1 GiB float32 sum, best of 5)",
                 ["system", "weights", "weights read per token", "decode tok/s", "weights GB/s", "of machine"], rows)


def peers_report(bench: PeersBench, report: Report, model_name: str) -> Report:
    plan = bench.plan
    goals, agreement = bench_goals(bench), token_agreement(bench)
    llama = {g.key: g.llama_cpp for g in goals}
    report.tables += [goals_table(goals, agreement), variants_table(bench, agreement)]
    rows_json = _decode_tables(bench, report, model_name)
    if bench.concurrent:
        report.tables.append(_rate_table(
            f"{plan.concurrency} concurrent greedy requests, {plan.concurrent_tokens} new tokens each",
            bench.concurrent, ("/ llama.cpp batch-1 decode", llama["concurrent"]),
            ["requests", "output tokens", "wall time"],
            lambda r: [str(r.requests), str(r.tokens), f"{r.seconds:,.2f} s"]))
    if bench.prefill:
        report.tables.append(_rate_table(f"prefill of a {plan.prefill_tokens:,}-token prompt", bench.prefill,
                                         ("/ llama.cpp prefill", llama["prefill"]), ["prompt tokens", "TTFT"],
                                         lambda r: [str(r.tokens), ms(r.seconds)]))
    if bench.read_bytes:
        report.tables.append(_bandwidth_table(bench))
    report.notes += _notes(bench, goals)
    if any(g.ratio for g in goals):
        plots.bars(report.plot_path("goals.png", "kvengine / llama.cpp for each goal, beside its target"),
                   [g.key for g in goals], {"kvengine / llama.cpp": [g.ratio for g in goals],
                                            "target": [g.target for g in goals]},
                   "ratio", f"{model_name}: against the goals", report.machine.describe(), "{:,.2f}")
    same = {k: a[0] == a[1] for k, a in agreement.items()}
    report.results = {"runs": rows_json, "skipped": bench.skipped, "peer_notes": bench.peer_notes,
                      "lengths": bench.lengths, "dtypes": plan.dtypes,
                      "variants": [{**v.to_dict(), "compile_s": bench.compile_s.get(v.label), "weights_desc":
                                    bench.weights_desc.get(v.label)} for v in plan.variants],
                      "concurrent": [r.to_dict() for r in bench.concurrent],
                      "prefill": [r.to_dict() for r in bench.prefill], "goals": [g.to_dict() for g in goals],
                      "weight_reads": weight_read_rates(bench),
                      "goal_length": plan.goal_length, "prefill_prompt_ids": bench.prefill_ids,
                      "token_agreement": {k: {"equal_leading_tokens": a[0], "compared": a[1]}
                                          for k, a in agreement.items()}}
    report.summary = {"model": model_name, "skipped": bench.skipped, "goals": {g.key: g.to_dict() for g in goals},
                      "same_first_tokens_as_fp32": same,
                      "compile_s": {k: s for k, s in bench.compile_s.items() if s is not None},
                      "decode_tokens_per_s": {f"{r['system']}|{r['setting']}|{r['weights']}|{r['new_tokens']}":
                                              r["decode_tokens_per_s"] for r in rows_json},
                      "concurrent_tokens_per_s": {f"{r.system}|{r.weights}": r.tokens_per_s for r in bench.concurrent},
                      "prefill_tokens_per_s": {f"{r.system}|{r.weights}": r.tokens_per_s for r in bench.prefill},
                      "machine_read_gb_per_s": bench.read_bandwidth / 1e9 if bench.read_bandwidth else None,
                      "weights_gb_per_s": {f"{r['system']}|{r['weights']}": r["weights_gb_per_s"]
                                           for r in weight_read_rates(bench)}}
    return report


def _notes(bench: PeersBench, goals: list[Goal]) -> list[str]:
    plan = bench.plan
    why = "200 was run" if plan.goal_length == 200 else "the longest length run; add 200 to --lengths to judge at 200"
    notes = [
        "Goals: kvengine's best variant / llama.cpp, each rate measured in this run. Batch-1 decode is judged at "
        f"{plan.goal_length} new tokens ({why}), with the KV cache. The concurrent goal divides kvengine's "
        "aggregate tok/s by llama.cpp's batch-1 decode tok/s (target 5x); prefill divides prompt tokens / TTFT.",
        "kvengine variants (--weights): auto = the float weights of each --dtypes dtype; fp32/bf16/fp16 compute in "
        "their own dtype; int8/int4 compute in the dtype the engine picks for this CPU's kernel tier "
        f"({quantized_dtype(plan.device)} here) unless --dtypes is given, then one variant per dtype. --compile "
        "compiles each variant's decode steps, batch-1 and concurrent, except where they run one kvengine op "
        "per layer (the weights line ends 'steps: one kvengine op per layer'; then nothing is compiled and "
        "compile time is '-'); compile time = its first compiled call: tracing, then compiling; Inductor "
        "caches the compiled code on disk, so a later run pays about half, the tracing.",
        *(f"{label}: {desc}" for label, desc in bench.weights_desc.items()),
        f"Token agreement: each variant's first {AGREE_TOKENS} greedy tokens (KV cache, {plan.goal_length} new) "
        "against the fp32 variant's; (k of n) = leading tokens equal. The issue also accepts changed text when "
        "perplexity rises less than 2% (checked by the weights tests, not here)."
        + ("" if any(v.weights == "fp32" for v in plan.variants) else " No fp32 variant ran: add fp32 to --weights."),
        "decode tok/s = (new tokens - 1) / (time of the last token - time of the first); end-to-end tok/s = new "
        "tokens / time from sending the prompt to the last token; TTFT = time to the first token (prefill).",
        "peer / kvengine and kvengine / peer divide decode tok/s, against the table's kvengine variant at the same "
        "length and cache setting (llama.cpp against kvengine with the cache). peer / kvengine > 1: the peer is "
        "faster. Same first words: the text against that variant's (KV cache, same length), word by word; "
        "(k) = leading words in common. EOS is ignored by every system so each makes exactly the asked tokens.",
    ]
    return notes + _plan_notes(plan) + bench.peer_notes + bench.skipped


def _plan_notes(plan: PeersPlan) -> list[str]:
    """How the concurrent, prefill and no-cache measurements ran, for those this run made."""
    notes: list[str] = []
    if plan.concurrency:
        notes.append(f"Concurrent: {plan.concurrency} distinct chat prompts sent at once, greedy, EOS ignored, "
                     f"{plan.concurrent_tokens} new tokens each; tok/s = output tokens / wall time. kvengine: one "
                     "fresh engine with max_num_seqs = requests, prefix caching off (continuous batching); "
                     "transformers: one left-padded batched generate (a reference row); llama.cpp: its batch-1 "
                     "decode rate is the baseline. One untimed batch first.")
    if plan.prefill_tokens:
        notes.append(f"Prefill: exactly {plan.prefill_tokens} ids of CPython's pydoc reference text (no chat "
                     "template), identical for every system; tok/s = prompt tokens / time to the first token, median "
                     "of --repeats after one untimed run. kvengine runs with prefix caching off and llama.cpp is "
                     "reset before each run, so no prompt is served from an earlier one.")
    if plan.no_cache_max_tokens:
        notes.append(f"No-cache runs only up to {plan.no_cache_max_tokens} new tokens (--no-cache-max-tokens); "
                     "longer ones are left out (-).")
    return notes

"""`bench sessions`: K users x T turns of multi-turn chat against a server that is killed (SIGKILL) and started
again in the middle; time to first token per turn for four servers, one after another, on the same model:

- no prefix cache: every turn recomputes the whole conversation;
- memory only: the prefix cache, lost with the process;
- memory + disk: the prefix cache and the KV disk tier (`--kv-disk-dir`), kept across the restart;
- memory + empty disk: the same, with the directory emptied at the restart (the "empty DIR" baseline).

Each user's first message is a long document of its own (`history_items` records), later turns ask short
questions about it; answers are greedy. Clients are the real `openai` client, streaming, one request at a time
(so a TTFT is one request's, not a queue's). The first turn after the restart is the headline: its history
comes from disk, or is recomputed. Decode speed (tokens/s after the first token) is reported per server, so the
disk tier's cost to decoding is visible in the same run.
"""

from __future__ import annotations

import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kvengine.bench import plots
from kvengine.bench.report import Report, Table, ms, num
from kvengine.bench.serving import start_server
from kvengine.engine.config import EngineConfig

MODES = ("no prefix cache", "memory only", "memory + disk", "memory + empty disk")


@dataclass(slots=True)
class SessionsConfig:
    model: str | None = None
    users: int = 2
    turns: int = 4
    restart_after: int = 2  # turns before the kill -9
    history_items: int = 200
    max_tokens: int = 32
    engine: EngineConfig = field(default_factory=EngineConfig)  # each server's, before its mode's changes


@dataclass(slots=True)
class TurnResult:
    mode: str
    user: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    disk_tokens: int
    ttft_s: float
    decode_tokens_per_s: float | None


@dataclass(slots=True)
class SessionsResult:
    turns: list[TurnResult] = field(default_factory=list)

    def ttft(self, mode: str, turn: int) -> float:
        """Mean TTFT of `turn` over the users, for `mode`."""
        return statistics.mean(r.ttft_s for r in self.turns if r.mode == mode and r.turn == turn)

    def decode(self, mode: str) -> float | None:
        rates = [r.decode_tokens_per_s for r in self.turns if r.mode == mode and r.decode_tokens_per_s]
        return statistics.mean(rates) if rates else None


def history(user: int, items: int) -> str:
    """A user's document: `items` numbered records of its own."""
    return "Here are my notes. " + " ".join(f"Record {i} of user {user}: the value is {(i * 37 + user * 11) % 101}."
                                            for i in range(items))


def question(turn: int) -> str:
    return f"Question {turn}: what is the value of record {3 + 5 * turn}? Answer briefly."


def _ask(client: Any, model: str, messages: list[dict[str, str]],
         max_tokens: int) -> tuple[str, float, float | None, Any]:
    """One streamed, greedy chat request: (text, TTFT, decode tokens/s, usage)."""
    start = time.perf_counter()
    first = last = None
    text, usage = [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(chunk.choices[0].delta.content)
    assert first is not None and usage is not None
    n = usage.completion_tokens
    decode = (n - 1) / (last - first) if n > 1 and last > first else None
    return "".join(text), first - start, decode, usage


def _server(config: SessionsConfig, mode: str, disk_dir: Path | None) -> tuple[Any, Any]:
    import openai

    engine = replace(config.engine, max_num_seqs=4, kv_disk_dir=str(disk_dir) if disk_dir else None,
                     enable_prefix_caching=mode != "no prefix cache")
    proc, url = start_server(config.model, engine)
    return proc, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def _kill(proc: Any) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _wait_written(url_client: Any) -> None:
    """Until the server's disk writer has nothing queued (what a kill -9 would lose)."""
    import urllib.request

    base = str(url_client.base_url).removesuffix("/v1/").removesuffix("/v1")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            if "kvengine_kv_disk_pending 0.0" in r.read().decode():
                return
        time.sleep(0.1)


def run_mode(config: SessionsConfig, mode: str, work: Path) -> list[TurnResult]:
    disk_dir = work / mode.replace(" ", "-").replace("+", "and") if "disk" in mode else None
    proc, client = _server(config, mode, disk_dir)
    conversations: list[list[dict[str, str]]] = [[] for _ in range(config.users)]
    out = []
    try:
        for turn in range(config.turns):
            if turn == config.restart_after:
                if disk_dir is not None:
                    _wait_written(client)
                _kill(proc)
                if mode == "memory + empty disk":
                    shutil.rmtree(disk_dir)
                proc, client = _server(config, mode, disk_dir)
            for user, conv in enumerate(conversations):
                content = (history(user, config.history_items) + " " if turn == 0 else "") + question(turn)
                conv.append({"role": "user", "content": content})
                text, ttft, decode, usage = _ask(client, client.models.list().data[0].id, conv, config.max_tokens)
                conv.append({"role": "assistant", "content": text})
                ext = (usage.model_extra or {}).get("kvengine", {})
                out.append(TurnResult(mode, user, turn, usage.prompt_tokens,
                                      usage.prompt_tokens_details.cached_tokens, ext.get("cached_tokens_disk", 0),
                                      ttft, decode))
    finally:
        _kill(proc)
    return out


def run_sessions(config: SessionsConfig) -> SessionsResult:
    result = SessionsResult()
    work = Path(tempfile.mkdtemp(prefix="kvengine-sessions-"))
    try:
        for mode in MODES:
            result.turns += run_mode(config, mode, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def sessions_report(report: Report, config: SessionsConfig, result: SessionsResult) -> Report:
    turns = range(config.turns)
    r = config.restart_after
    rows = []
    for t in turns:
        tokens = statistics.mean(x.prompt_tokens for x in result.turns if x.turn == t and x.mode == MODES[2])
        row = [f"{t + 1}{' (after kill -9)' if t == r else ''}", f"{tokens:.0f}"]
        row += [ms(result.ttft(m, t)) for m in MODES]
        disk = [x for x in result.turns if x.turn == t and x.mode == "memory + disk"]
        row.append(f"{statistics.mean(x.disk_tokens for x in disk):.0f}")
        rows.append(row)
    report.tables.append(Table(f"Time to first token per turn (mean of {config.users} users)",
                               ["turn", "prompt tokens", *MODES, "tokens from disk"], rows))
    decode = {m: result.decode(m) for m in MODES}
    report.tables.append(Table("Decode speed (tokens/s after the first token, mean of every request)",
                               ["server", "decode tok/s"], [[m, num(decode[m], 1)] for m in MODES]))
    speedup = result.ttft("memory + empty disk", r) / result.ttft("memory + disk", r)
    vs_memory = result.ttft("memory only", r) / result.ttft("memory + disk", r)
    report.notes.append(f"First turn after the kill -9: memory + disk {ms(result.ttft('memory + disk', r))} vs "
                        f"an emptied directory {ms(result.ttft('memory + empty disk', r))} ({speedup:.1f}x) and "
                        f"memory only {ms(result.ttft('memory only', r))} ({vs_memory:.1f}x).")
    report.notes.append("Block files are read back from the page cache (the restart is seconds after the "
                        "writes), not from a cold disk.")
    footer = report.machine.describe()
    series = {m: [result.ttft(m, t) * 1000 for t in turns] for m in MODES}
    plots.bars(report.plot_path("ttft_per_turn.png", "TTFT per turn; the server is killed before turn "
                                f"{r + 1}"), [f"turn {t + 1}" + (" (restart)" if t == r else "") for t in turns],
               series, "time to first token (ms)", "bench sessions: TTFT per turn", footer, "{:,.0f}", log=True)
    report.results = {"turns": [asdict(x) for x in result.turns]}
    report.summary = {"restart_turn": r + 1, "ttft_after_restart_s": {m: result.ttft(m, r) for m in MODES},
                      "speedup_vs_empty_dir": speedup, "speedup_vs_memory_only": vs_memory,
                      "decode_tokens_per_s": decode,
                      "history_tokens": statistics.mean(x.prompt_tokens for x in result.turns if x.turn == 0)}
    return report

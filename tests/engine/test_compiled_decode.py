"""Compiled decode steps (engine/compiled.py) give the tokens eager steps give: batch-1 decode, a batch of
several sequences, and the batch shrinking as requests finish (the number of sequences is a symbolic size)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import torch
from kvtest import tiny_pair

from kvengine.cli.report import run_summary
from kvengine.engine.compiled import CompiledDecode
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 2], [7, 3], [4, 4, 8, 15, 16, 23, 42]]
MAX_TOKENS = [12, 7, 3]  # three sequences decode together, then two, then one


def _tokens(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]
    engine = llm.engine
    ids = [engine.add_request(None, p, prompt_token_ids=t) for p, t in zip(params, PROMPTS, strict=True)]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.delta_token_ids
    return [out[i] for i in ids]


def test_compiled_decode_steps_equal_eager_steps(monkeypatch):
    model, _ = tiny_pair("llama")
    eager = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20)
    compiled = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20, compile=True)
    calls: list[int] = []
    real_call = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__",
                        lambda self, b, p: calls.append(b.num_seqs) or real_call(self, b, p))
    with torch.inference_mode():
        want, got = _tokens(eager), _tokens(compiled)
    assert got == want
    assert [len(t) for t in got] == MAX_TOKENS
    # every decode step went through the compiled function: 2 steps of three sequences, 4 of two, 5 of one
    assert calls == [3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert set(compiled.engine.runner.compiled.first_call_s) == {"batch-1", "batched"}


def test_run_summary_says_compile_time_once():
    """The first compiled step's seconds land in one run's decode rate; the summary of that run says so."""
    model, _ = tiny_pair("llama")
    llm = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20, compile=True)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    summaries = []
    for _ in range(2):
        out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=params)[0]
        buf = io.StringIO()
        run_summary(llm, out, buf)
        summaries.append(buf.getvalue())
    assert re.search(r"torch.compile: first compiled decode steps took batch-1 \d+\.\d s", summaries[0])
    assert "torch.compile" not in summaries[1]


def test_one_graph_for_consecutive_and_scattered_blocks(monkeypatch):
    """A request whose blocks are consecutive and a later one whose blocks are not (after a prefix-cache hit)
    decode through the same compiled graph, with eager's tokens: the runner gives compiled steps slot lists,
    never a start slot (Dynamo guards the index's type)."""
    model, _ = tiny_pair("llama")
    eager = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20)
    compiled = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20, compile=True)
    kinds: list[str] = []  # the sequence's blocks at each compiled step: consecutive or scattered
    real_call = CompiledDecode.__call__

    def call(self, b, p):
        table = b.kv[0].block_tables[0]
        kinds.append("consecutive" if table == list(range(table[0], table[0] + len(table))) else "scattered")
        assert isinstance(b.kv[0].kv_index[0], torch.Tensor)  # the runner gives compiled steps slot lists
        return real_call(self, b, p)

    monkeypatch.setattr(CompiledDecode, "__call__", call)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first, second = [1, 5, 9, 2, 7, 3], [1, 5, 9, 2, 8, 8, 8]  # the second reuses the first's first block
    want = [eager.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in (first, second)]
    got = [compiled.generate(prompt_token_ids=[first], sampling_params=params)[0].token_ids]
    n_first = len(kinds)
    with torch.compiler.set_stance("fail_on_recompile"):
        got.append(compiled.generate(prompt_token_ids=[second], sampling_params=params)[0].token_ids)
    assert got == want
    assert set(kinds[:n_first]) == {"consecutive"} and set(kinds[n_first:]) == {"scattered"}  # both were met


def test_inductor_cache_has_a_folder_per_cpu_capability(tmp_path):
    """Code Inductor compiled under ATEN_CPU_CAPABILITY=avx2 aborted a later run at an AVX-512 host's own
    capability that found it in the same cache; each capability gets its own folder (under $KVENGINE_HOME/inductor
    unless TORCHINDUCTOR_CACHE_DIR names another base)."""
    code = "from kvengine.engine.compiled import inductor_cache_dir; print(inductor_cache_dir())"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # this process's capability
    env["KVENGINE_HOME"] = str(tmp_path)

    def folder(**extra: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120, check=True)
        return run.stdout.strip()

    own = torch.backends.cpu.get_cpu_capability().lower()
    assert folder() == str(tmp_path / "inductor" / f"cpu-{own}")
    assert folder(ATEN_CPU_CAPABILITY="default") == str(tmp_path / "inductor" / "cpu-default")
    assert folder(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine" / f"cpu-{own}")

"""`kvengine bench peers` on a tiny random model: kvengine and transformers (same weights, fp32) produce the
same greedy tokens, ratios are the quotients of the measured rates, and a peer that cannot run is one note."""

from __future__ import annotations

import sys

import pytest

from kvengine.bench.peers import common_words, load_llama_cpp


def test_bench_peers_against_transformers(bench_folder, run_bench, check_common):
    _, last, data, out = run_bench("peers", "-m", str(bench_folder), "-n", "3,6", "--no-cache-max-tokens", "3",
                                   "--warmup", "1", "--concurrency", "0", "--prefill-tokens", "0")
    check_common(data, last, out, "peers")
    assert "peers.png" in data["files"]
    runs = data["results"]["runs"]
    keys = {(r["system"], r["setting"], r["new_tokens"]) for r in runs}
    assert keys == {("kvengine", "KV cache", 3), ("kvengine", "KV cache", 6), ("kvengine", "no cache", 3),
                    ("transformers", "KV cache", 3), ("transformers", "KV cache", 6), ("transformers", "no cache", 3)}
    ours = {(r["setting"], r["new_tokens"]): r for r in runs if r["system"] == "kvengine"}
    for r in runs:
        ref = ours[(r["setting"], r["new_tokens"])]
        assert r["token_ids"] == ref["token_ids"], "same weights, same prompt ids, greedy: same tokens"
        assert r["same_start"] is True and r["weights"] == "float32"
        assert r["peer_over_kvengine"] == pytest.approx(r["decode_tokens_per_s"] / ref["decode_tokens_per_s"])
        assert r["kvengine_over_peer"] == pytest.approx(1 / r["peer_over_kvengine"])
    assert [r for r in runs if r["system"] == "transformers"][0]["version"] == __import__("transformers").__version__
    # llama.cpp cannot run a Hugging Face folder (or is not installed): one note, no crash
    assert len(last["skipped"]) == 1 and last["skipped"][0].startswith("llama.cpp: skipped (")
    assert last["skipped"][0] in (out / "report.md").read_text()


def test_llama_cpp_missing_is_a_note(bench_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    peer, note = load_llama_cpp(bench_folder, 2, 128)
    assert peer is None
    assert note == "llama.cpp: skipped (llama-cpp-python not installed; pip install 'kvengine[peers]')"


def test_bench_peers_rejects_unknown_peer_and_dtype(bench_folder, run_bench):
    from kvengine.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown peer 'vllm'"):
        run_bench("peers", "-m", str(bench_folder), "--peers", "transformers,vllm")
    with pytest.raises(ConfigError, match="--dtypes takes explicit dtypes"):
        run_bench("peers", "-m", str(bench_folder), "--dtypes", "auto")
    with pytest.raises(ConfigError, match="^--llama-cpp-python: no Python interpreter at '/nonexistent/python'$"):
        run_bench("peers", "-m", str(bench_folder), "--llama-cpp-python", "/nonexistent/python")


def test_common_words():
    assert common_words("Paris is a city that", "Paris is a town") == 3
    assert common_words("", "Paris") == 0 and common_words("a b", "a b") == 2


@pytest.mark.real_model
def test_bench_peers_llama_cpp_on_the_default_model(default_gguf, run_bench):
    pytest.importorskip("llama_cpp")
    _, last, data, _ = run_bench("peers", "-m", str(default_gguf), "-n", "12", "--peers", "llama.cpp",
                                 "--no-cache-max-tokens", "1", "--warmup", "0", "--concurrency", "0",
                                 "--prefill-tokens", "0")
    assert last["skipped"] == []
    runs = {r["system"]: r for r in data["results"]["runs"]}
    assert set(runs) == {"kvengine", "llama.cpp"} and runs["llama.cpp"]["weights"] == "Q4_1"
    # BASELINES.md: both answer "Paris is a city that has captivated me since ..."
    assert runs["kvengine"]["text"].startswith("Paris is a city that")
    assert runs["llama.cpp"]["text"].startswith("Paris is a city that") and runs["llama.cpp"]["same_start"] is True
    assert runs["llama.cpp"]["new_tokens"] == 12 and runs["llama.cpp"]["version"] == __import__("llama_cpp").__version__

"""The llama.cpp peer runs in its own process. These tests put a stand-in worker script in its place (bench
bookkeeping only: no llama.cpp is needed) that answers the same pipe protocol and crashes on demand, and check
that a crash is one report line, drops the peer's partial measurements, and reruns it without its extra weight
buffers."""

from __future__ import annotations

import textwrap

import pytest

from kvengine.bench import peer_systems, peers
from kvengine.bench.cache import TimedRun
from kvengine.bench.peer_systems import LlamaCppPeer, PeerCrashed

FAKE_WORKER = textwrap.dedent('''
    import json, os, signal, sys
    extra = True
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "load" and req["path"].endswith("broken.gguf"):
            reply = {"error": "llama_model_load: invalid magic"}
        elif req["op"] == "load":
            extra = req["extra_bufts"]
            reply = {"version": "0.0-fake", "system_info": "CPU : FAKE = 1 |"}
        elif extra and len(req["ids"]) > 1:  # crashes on a real prompt while its extra buffers are on
            print("ggml_backend_amx_mul_mat: about to crash", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        else:
            n = req["n"]
            reply = {"tokens": [7] * n, "times": [0.01 * (i + 1) for i in range(n)], "text": "x" * n}
        print(json.dumps(reply), flush=True)
''')


@pytest.fixture()
def fake_worker(tmp_path, monkeypatch):
    path = tmp_path / "worker.py"
    path.write_text(FAKE_WORKER)
    monkeypatch.setattr(peer_systems, "WORKER", path)
    monkeypatch.setattr(peer_systems, "llama_cpp_installed", lambda: True)
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_a_crash_in_the_peer_process_is_one_line(fake_worker):
    peer = LlamaCppPeer(fake_worker, threads=1, n_ctx=64)
    try:
        assert (peer.version, peer.system_info, peer.weights) == ("0.0-fake", "CPU : FAKE = 1 |", "Q4_1")
        assert peer.generate([1], 3).token_ids == [7, 7, 7]
        with pytest.raises(PeerCrashed, match=r"^llama\.cpp's process ended \(SIGSEGV\): "
                                              r"ggml_backend_amx_mul_mat: about to crash$"):
            peer.generate([1, 2, 3], 3)
    finally:
        peer.close()
    assert peer.proc.poll() is not None


def test_a_load_error_leaves_no_worker_process(fake_worker, monkeypatch):
    made: list[LlamaCppPeer] = []
    real_call = LlamaCppPeer._call

    def remember(self, **request):
        made.append(self)
        return real_call(self, **request)

    monkeypatch.setattr(LlamaCppPeer, "_call", remember)
    broken = fake_worker.with_name("broken.gguf")
    broken.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match=r"^llama_model_load: invalid magic$"):
        LlamaCppPeer(broken, threads=1, n_ctx=64)
    assert made[0].proc.poll() is not None and made[0].stderr.closed


def test_bench_drops_the_crashed_runs_and_reruns_without_extra_buffers(fake_worker, monkeypatch):
    monkeypatch.setattr(peers, "gguf_read_bytes", lambda path: 1000)  # the stand-in file is no real GGUF
    plan = peers.PeersPlan(lengths=[4], variants=[], dtypes=[], peers=("llama.cpp",), warmup_tokens=0,
                           concurrency=0, prefill_tokens=0, threads=1)
    bench = peers.PeersBench(plan, {4: []}, prompt_ids=[1, 2, 3])
    kept = peers.PeerRun("kvengine", "KV cache", "int4", TimedRun("kvengine", True, 3, [5], [0.1], "y"), "0.1")
    stale = peers.PeerRun("llama.cpp", "KV cache", "Q4_1", TimedRun("llama.cpp", True, 3, [5], [0.1], "y"), "0")
    bench.runs[4] += [kept, stale]  # a measurement from before the crash must not survive it
    peers._run_llama_cpp(bench, fake_worker, None)
    llama = [r for r in bench.runs[4] if r.system == "llama.cpp"]
    assert bench.runs[4][0] is kept and len(llama) == 1 and llama[0].run.token_ids == [7, 7, 7, 7]
    assert bench.skipped == [] and bench.read_bytes == {("llama.cpp", "Q4_1"): 1000}
    crash, ran = bench.peer_notes
    assert crash == ("llama.cpp's process ended (SIGSEGV): ggml_backend_amx_mul_mat: about to crash "
                     "(with its extra weight buffers)")
    assert ran.startswith("llama.cpp 0.0-fake ran in its own process (no PyTorch in it), without its extra weight "
                          "buffers; its build: CPU : FAKE = 1 |")


def test_weight_bytes_one_decode_token_reads(bench_folder, tmp_path, default_gguf):
    """fp32: 4 bytes per weight of every linear layer and the LM head; int8 about a quarter of that; a tied
    GGUF counts its embedding table once, as the LM head."""
    from kvengine.llm import LLM

    fp32 = LLM(str(bench_folder), weights="fp32", kv_cache_memory=16 << 20)
    c = fp32.engine.model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    assert peers.decode_read_bytes(fp32.engine.model) == 4 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)
    int8 = LLM(str(bench_folder), weights="int8", kv_cache_memory=16 << 20)
    assert 0.25 < peers.decode_read_bytes(int8.engine.model) / peers.decode_read_bytes(fp32.engine.model) < 0.3
    from kvengine.weights.gguf import GGUFFile

    sizes = GGUFFile(default_gguf).tensor_bytes()
    assert "output.weight" not in sizes and peers.gguf_read_bytes(default_gguf) == sum(sizes.values())

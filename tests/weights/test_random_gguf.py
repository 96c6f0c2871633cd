"""Random-weight GGUF files (`--model random:SHAPE:QUANT[:SEED]`): written once, seeded, loadable by kvengine
(and by llama.cpp where it is installed), with the default model's tokenizer; bad specs are one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from kvengine.errors import ConfigError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams
from kvengine.weights import catalog
from kvengine.weights.gguf import GGUFFile
from kvengine.weights.random_gguf import SHAPES, write_random_gguf

pytestmark = pytest.mark.real_model


@pytest.fixture()
def home(tmp_path, monkeypatch, default_gguf):
    """A $KVENGINE_HOME holding only the default model (linked, with its checksum stamp)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / default_gguf.name).symlink_to(default_gguf)
    stamp = default_gguf.with_suffix(default_gguf.suffix + ".sha256")
    (models / stamp.name).write_text(stamp.read_text())
    monkeypatch.setenv("KVENGINE_HOME", str(tmp_path))
    return tmp_path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_gguf_is_written_once_and_runs(home, default_gguf):
    path = catalog.resolve_model("random:llama-tiny:Q8_0")
    assert path == home / "random" / "llama-tiny-seed0.Q8_0.gguf"
    stat = path.stat()
    assert catalog.resolve_model("random:llama-tiny:q8_0") == path and path.stat().st_mtime_ns == stat.st_mtime_ns
    f = GGUFFile(path)
    shape, vocab = SHAPES["llama-tiny"], len(f.metadata["tokenizer.ggml.tokens"])
    assert f.metadata["llama.block_count"] == shape.layers and f.metadata["llama.embedding_length"] == shape.hidden
    assert f.metadata["tokenizer.ggml.tokens"] == GGUFFile(default_gguf).metadata["tokenizer.ggml.tokens"]
    assert {t.qtype for t in f.tensors() if len(t.shape) == 2} == {"Q8_0"}
    assert sum(t.raw.size for t in f.tensors() if len(t.shape) == 1) == (2 * shape.layers + 1) * shape.hidden
    assert sum(int(__import__("numpy").prod(t.shape)) for t in f.tensors()) == shape.parameters(vocab)
    llm = LLM(str(path), weights="fp32", kv_cache_memory=64 << 20)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_random_gguf_is_seeded(tmp_path, default_gguf):
    a = write_random_gguf(tmp_path / "a.gguf", "llama-tiny", "Q4_0", 1, default_gguf)
    b = write_random_gguf(tmp_path / "b.gguf", "llama-tiny", "Q4_0", 1, default_gguf)
    c = write_random_gguf(tmp_path / "c.gguf", "llama-tiny", "Q4_0", 2, default_gguf)
    assert _sha(a) == _sha(b) != _sha(c)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(("spec", "message"), [
    ("random:llama-tiny", "'random:llama-tiny': write random:SHAPE:QUANT[:SEED], e.g. random:llama-1b:Q4_0 "
                          "(shapes: llama-tiny, llama-1b, smollm2-135m; quantizations: F16, Q4_0, Q4_1, Q8_0)"),
    ("random:llama-tiny:Q8_0:x", "write random:SHAPE:QUANT[:SEED]"),
    ("random:llama-9b:Q8_0", "unknown shape 'llama-9b' (choose from llama-tiny, llama-1b, smollm2-135m)"),
    ("random:llama-tiny:Q2_K", "unknown quantization 'Q2_K' (choose from F16, Q4_0, Q4_1, Q8_0)"),
])
def test_bad_random_spec_is_one_line(home, spec, message):
    with pytest.raises(ConfigError) as e:
        catalog.resolve_model(spec)
    assert message in e.value.message and "\n" not in e.value.message
    assert not (home / "random").exists() or not list((home / "random").iterdir())


def test_llama_cpp_loads_the_same_file(home):
    pytest.importorskip("llama_cpp")
    path = catalog.resolve_model("random:llama-tiny:Q4_0")
    code = ("import sys, llama_cpp; l = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); "
            "print(len(list(zip(range(4), l.generate(l.tokenize(b'Hello'), temp=0.0)))))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "4", out.stderr[-500:]

"""GPT-2 from disk: a Hugging Face folder (tokenizer.json, or GPT-2's vocab.json + merges.txt), a `gpt2` GGUF
written by the gguf package from the same weights, and the one-line errors for a broken folder; the accounting
commands on a GPT-2 config.json and GGUF metadata; random-weight presets.

Logits of every loaded model equal transformers' GPT2LMHeadModel within fp32 noise (1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch
from gpt2test import VOCAB, make_gpt2_folder, tiny_gpt2_hf, write_gpt2_gguf
from kvtest import run_main
from safetensors.torch import load_file, save_file

from kvengine.llm import LLM
from kvengine.sampling import SamplingParams
from kvengine.weights.loader import load_model
from kvengine.weights.source import open_model_source

TOL = 1e-4
IDS = [5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 88, 50]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """Every position's logits, no cache, through the engine's runner."""
    from kvtest import make_runner

    from kvengine.engine.sequence import Sequence

    runner, _ = make_runner(model)
    batch = runner.build_no_cache([Sequence(0, ids, SamplingParams())])
    batch.logits_indices = torch.arange(len(ids))
    return runner.run(batch)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_gpt2_hf(seed=3)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, hf_model):
    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", hf_model)


@pytest.fixture(scope="module")
def reference(hf_model):
    with torch.no_grad():
        return hf_model(torch.tensor([IDS])).logits[0]


def test_hf_folder_loads_and_matches(gpt2_folder, reference):
    source = open_model_source(str(gpt2_folder))
    assert source.model_config().architecture == "gpt2"
    assert (logits_of(load_model(source, torch.float32), IDS) - reference).abs().max() <= TOL
    llm = LLM(str(gpt2_folder), weights="fp32", kv_cache_memory=1 << 20)
    out = llm.generate(["The"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), verify=True)[0]
    assert len(out.token_ids) == 5 and out.verify.passed


def test_gpt2model_checkpoint_with_mask_buffers_loads(tmp_path, gpt2_folder, reference):
    """The original `gpt2` upload is GPT2Model: no `transformer.` prefix, no lm_head, and the causal-mask
    buffers `h.N.attn.bias` stored as tensors; vocab.json + merges.txt instead of tokenizer.json."""
    folder = tmp_path / "gpt2-original"
    folder.mkdir()
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(gpt2_folder / "model.safetensors").items()
               if not k.startswith("lm_head")}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text((gpt2_folder / "config.json").read_text())
    model = json.loads((gpt2_folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert merges  # the tiny vocabulary has merges, so the test reads some
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    assert (logits_of(load_model(open_model_source(str(folder)), torch.float32), IDS) - reference).abs().max() <= TOL
    tok = open_model_source(str(folder)).tokenizer()
    ref_tok = open_model_source(str(gpt2_folder)).tokenizer()
    text = "Please tell me about Paris."
    assert tok.encode(text) == ref_tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_gguf_from_the_same_weights_loads_and_matches(tmp_path, hf_model, gpt2_folder, reference):
    path = write_gpt2_gguf(tmp_path / "tiny-gpt2.gguf", hf_model, gpt2_folder)
    source = open_model_source(str(path))
    config = source.model_config()
    assert (config.architecture, config.num_layers, config.hidden_size, config.vocab_size) == ("gpt2", 2, 64, VOCAB)
    assert (logits_of(load_model(source, torch.float32), IDS) - reference).abs().max() <= TOL
    text = "Please tell me about Paris."
    assert source.tokenizer().encode(text) == open_model_source(str(gpt2_folder)).tokenizer().encode(text)


def broken_folder(tmp_path, gpt2_folder, case: str):
    folder = tmp_path / case
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text((gpt2_folder / f).read_text())
    tensors = load_file(gpt2_folder / "model.safetensors")
    if case == "missing":
        del tensors["transformer.h.1.mlp.c_fc.weight"]
    elif case == "shape":
        tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 100)
    elif case == "activation":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "activation_function": "swish"}))
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "lacks tensors: h.1.mlp.c_fc.weight"),
    ("shape", "tensor 'h.0.attn.c_attn.weight' has shape (64, 100), expected (64, 192)"),
    ("activation", "unsupported activation_function 'swish' in the GPT-2 config"),
])
def test_broken_folder_is_one_error_line(case, message, tmp_path, gpt2_folder, monkeypatch, capsys):
    folder = broken_folder(tmp_path, gpt2_folder, case)
    code, out, err = run_main(monkeypatch, capsys, "generate", "hi", "--model", str(folder), "-n", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def seed000_config_json(tmp_path):
    """Seed 000's model as a GPT-2 config.json: 20 layers, width 1,280, 10 heads, vocab 65,536."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 20, "n_embd": 1280, "n_head": 10,
                                "vocab_size": 65536, "n_positions": 2048, "activation_function": "gelu_new"}))
    return path


def test_flops_config_reproduces_seed000(tmp_path, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "flops", "--config", str(seed000_config_json(tmp_path)),
                            "-p", "5", "-n", "20", "--json")
    totals = json.loads(out.strip().splitlines()[-1])["totals"]
    assert code == 0
    assert totals["without_cache"] == pytest.approx(277e9, rel=0.01)
    assert totals["with_cache"] == pytest.approx(23e9, rel=0.01)
    _, preset_out, _ = run_main(monkeypatch, capsys, "flops", "--preset", "seed000", "-p", "5", "-n", "20", "--json")
    assert json.loads(preset_out.strip().splitlines()[-1])["totals"] == totals


def test_memory_reads_gpt2_config_and_gguf_metadata(tmp_path, hf_model, gpt2_folder, monkeypatch, capsys):
    path = write_gpt2_gguf(tmp_path / "tiny.gguf", hf_model, gpt2_folder)
    results = []
    for args in (["--config", str(gpt2_folder / "config.json")], ["--model", str(path)]):
        code, out, err = run_main(monkeypatch, capsys, "memory", *args, "-c", "64", "--json")
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:  # 2 (K, V) x 2 layers x 4 heads x 16 dims x 2 bytes (bf16); transformers' own count
        assert r["bytes_per_token"] == 2 * 2 * 4 * 16 * 2
        assert r["parameters"] == hf_model.num_parameters()


def test_random_weight_preset_runs_and_says_so(monkeypatch, capsys):
    """`--model preset:gpt2`: the 124M architecture, seeded random weights (two loads are identical), an offline
    byte-level tokenizer of exactly the model's vocabulary, and a run summary that says the weights are random."""
    llm = LLM("preset:gpt2", weights="fp32", kv_cache_memory=1 << 24)
    assert llm.model_config.num_layers == 12 and llm.tokenizer.vocab_size == 50257
    assert llm.tokenizer.eos_token_ids == (50256,)
    assert "RANDOM weights" in llm.engine.weights_desc
    ids = llm.tokenizer.encode("Hello, I'm a language model")
    assert llm.tokenizer.decode(ids) == "Hello, I'm a language model"
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first = llm.generate(prompt_token_ids=[ids], sampling_params=params, verify=True)[0]
    assert first.verify.passed
    assert torch.equal(load_model(open_model_source("preset:gpt2"), torch.float32).h[5].mlp.c_fc.weight,
                       llm.engine.model.h[5].mlp.c_fc.weight)


@pytest.mark.parametrize(("model", "message"), [
    ("preset:smollm2-135m", "error: preset 'smollm2-135m' (llama) is countable, not runnable"),
    ("preset:gpt5", "error: unknown preset 'gpt5' (known presets: gpt2, "),
])
def test_unrunnable_or_unknown_preset_is_one_error_line(model, message, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "generate", "hi", "--model", model, "-n", "2")
    assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err

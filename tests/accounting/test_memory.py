"""Memory accounting: KV bytes (GQA vs MHA, windows, KV dtypes) through KVCacheSpec, weights, budgets."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvengine.accounting.memory import (
    kv_cache_spec_for,
    memory_report,
    parameter_count,
    parse_bytes,
    weights_bytes,
)
from kvengine.accounting.presets import PRESETS, get_preset, preset_names
from kvengine.cache.spec import KVCacheSpec
from kvengine.config import ModelConfig, gpt2_config
from kvengine.errors import ConfigError
from kvengine.models.registry import config_from_hf

LLAMA3_70B = get_preset("llama3-70b")
SMOLLM2 = get_preset("smollm2-135m")


def test_seed002_llama3_70b_figure_is_the_multi_head_one():
    mha = memory_report(LLAMA3_70B, 4000, kv_dtype="bf16", assume_mha=True)
    assert mha.kv_heads == 64
    assert mha.bytes_per_token == 2.5 * 2**20  # "~2.5 MB per token"
    assert mha.bytes_per_sequence == pytest.approx(10.5e9, rel=0.01)  # "10.5 GB for 4k tokens"
    gqa = memory_report(LLAMA3_70B, 4000, kv_dtype="bf16")
    assert gqa.kv_heads == 8
    assert gqa.bytes_per_token == 320 * 1024  # 2 × 80 layers × 8 KV heads × 128 × 2 bytes
    assert mha.bytes_per_token == 8 * gqa.bytes_per_token


def test_smollm2_fp32_bytes_per_token():
    assert memory_report(SMOLLM2, 100, kv_dtype="fp32").bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46080


def test_quantized_kv_dtypes_come_from_kv_cache_spec():
    sizes = {}
    for name in ("float32", "bfloat16", "fp8", "int8", "int4"):
        spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=name, block_size=16)
        report = memory_report(SMOLLM2, 1000, kv_dtype=name, block_size=16)
        assert report.bytes_per_token == spec.bytes_per_token
        assert report.bytes_per_sequence == spec.bytes_for_sequence(1000)
        sizes[name] = report.bytes_per_token
    assert sizes["int8"] > 2 * 30 * 3 * 64  # int8 data plus its scales
    assert sizes["float32"] > sizes["bfloat16"] > sizes["int8"] > sizes["int4"]
    assert kv_cache_spec_for(SMOLLM2, "bf16").dtype == "bfloat16"


def test_sliding_window_layers_hold_at_most_their_window():
    gemma = get_preset("gemma3-270m")  # 15 of 18 layers slide over 512 tokens
    report = memory_report(gemma, 32768)
    assert report.bytes_per_sequence == (15 * 512 + 3 * 32768) * report.bytes_per_token_per_layer
    assert memory_report(gemma, 400).bytes_per_sequence == 400 * report.bytes_per_token


def test_batch_and_budget():
    report = memory_report(LLAMA3_70B, 4096, batch=8, budget_bytes="80GB", weights_bits=4.5)
    assert report.bytes_per_batch == 8 * report.bytes_per_sequence
    assert report.weights_bytes == weights_bytes(LLAMA3_70B, 4.5)
    assert report.kv_budget_bytes == 80 * 10**9 - report.weights_bytes
    assert report.tokens_fit == int(report.kv_budget_bytes // (320 * 1024))
    assert report.users_fit == int(report.kv_budget_bytes // (4096 * 320 * 1024)) == 30
    too_small = memory_report(LLAMA3_70B, 4096, budget_bytes="24GiB")  # 16-bit weights alone are 141 GB
    assert (too_small.kv_budget_bytes, too_small.tokens_fit, too_small.users_fit) == (0, 0, 0)


@pytest.mark.parametrize(("name", "params"), [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496),
    ("smollm2-135m", 134_515_008),
])
def test_preset_parameter_counts(name, params):
    assert parameter_count(get_preset(name)) == params
    assert weights_bytes(get_preset(name)) == 2 * params


def _hf_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


@pytest.mark.parametrize(("cls", "tied"), [("Llama", False), ("Llama", True), ("Qwen2", True)])
def test_parameter_count_matches_transformers(cls, tied):
    hf_config = getattr(transformers, f"{cls}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    model = getattr(transformers, f"{cls}ForCausalLM")(hf_config)
    assert parameter_count(config_from_hf(hf_config.to_dict())) == _hf_params(model)


def test_parameter_count_matches_transformers_gpt2_and_gemma3():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=128))
    ours = gpt2_config("model", layers=2, width=64, heads=4, vocab=96, context=128)
    assert parameter_count(ours) == _hf_params(gpt2)
    gemma_config = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=112,
                                                 num_hidden_layers=2, num_attention_heads=4, head_dim=32,
                                                 num_key_value_heads=1, max_position_embeddings=128)
    gemma = transformers.Gemma3ForCausalLM(gemma_config)
    assert parameter_count(config_from_hf(gemma_config.to_dict())) == _hf_params(gemma)


@pytest.mark.real_model
def test_smollm2_preset_matches_the_default_gguf(default_gguf):
    from kvengine.weights.source import open_model_source

    def numbers(c: ModelConfig) -> tuple:
        return (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                c.num_kv_heads, c.head_dim, c.tie_word_embeddings, c.gated_mlp, c.layer_windows)

    assert numbers(open_model_source(str(default_gguf), quiet=True).model_config()) == numbers(SMOLLM2)


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1e9") == 10**9
    assert parse_bytes(4096) == 4096


def test_presets_and_aliases():
    assert set(preset_names()) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-medium", "seed000",
                                   "smollm2-135m", "llama3-8b", "llama3-70b"}
    assert get_preset("GPT2-124M") is PRESETS["gpt2"]
    seed = get_preset("seed000")
    assert (seed.num_layers, seed.hidden_size, seed.num_heads, seed.head_dim, seed.vocab_size,
            seed.intermediate_size) == (20, 1280, 10, 128, 65536, 5120)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: get_preset("gpt5"), "unknown preset 'gpt5' (known presets: " + ", ".join(PRESETS) + ")"),
    (lambda: memory_report(SMOLLM2, 0), "context_len must be a positive integer, got 0"),
    (lambda: memory_report(SMOLLM2, 10, batch=-2), "batch must be a positive integer, got -2"),
    (lambda: memory_report(SMOLLM2, 10, kv_dtype="fp7"),
     "unknown KV cache dtype 'fp7' (choose from float32, bfloat16, float16, fp8, int8, int8-token, int4)"),
    (lambda: parse_bytes("8XB"), "cannot read '8XB' as a size (examples: 80GB, 24GiB, 512MiB, 1e9)"),
    (lambda: parse_bytes("0GB"), "a memory size must be positive, got '0GB'"),
    (lambda: weights_bytes(SMOLLM2, 0), "bits per weight must be positive, got 0"),
])
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value) == message

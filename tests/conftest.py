"""Shared fixtures: tiny random models built offline (ours and the transformers reference with the same
weights), and the default model's GGUF path (fetched by scripts/setup)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_gguf():
    from kvengine.weights.catalog import catalog_path

    path = catalog_path("smollm2-135m-instruct")
    if not path.is_file():
        pytest.skip("default model not fetched (run scripts/setup)")
    return path


@pytest.fixture(scope="session")
def gemma_gguf():
    from kvengine.weights.catalog import catalog_path

    path = catalog_path("gemma3-270m")
    if not path.is_file():
        pytest.skip("Gemma 3 270M GGUF not fetched (resolve_model('gemma3-270m') fetches it)")
    return path


@pytest.fixture(scope="session")
def default_llm(default_gguf):
    """The real default model, fp32, shared by the tests that only read from it."""
    from kvengine.llm import LLM

    return LLM(str(default_gguf), weights="fp32", kv_cache_memory=256 << 20, max_num_seqs=16)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    """transformers' own loading of the same GGUF (dequantized to fp32): the reference implementation."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()


def _cpu_tier_names() -> list[str]:
    from kvengine.layers import native

    return [t.name for t in native.cpu_tiers()]


@pytest.fixture(params=_cpu_tier_names())
def kernel_tier(request, monkeypatch):
    """Each kernel tier this CPU runs (layers/native.py: an AVX-512 BF16 host with AVX-VNNI runs avx512,
    avx512vnni, avxvnni, avx2 and portable), forced with KVENGINE_ISA for the test, built and loaded (a failed build
    fails the test rather than falling back)."""
    from kvengine.layers import native

    monkeypatch.setenv("KVENGINE_ISA", request.param)
    tier = native.tier(request.param)
    assert native.loaded(tier), native.reason()
    assert native.chosen() == tier
    return tier

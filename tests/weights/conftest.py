"""Tokenizer fixtures: our tokenizers for the real GGUFs and transformers' loading of the same files.

Each is built once per session (the Gemma 3 vocabulary has 262k entries and takes seconds to read).
The Gemma 3 GGUF is optional: tests that need it skip unless `resolve_model("gemma3-270m")` has fetched it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm_tokenizer(default_gguf):
    from kvengine.weights.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_gguf):
    from kvengine.weights.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gemma_gguf)


def _hf_from_gguf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(default_gguf):
    """transformers' tokenizer built from the SmolLM2 GGUF (its GGUF loader, unchanged)."""
    return _hf_from_gguf(default_gguf)


@pytest.fixture(scope="session")
def hf_gemma_tokenizer(gemma_gguf):
    return _hf_from_gguf(gemma_gguf)

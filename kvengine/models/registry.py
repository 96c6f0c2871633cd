"""Architecture name -> model class. Adding a family is one file in models/ plus one line here."""

from __future__ import annotations

import importlib

from kvengine.errors import ModelLoadError

# architecture -> "module:Class", imported on first use
MODELS: dict[str, str] = {
    "llama": "kvengine.models.llama:LlamaForCausalLM",
    "gemma3": "kvengine.models.gemma3:Gemma3ForCausalLM",
    "gpt2": "kvengine.models.gpt2:GPT2ForCausalLM",
}


def model_class(architecture: str) -> type:
    target = MODELS.get(architecture)
    if target is None:
        raise ModelLoadError(
            f"unsupported architecture '{architecture}' (supported: {', '.join(sorted(MODELS))})"
        )
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)

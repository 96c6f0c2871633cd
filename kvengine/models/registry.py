"""The model families: registry key -> the class that runs it, and the Hugging Face `model_type` and GGUF
`general.architecture` values it reads. Adding a family is one file in models/ plus one line in FAMILIES.

`config_from_hf` / `config_from_gguf` pick the family and let it parse its own config (CausalLM.config_from_hf,
CausalLM.config_from_gguf); `model_class` imports the class on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from kvengine.config import ModelConfig
from kvengine.errors import ModelLoadError
from kvengine.models.config_parse import GGUFMetadata
from kvengine.models.protocol import CausalLM


@dataclass(frozen=True, slots=True)
class Family:
    target: str  # "module:Class", imported on first use
    hf_model_types: tuple[str, ...]  # config.json `model_type` values
    gguf_architectures: tuple[str, ...]  # GGUF `general.architecture` values


FAMILIES: dict[str, Family] = {
    "llama": Family("kvengine.models.llama:LlamaForCausalLM", ("llama", "mistral", "qwen2"), ("llama", "qwen2")),
    "gemma3": Family("kvengine.models.gemma3:Gemma3ForCausalLM", ("gemma3_text", "gemma3"), ("gemma3",)),
    "gpt2": Family("kvengine.models.gpt2:GPT2ForCausalLM", ("gpt2",), ("gpt2",)),
}


def model_class(architecture: str) -> type[CausalLM]:
    family = FAMILIES.get(architecture)
    if family is None:
        raise ModelLoadError(
            f"unsupported architecture '{architecture}' (supported: {', '.join(sorted(FAMILIES))})"
        )
    module, _, cls = family.target.partition(":")
    return getattr(importlib.import_module(module), cls)


def config_from_hf(d: dict[str, Any], name: str = "model") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict, parsed by the family of its `model_type`."""
    model_type = d.get("model_type")
    by_type = {t: arch for arch, f in FAMILIES.items() for t in f.hf_model_types}
    if model_type not in by_type:
        raise ModelLoadError(
            f"unsupported architecture '{model_type}' (supported model_type values: {', '.join(sorted(by_type))})"
        )
    return model_class(by_type[model_type]).config_from_hf(d, name)


def config_from_gguf(meta: dict[str, Any], name: str = "model") -> ModelConfig:
    """A ModelConfig from GGUF key/value metadata (decoded to Python values), parsed by the family of its
    `general.architecture`."""
    gguf = GGUFMetadata(meta)
    by_arch = {a: arch for arch, f in FAMILIES.items() for a in f.gguf_architectures}
    if gguf.arch not in by_arch:
        raise ModelLoadError(
            f"unsupported GGUF architecture '{meta.get('general.architecture')}' "
            f"(supported: {', '.join(sorted(by_arch))})"
        )
    return model_class(by_arch[gguf.arch]).config_from_gguf(gguf, name)

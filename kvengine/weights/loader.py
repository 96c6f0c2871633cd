"""Build a model from a ModelSource: pick the class from the registry, create it, fill every parameter.

GGUF tensors are dequantized to float and translated to Hugging Face names by the model class
(`gguf_to_hf`); safetensors folders already use those names. Any parameter left unfilled is an error.
A preset source gets the family's seeded random weights instead (weights/preset.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kvengine.config import ModelConfig
from kvengine.errors import ModelLoadError
from kvengine.models.protocol import CausalLM
from kvengine.models.registry import model_class
from kvengine.weights.source import ModelSource


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu",
               config: ModelConfig | None = None) -> CausalLM:
    config = config or source.model_config()
    cls = model_class(config.architecture)
    if source.preset is not None:
        from kvengine.weights.preset import random_model

        return random_model(config, cls, dtype).to(device)
    with torch.device(device):
        model = cls(config, dtype)
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in checkpoint_tensors(source, config, cls):
            filled.add(model.load_weight(name, tensor))
    missing = sorted(model.expected_weights() - filled)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint '{source.path}' lacks tensors: {', '.join(missing[:3])}{more}")
    return model.eval()


def checkpoint_tensors(source: ModelSource, config: ModelConfig,
                       cls: type[CausalLM]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF-style name, float tensor) pairs from a GGUF file or a safetensors folder."""
    if source.gguf is not None:
        for t in source.gguf.tensors():
            mapped = cls.gguf_to_hf(t.name, t.dequantize(), config)
            if mapped is not None:
                yield mapped
        return
    files = sorted(Path(source.path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model folder '{source.path}' has no *.safetensors files")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"could not read '{f}': {e}") from None

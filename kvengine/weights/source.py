"""ModelSource: where a model's config, weights and tokenizer come from (a GGUF file or a HF folder).

`open_model_source(model)` resolves a name or path (fetching catalog models once) and knows how to read
the ModelConfig without loading any weights, so the accounting commands stay fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvengine.config import ModelConfig
from kvengine.errors import ConfigError, ModelLoadError
from kvengine.models.registry import config_from_gguf, config_from_hf
from kvengine.weights.catalog import PRESET_PREFIX, preset_model, resolve_model
from kvengine.weights.gguf import GGUFFile, is_gguf
from kvengine.weights.tokenizer import Tokenizer


@dataclass(slots=True)
class ModelSource:
    path: Path
    kind: str  # "gguf", "hf" or "preset" (random weights, weights/preset.py)
    gguf: GGUFFile | None = None
    preset: ModelConfig | None = None

    @property
    def name(self) -> str:
        if self.preset is not None:
            return PRESET_PREFIX + self.preset.name
        return self.path.stem if self.kind == "gguf" else self.path.name

    def tokenizer(self) -> Tokenizer:
        if self.preset is not None:
            from kvengine.weights.preset import preset_tokenizer

            return preset_tokenizer(self.preset.vocab_size)
        return Tokenizer.from_gguf(self.gguf) if self.gguf is not None else Tokenizer.from_folder(self.path)

    @property
    def weights_note(self) -> str:
        """What the run summary must say about where the weights came from ("" for a checkpoint)."""
        if self.preset is None:
            return ""
        from kvengine.weights.preset import random_weights_note

        return random_weights_note(self.preset.name)

    def model_config(self) -> ModelConfig:
        if self.preset is not None:
            return self.preset
        if self.gguf is not None:
            config = config_from_gguf(self.gguf.metadata, name=self.name)
            names = set(self.gguf.tensor_names())
            return config.with_(
                tie_word_embeddings="output.weight" not in names,
                attention_bias=config.attention_bias or "blk.0.attn_q.bias" in names,
            )
        return load_hf_config(self.path / "config.json", name=self.name)


def load_hf_config(path: str | Path, name: str | None = None) -> ModelConfig:
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"config file '{p}' does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{p}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{p}' must hold a JSON object")
    return config_from_hf(data, name=name or p.parent.name)


def open_model_source(model: str | Path | None, quiet: bool = False) -> ModelSource:
    """Resolve `model` (None = the default model) to a GGUF file, a HF folder with config.json, or a preset."""
    preset = preset_model(model)
    if preset is not None:
        return ModelSource(path=Path(str(model)), kind="preset", preset=preset)
    path = resolve_model(model, quiet=quiet)
    if path.is_dir():
        return ModelSource(path=path, kind="hf")
    if is_gguf(path):
        return ModelSource(path=path, kind="gguf", gguf=GGUFFile(path))
    raise ModelLoadError(f"'{path}' is neither a GGUF file nor a folder with config.json")

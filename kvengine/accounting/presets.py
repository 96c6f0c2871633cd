"""Named model presets: architecture numbers of well-known models, no weights needed.

The accounting counts every preset. The GPT-style ones (GPT-2, GPT-3 medium, the seed-000 model) are also
runnable with seeded random weights (`--model preset:NAME`, weights/preset.py): they share the `gpt2`
architecture (models/gpt2.py: learned absolute positions, LayerNorm and a bias on every linear layer, which
their ModelConfig fields tell the accounting).
"""

from __future__ import annotations

from kvengine.config import ModelConfig, gpt2_config
from kvengine.errors import ConfigError


def _llama(name: str, layers: int, width: int, mlp: int, heads: int, kv_heads: int, vocab: int,
           context: int, rope_theta: float, tied: bool) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=width // heads,
        max_position_embeddings=context, rope_theta=rope_theta, tie_word_embeddings=tied, name=name,
    )


PRESETS: dict[str, ModelConfig] = {
    "gpt2": gpt2_config("gpt2", 12, 768, 12, eos=(50256,)),  # 124M
    "gpt2-medium": gpt2_config("gpt2-medium", 24, 1024, 16, eos=(50256,)),  # 355M
    "gpt2-large": gpt2_config("gpt2-large", 36, 1280, 20, eos=(50256,)),  # 774M
    "gpt2-xl": gpt2_config("gpt2-xl", 48, 1600, 25, eos=(50256,)),  # 1.5B
    # Seed 004: d_model 1024, 24 layers, vocab 50,257 (GPT-3 paper: 16 heads of 64, context 2048).
    "gpt3-medium": gpt2_config("gpt3-medium", 24, 1024, 16, context=2048, eos=(50256,)),
    # Seed 000: 20 layers, width 1,280, 10 heads of 128, vocab 65,536, MLP 4x, trained at 2,048 tokens.
    # Whether its LM head is tied is not stated; untied is assumed (it only changes the weight count).
    "seed000": gpt2_config("seed000", 20, 1280, 10, vocab=65536, context=2048).with_(tie_word_embeddings=False),
    "smollm2-135m": _llama("smollm2-135m", 30, 576, 1536, 9, 3, 49152, 8192, 100000.0, tied=True),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 14336, 32, 8, 128256, 8192, 500000.0, tied=False),
    "llama3-70b": _llama("llama3-70b", 80, 8192, 28672, 64, 8, 128256, 8192, 500000.0, tied=False),
    # Five of every six layers slide over 512 tokens; head dim 256 with 4 query heads and 1 KV head.
    "gemma3-270m": ModelConfig(
        architecture="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", norms_per_layer=4, qk_norm=True,
        layer_windows=tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18)),
        rope_local_theta=10000.0, query_pre_attn_scalar=256.0, name="gemma3-270m",
    ),
}
PRESET_ALIASES = {"gpt2-124m": "gpt2", "gpt2-small": "gpt2", "seed-000": "seed000", "smollm2": "smollm2-135m",
                  "gpt3-350m": "gpt3-medium", "gemma3": "gemma3-270m"}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset called `name` (aliases accepted), or a ConfigError listing the known ones."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known presets: {', '.join(PRESETS)})")
    return PRESETS[key]

"""kvengine: a Python LLM inference engine built around the KV cache."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):  # lazy: `import kvengine` stays cheap for the CLI's accounting commands
    if name == "LLM":
        from kvengine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvengine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)

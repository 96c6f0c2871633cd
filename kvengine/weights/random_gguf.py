"""Seeded random-weight GGUF files of a named Llama shape, for timing shapes no shipped checkpoint has.

The file is an ordinary llama-architecture GGUF (llama.cpp loads it as well as kvengine), so both engines read
the same bytes. Its tokenizer is copied from a real GGUF (the default model's), so prompts tokenize as usual; the
generated text is noise, the timings and FLOPs are real. Same shape, quantization and seed: the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvengine.errors import ConfigError
from kvengine.weights.gguf import GGUFFile

QUANTS = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # tensor type -> llama.cpp's general.file_type
INIT_STD = 0.02  # weights ~ N(0, 0.02), norms = 1: activations stay finite through every layer


@dataclass(frozen=True, slots=True)
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    context: int = 4096
    rope_base: float = 500000.0
    norm_eps: float = 1e-5

    def tensors(self, vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(GGUF tensor name, PyTorch-order shape), in file order; the LM head is tied to the embedding."""
        head_dim = self.hidden // self.heads
        yield "token_embd.weight", (vocab, self.hidden)
        for i in range(self.layers):
            p = f"blk.{i}."
            yield p + "attn_norm.weight", (self.hidden,)
            yield p + "attn_q.weight", (self.heads * head_dim, self.hidden)
            yield p + "attn_k.weight", (self.kv_heads * head_dim, self.hidden)
            yield p + "attn_v.weight", (self.kv_heads * head_dim, self.hidden)
            yield p + "attn_output.weight", (self.hidden, self.heads * head_dim)
            yield p + "ffn_norm.weight", (self.hidden,)
            yield p + "ffn_gate.weight", (self.ffn, self.hidden)
            yield p + "ffn_up.weight", (self.ffn, self.hidden)
            yield p + "ffn_down.weight", (self.hidden, self.ffn)
        yield "output_norm.weight", (self.hidden,)

    def parameters(self, vocab: int) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors(vocab))


# Llama 3.2 1B's layer shapes (with the tokenizer's vocabulary: ~1.07B parameters at SmolLM2's 49,152 tokens),
# SmolLM2-135M's, to check the writer against the shipped checkpoint's timings, and a tiny one for tests.
SHAPES = {
    "llama-tiny": LlamaShape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, context=512),
    "llama-1b": LlamaShape(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192),
    "smollm2-135m": LlamaShape(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, context=8192,
                               rope_base=100000.0),
}


def random_gguf_path(home: Path, shape: str, quant: str, seed: int) -> Path:
    return home / "random" / f"{shape}-seed{seed}.{quant}.gguf"


def write_random_gguf(out: Path, shape_name: str, quant: str, seed: int, tokenizer_from: Path) -> Path:
    """Write `out` (through a temporary name, so a file at `out` is always whole) and return it."""
    if shape_name not in SHAPES:
        raise ConfigError(f"unknown shape '{shape_name}' (choose from {', '.join(SHAPES)})")
    if quant not in QUANTS:
        raise ConfigError(f"unknown quantization '{quant}' (choose from {', '.join(QUANTS)})")
    import gguf

    shape, source = SHAPES[shape_name], GGUFFile(tokenizer_from)
    vocab = len(source.metadata["tokenizer.ggml.tokens"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _write_metadata(writer, shape, shape_name, quant, seed, vocab)
    _copy_tokenizer(writer, source.metadata)
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[quant]
    for name, dims in shape.tensors(vocab):
        if len(dims) == 1:
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))  # [hidden] norm weights stay F32
            continue
        w = rng.standard_normal(dims, dtype=np.float32) * INIT_STD  # [rows, cols]
        data = w.astype(np.float16) if quant == "F16" else gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _write_metadata(writer: Any, shape: LlamaShape, shape_name: str, quant: str, seed: int, vocab: int) -> None:
    writer.add_name(f"kvengine random {shape_name} (seed {seed}, {quant})")
    writer.add_description("Seeded random weights written by kvengine for timing: the text it generates is noise.")
    writer.add_file_type(QUANTS[quant])
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_vocab_size(vocab)


def _copy_tokenizer(writer: Any, metadata: dict[str, Any]) -> None:
    """Every tokenizer.* key of the source file."""
    for key, value in metadata.items():
        if key.startswith("tokenizer."):
            add_value(writer, key, value)


def add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata value in GGUF's types for it: lists as arrays, ints as uint32 (ids, counts), bools, floats
    as float32, the rest as strings."""
    if isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))

"""The tensors we load from the default GGUF equal transformers' loading of the same file, after we undo
llama.cpp's Q/K row permutation (exact equality: both dequantize the same blocks to fp32)."""

from __future__ import annotations

import torch

from kvengine.weights.gguf import GGUFFile
from kvengine.weights.loader import load_model
from kvengine.weights.source import open_model_source


def test_loaded_tensors_equal_transformers(default_gguf, hf_default_model):
    ours = load_model(open_model_source(str(default_gguf)), torch.float32)
    ref = hf_default_model.state_dict()
    c = ours.config
    checked = 0
    for i, layer in enumerate(ours.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split([c.q_size, c.kv_size, c.kv_size])
        gate, up = layer.mlp.gate_up_proj.weight.split(c.intermediate_size)
        pairs = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                 "self_attn.o_proj": layer.self_attn.o_proj.weight, "mlp.gate_proj": gate, "mlp.up_proj": up,
                 "mlp.down_proj": layer.mlp.down_proj.weight, "input_layernorm": layer.input_layernorm.weight,
                 "post_attention_layernorm": layer.post_attention_layernorm.weight}
        for name, tensor in pairs.items():
            assert torch.equal(tensor, ref[f"model.layers.{i}.{name}.weight"]), f"layer {i} {name}"
            checked += 1
    assert torch.equal(ours.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert torch.equal(ours.norm.weight, ref["model.norm.weight"])
    assert ours.lm_head.weight is ours.embed_tokens.weight  # SmolLM2 ties its embeddings
    assert checked == 9 * c.num_layers


def test_gguf_metadata_gives_the_architecture(default_gguf):
    config = open_model_source(str(default_gguf)).model_config()
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        30, 576, 9, 3, 64)
    assert config.vocab_size == 49152 and config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert {t.qtype for t in GGUFFile(default_gguf).tensors()} == {"Q4_1", "Q8_0", "F32"}

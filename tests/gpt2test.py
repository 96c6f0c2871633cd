"""Tiny random GPT-2 fixtures built offline with transformers: the model pair, an HF folder, a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvengine.models.registry import config_from_hf

VOCAB = 96
BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)


def tiny_gpt2_hf(seed: int = 0, **overrides):
    """transformers' GPT2LMHeadModel with random weights (random LayerNorms and biases too), fp32, eval."""
    import transformers

    config = transformers.GPT2Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random norms and biases, so a norm or bias bug shows
        for name, p in hf.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return hf


def tiny_gpt2_pair(seed: int = 0, **overrides):
    """(our GPT2ForCausalLM, transformers' GPT2LMHeadModel) with identical random weights."""
    from kvengine.models.gpt2 import GPT2ForCausalLM

    hf = tiny_gpt2_hf(seed, **overrides)
    ours = GPT2ForCausalLM(config_from_hf(hf.config.to_dict(), name="tiny-gpt2"))
    filled = {ours.load_weight(n, t) for n, t in hf.state_dict().items()}
    assert ours.expected_weights() <= filled
    return ours.eval(), hf


def byte_level_tokenizer_json(folder: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer.json trained offline on CPython's pydoc topics, `vocab_size` entries with
    <|endoftext|> at id 1 (the tiny config's eos); only the 50 commonest characters, so it has merges."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|endoftext|>"],
                                  initial_alphabet=[], limit_alphabet=50, show_progress=False)
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    tok.save(str(folder / "tokenizer.json"))


def make_gpt2_folder(folder: Path, hf=None) -> Path:
    """A Hugging Face GPT-2 folder: config.json, model.safetensors (GPT2LMHeadModel layout), tokenizer.json."""
    hf = hf if hf is not None else tiny_gpt2_hf()
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer_json(folder, hf.config.vocab_size)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def write_gpt2_gguf(path: Path, hf, tokenizer_folder: Path) -> Path:
    """A llama.cpp-style `gpt2` GGUF of `hf`'s weights, written with the gguf package: Conv1D weights
    transposed to [out, in] as llama.cpp's converter does, the causal-mask buffers left out, F32 tensors."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    vocab = json.loads((tokenizer_folder / "tokenizer.json").read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_eos_token_id(1)
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
    layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        name = name.removeprefix("transformer.")
        if name.startswith("lm_head") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        stem, _, kind = name.rpartition(".")
        if stem.startswith("h."):
            _, i, part = stem.split(".", 2)
            gname = f"blk.{i}.{layer[part]}.{kind}"
        else:
            gname = f"{names[stem]}.{kind}"
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        w.add_tensor(gname, t.contiguous().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Test helpers importable from any test module (tests/ is on sys.path through the root conftest)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from kvengine.cache.block_manager import BlockManager
from kvengine.cache.block_tables import KVBlockTables
from kvengine.cache.pool import KVPool
from kvengine.cache.spec import KVCacheSpec
from kvengine.engine.runner import ModelRunner
from kvengine.engine.scheduler import ScheduledSeq
from kvengine.engine.sequence import Sequence
from kvengine.layers import native
from kvengine.models.llama import WEIGHTS_PER_LAYER
from kvengine.models.registry import config_from_hf


def tiny_pair(kind: str = "llama", seed: int = 0, **overrides):
    """(our model, transformers model) with identical random weights, fp32, eval mode."""
    import transformers

    from kvengine.models.llama import LlamaForCausalLM

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    base.update(overrides)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    hf_config = cfg_cls(**base)
    torch.manual_seed(seed)
    hf = model_cls(hf_config).eval()
    with torch.no_grad():  # random norms too, so a norm bug shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = LlamaForCausalLM(config_from_hf(hf_config.to_dict(), name=f"tiny-{kind}"))
    for name, tensor in hf.state_dict().items():
        ours.load_weight(name, tensor)
    return ours.eval(), hf


GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
              "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}


def tiny_gemma_pair(seed: int = 0, **overrides):
    """(our model, transformers model) with identical random weights, fp32, eval mode."""
    import transformers

    from kvengine.models.gemma3 import Gemma3ForCausalLM

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2, rope_parameters=GEMMA_ROPE)
    base.update(overrides)
    hf_config = transformers.Gemma3TextConfig(**base)
    hf_config._attn_implementation = "eager"  # the plainest reference: explicit masks, explicit softmax
    torch.manual_seed(seed)
    hf = transformers.Gemma3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # Gemma norms start at w = 0; random ones make a norm bug show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    ours = Gemma3ForCausalLM(config_from_hf(hf_config.to_dict(), name="tiny-gemma3"))
    for name, tensor in hf.state_dict().items():
        ours.load_weight(name, tensor)
    assert ours.expected_weights() <= {ours.load_weight(n, t) for n, t in hf.state_dict().items()}
    return ours.eval(), hf


def make_tiny_hf_folder(folder, vocab_size: int = 320, chat_template: str | None = None, **overrides):
    """A complete Hugging Face model folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with a chat template: a plain one unless `chat_template` is given) for a tiny random
    Llama; byte-level BPE trained offline on CPython's pydoc topics. Returns the folder."""
    from pathlib import Path
    from pydoc_data.topics import topics

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|user|>", "<|bot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = chat_template or ("{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|bot|>' }}"
                                 "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(
        __import__("json").dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))
    base = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                eos_token_id=1, tie_word_embeddings=False)
    base.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_runner(model, num_blocks: int = 64, block_size: int = 4, kv_window: int | None = None, sink_tokens: int = 0):
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, "float32", block_size, c.layer_windows, kv_window,
                       sink_tokens)
    pool = KVPool.allocate(spec, num_blocks, "cpu")
    bm = KVBlockTables(BlockManager(num_blocks, block_size, enable_prefix_caching=False), spec.groups)
    return ModelRunner(model, pool, bm), bm


def cached_step(runner, bm, seqs: list[Sequence], chunk: int | None = None) -> torch.Tensor:
    """Compute each sequence's uncomputed tokens (at most `chunk`) through the pool; returns logits rows."""
    scheduled = []
    for s in seqs:
        if not bm.has_seq(s.seq_id):
            bm.allocate(s.seq_id, s.token_ids)
        n = s.num_uncomputed if chunk is None else min(chunk, s.num_uncomputed)
        assert bm.ensure_capacity(s.seq_id, s.num_computed_tokens + n, s.num_computed_tokens)
        scheduled.append(ScheduledSeq(s, n))
    batch = runner.build_cached(scheduled)
    batch.logits_indices = torch.arange(batch.num_tokens)  # every row, to compare all positions
    logits = runner.run(batch)
    for s in scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    return logits


HELD_OUT_TOKENS = 256


def q4_0_grid(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A weight [n, k] as a GGUF Q4_0 source dequantizes: per group of 32, (q - 8) * d with d float16 (either
    sign) and q = 0 at the group's value of largest magnitude; group 0 of row 0 all zeros."""
    q = torch.randint(1, 16, (n, k), generator=gen)
    q[:, 3::32] = 0
    d = ((torch.rand(n, k // 32, generator=gen) - 0.5) * 0.02).half().float()
    d[0, 0] = 0.0
    return ((q - 8).view(n, k // 32, 32) * d[..., None]).view(n, k)


def held_out_ids(tokenizer, n: int = HELD_OUT_TOKENS) -> list[int]:
    """The first `n` tokens of the perplexity eval's default text (CPython's pydoc topics)."""
    from kvengine.eval.kv import held_text, text_tokens

    return text_tokens(tokenizer, held_text()[1], n)


def assert_tracks_reference(got: torch.Tensor, ref: torch.Tensor, ids: list[int]) -> None:
    """Quantized logits `got` against the full-precision reference's `ref` ([n, vocab] each, row i predicting
    ids[i + 1]) on held-out text: perplexity within 2% of the reference's (issue 7's bar for quantized weights)
    and the same top token at >= 90% of positions."""
    target = torch.tensor(ids[1:len(got) + 1])
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy
    ratio = math.exp(nll(got[:len(target)], target).item() - nll(ref[:len(target)], target).item())
    assert abs(ratio - 1) < 0.02 and agree >= 0.9, (ratio, agree)


def fused_op_rows(monkeypatch, layers: int) -> list[int]:
    """A list that grows by the rows of every `kvengine::decode_layers` call (the fused op: one call a step, all
    the model's layers; models/llama.py looks the op up per call), each call checked to carry all `layers`."""
    calls: list[int] = []
    ops = native.ops(native.chosen().name)
    real_op = ops.decode_layers

    def counted(x, weights, cos, sin, k_caches, *rest):
        assert len(k_caches) == layers and len(weights) == WEIGHTS_PER_LAYER * layers
        calls.append(len(x))
        return real_op(x, weights, cos, sin, k_caches, *rest)

    monkeypatch.setattr(ops, "decode_layers", counted)
    return calls


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`kvengine ARGS` through the real main() in-process: (exit code, stdout, stderr)."""
    import sys

    import pytest

    from kvengine.cli import main

    monkeypatch.setattr(sys, "argv", ["kvengine", *args])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def poisoned_run(real_run, poison: list[int], fault: str):
    """A stand-in for ModelRunner.run that injects a fault (a mock) into the sequence of a step whose tokens start
    with `poison`: `fault` "forward" raises from the whole forward, "nan_logits" gives that sequence's sampled row
    NaN logits. Other sequences of the step are untouched."""
    def run(batch):
        ids, starts, rows = batch.input_ids.tolist(), batch.query_start_loc, batch.logits_indices.tolist()
        hits = [rows.index(end - 1) for start, end in zip(starts, starts[1:], strict=False)
                if ids[start:end][:len(poison)] == poison and end - 1 in rows]  # the poisoned sampled rows
        if hits and fault == "forward":
            raise RuntimeError("injected fault")
        logits = real_run(batch).clone()  # (inference tensors are read-only outside inference mode)
        for row in hits:
            logits[row] = float("nan")
        return logits
    return run


@contextmanager
def step_outputs(keep: Callable) -> Iterator[list[torch.Tensor]]:
    """While open, a copy of the logits of every ModelRunner.run step whose batch `keep(batch)` accepts, in
    order, in the yielded list (which the caller may clear between runs)."""
    steps: list[torch.Tensor] = []
    real_run = ModelRunner.run

    def run(self, batch):
        out = real_run(self, batch)
        if keep(batch):
            steps.append(out.clone())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelRunner, "run", run)
        yield steps

"""The analytic per-step counts against FlopCounterMode over transformers' reference models (tiny, random).

Measured and analytic agree within 2% (in fact exactly) when both count the same rectangle: a dense
kernel computes every query against every key of the step, so a prefill is compared with
attention="dense"; a decode step has one query, where causal and dense are the same.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kvengine.accounting.flops import step_flops
from kvengine.config import ModelConfig, gpt2_config
from kvengine.models.registry import config_from_hf

P = 12  # prompt length


def tiny_llama(impl: str) -> tuple[transformers.LlamaForCausalLM, ModelConfig]:
    hf_config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)
    hf_config._attn_implementation = impl
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    return model, config_from_hf(hf_config.to_dict(), name="tiny-llama")


def tiny_gpt2() -> tuple[transformers.GPT2LMHeadModel, ModelConfig]:
    hf_config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    config = gpt2_config("model", layers=2, width=64, heads=4, vocab=128, context=64)
    return model, config


def close(measured: int, analytic: int) -> bool:
    return abs(measured - analytic) <= 0.02 * measured


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_uncached_prefill_matches_flop_counter(impl, flop_meter):
    model, config = tiny_llama(impl)
    ids = torch.randint(0, 128, (1, P))
    measured = flop_meter(lambda: model(ids, use_cache=False))
    dense = step_flops(config, P, P, attention="dense")
    assert close(measured, dense.total), (measured, dense.total)
    # The default causal count leaves out exactly the masked half of the score rectangle.
    causal = step_flops(config, P, P)
    masked_pairs = config.num_layers * P * (P - 1) // 2
    assert dense.total - causal.total == 2 * config.num_heads * 2 * config.head_dim * masked_pairs


def test_prefill_with_lm_head_on_last_position_only(flop_meter):
    model, config = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, P))
    measured = flop_meter(lambda: model(ids, use_cache=False, logits_to_keep=1))
    assert close(measured, step_flops(config, P, P, lm_head_tokens=1, attention="dense").total)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_decode_step_matches_flop_counter(impl, flop_meter_by_op):
    model, config = tiny_llama(impl)
    ids = torch.randint(0, 128, (1, P + 1))
    with torch.no_grad():
        cache = model(ids[:, :P], use_cache=True).past_key_values  # a DynamicCache holding P positions
    assert cache.get_seq_length() == P
    by_op = flop_meter_by_op(lambda: model(ids[:, P:], past_key_values=cache, use_cache=True))
    analytic = step_flops(config, 1, P + 1)
    assert close(sum(by_op.values()), analytic.total), (by_op, analytic.total)
    attention = analytic.qk + analytic.av
    if impl == "eager":  # eager attention is two bmm's per layer; everything else is mm
        assert by_op["aten.bmm"] == attention


def test_gpt2_plain_mlp_matches_flop_counter(flop_meter):
    model, config = tiny_gpt2()
    ids = torch.randint(0, 128, (1, P))
    measured = flop_meter(lambda: model(ids, use_cache=False))
    analytic = step_flops(config, P, P, attention="dense")
    assert analytic.mlp_gate == 0
    assert close(measured, analytic.total), (measured, analytic.total)


def test_cached_decode_is_much_cheaper_than_uncached_recompute(flop_meter):
    model, config = tiny_llama("eager")
    ids = torch.randint(0, 128, (1, P + 1))
    with torch.no_grad():
        cache = model(ids[:, :P], use_cache=True).past_key_values
    cached = flop_meter(lambda: model(ids[:, P:], past_key_values=cache, use_cache=True))
    uncached = flop_meter(lambda: model(ids, use_cache=False, logits_to_keep=1))
    assert close(cached, step_flops(config, 1, P + 1).total)
    assert close(uncached, step_flops(config, P + 1, P + 1, lm_head_tokens=1, attention="dense").total)
    assert uncached > 8 * cached


def test_kvengine_model_uncached_forward_matches_flop_counter(flop_meter):
    """kvengine's own Llama over a whole sequence (the no-cache baseline), LM head on the last position."""
    from kvengine.batch import StepBatch
    from kvengine.models.llama import LlamaForCausalLM

    _, config = tiny_llama("sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batch = StepBatch(input_ids=torch.randint(0, 128, (P,)), positions=torch.arange(P),  # [P] each
                      query_start_loc=[0, P], context_lens=[P], logits_indices=torch.tensor([P - 1]))
    measured = flop_meter(lambda: model(batch, None))
    assert close(measured, step_flops(config, P, P, lm_head_tokens=1, attention="dense").total)


def test_kvengine_model_cached_steps_match_flop_counter(flop_meter):
    """kvengine's own Llama through its paged KV pool: a prefill chunk, then one decode step that reads P + 1
    cached keys, each measured against the analytic step count (LM head on the sampled position only)."""
    from kvtest import make_runner

    from kvengine.engine.scheduler import ScheduledSeq
    from kvengine.engine.sequence import Sequence
    from kvengine.models.llama import LlamaForCausalLM
    from kvengine.sampling import SamplingParams

    _, config = tiny_llama("sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    runner, blocks = make_runner(model)
    seq = Sequence(0, torch.randint(0, 128, (P + 1,)).tolist(), SamplingParams())
    blocks.allocate(0, seq.token_ids)
    for n, analytic in ((P, step_flops(config, P, P, lm_head_tokens=0, attention="dense")),
                        (1, step_flops(config, 1, P + 1))):
        assert blocks.ensure_capacity(0, seq.num_computed_tokens + n, seq.num_computed_tokens)
        batch = runner.build_cached([ScheduledSeq(seq, n)])  # the prefill chunk samples nothing: no LM head
        measured = flop_meter(lambda b=batch: runner.run(b))
        assert close(measured, analytic.total), (n, measured, analytic.total)
        seq.num_computed_tokens += n

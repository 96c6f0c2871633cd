"""Chat templates render exactly as transformers' apply_chat_template (text and ids), including the Jinja
extras templates rely on, and a template's refusals or syntax errors become one-line kvengine errors."""

from __future__ import annotations

import copy
from datetime import datetime

import pytest

from kvengine.errors import ModelLoadError, RequestError
from kvengine.weights.chat_template import render_chat_template

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 中文 please 🎨"}],
    [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"},
     {"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "<|im_end|> inline"}],
]

# Exercises the environment templates are written against: loop controls, namespace, tojson of tools,
# strftime_now, a {% generation %} block, and raise_exception.
FEATURES = """{%- set ns = namespace(turns=0) -%}
{{ bos_token }}Today is {{ strftime_now('%Y') }}.
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{%- for m in messages -%}
  {%- if m['role'] == 'system' %}{% continue %}{% endif -%}
  {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif -%}
  {%- set ns.turns = ns.turns + 1 %}
[{{ loop.index }}] {{ m['role'] }}: {% if m['role'] == 'assistant' -%}
    {% generation %}{{ m['content'] }}{% endgeneration %}
  {%- else %}{{ m['content'] | tojson }}{% endif %}{{ eos_token }}
  {%- if ns.turns >= 3 %}{% break %}{% endif %}
{%- endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <à> Paris",
                                            "parameters": {"type": "object", "properties": {}}}}]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.real_model
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm_chat_matches_transformers(smollm_tokenizer, hf_smollm_tokenizer, generation_prompt):
    for messages in CONVERSATIONS:
        text = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == hf_smollm_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        ids = smollm_tokenizer.encode_chat(messages, add_generation_prompt=generation_prompt)
        assert ids == _ids(hf_smollm_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt))
        assert text.endswith("<|im_start|>assistant\n") == generation_prompt
    default_system = smollm_tokenizer.apply_chat_template(CONVERSATIONS[0])
    assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.real_model
def test_template_features_match_transformers(smollm_tokenizer, hf_smollm_tokenizer):
    tok = copy.copy(smollm_tokenizer)
    tok.chat_template = FEATURES
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            ours = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
            ref = hf_smollm_tokenizer.apply_chat_template(messages, chat_template=FEATURES, tools=tools,
                                                          tokenize=False, add_generation_prompt=True)
            assert ours == ref
    text = tok.apply_chat_template(CONVERSATIONS[3], tools=TOOLS)
    assert f"Today is {datetime.now().year}." in text and '"Météo <à> Paris"' in text  # no escaping
    assert "[1]" not in text and "[5]" not in text  # system skipped; break after 3 turns
    assert text.count("<|im_end|>") == 3


def test_raise_exception_is_a_request_error():
    with pytest.raises(RequestError, match="bad role tool"):
        render_chat_template(FEATURES, [{"role": "tool", "content": "x"}], bos_token="", eos_token="")


def test_sandbox_blocks_mutation_and_internals():
    with pytest.raises(RequestError, match="rejected"):
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])
    with pytest.raises(RequestError, match="rejected"):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


def test_bad_template_is_a_load_error():
    with pytest.raises(ModelLoadError, match="does not parse"):
        render_chat_template("{% for m in messages %}{{ m }}", [])


def test_variables_reach_the_template():
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}{{ extra }}"
    messages = [{"role": "user", "content": "hé"}]
    assert render_chat_template(template, messages, bos_token="<s>", extra="!") == "<s>user=hé;!"
    assert render_chat_template("{{ add_generation_prompt }}", [], add_generation_prompt=False) == "False"


@pytest.mark.real_model
def test_model_without_template_refuses_chat(gemma_tokenizer):
    assert gemma_tokenizer.chat_template is None  # the Gemma 3 270M base GGUF ships none
    with pytest.raises(RequestError, match="no chat template"):
        gemma_tokenizer.encode_chat([{"role": "user", "content": "hi"}])

"""Our tokenizers built from GGUF metadata encode exactly as transformers does from the same file (SmolLM2
byte-level BPE, Gemma 3 SentencePiece-style BPE with byte fallback), decode back to the text, and loading
errors are one clear ModelLoadError."""

from __future__ import annotations

import copy
import json
from pydoc_data.topics import topics

import pytest

from kvengine.engine.detokenizer import IncrementalDetokenizer
from kvengine.errors import ModelLoadError, RequestError
from kvengine.weights.tokenizer import Tokenizer

SAMPLES = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", " leading space", "trailing space ",
    "  multiple   spaces  here ", "", " ", "   ", "\n", "line one\nline two\n\n\nend\r\n\ttab",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return c->d[0]; }",
    "naïve café résumé Ångström", "emoji 🎉🚀 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어",
    "Ω≈ç√∫ ∞ ≠", "123456789 3.14159 -42", "don't won't I'm they'll", "\u00a0nbsp a\u200bzero-width",
    "<|im_start|>user\nhi<|im_end|>\n", "inline <|im_end|>special<|endoftext|> tokens",
    "<start_of_turn>user\nhi<end_of_turn>", "x<bos>y<eos>z <unk> <0x41>",
]
# SentencePiece spells a space '▁', so text holding '▁' itself encodes fine but decodes with spaces.
META_SPACE = "▁already▁spaced"
DOCS = "".join(topics.values())[:50_000]


def _check_encodes_like(ours: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        assert ours.encode(text) == ref.encode(text), repr(text)
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == ref.encode(text, add_special_tokens=False), repr(text)


# ---- SmolLM2 (gpt2 byte-level BPE, pre-tokenizer 'smollm') ----------------------------------------------

@pytest.mark.real_model
def test_smollm_encodes_like_transformers(smollm_tokenizer, hf_smollm_tokenizer):
    _check_encodes_like(smollm_tokenizer, hf_smollm_tokenizer, [*SAMPLES, META_SPACE])
    assert smollm_tokenizer.encode("<|im_start|>user") == [1, 4093]


@pytest.mark.real_model
def test_smollm_encodes_python_docs_like_its_own_pretokenizer(smollm_tokenizer, hf_smollm_tokenizer):
    """transformers' GGUF loader ignores 'smollm' and splits words the GPT-2 way; SmolLM2's tokenizer.json and
    llama.cpp split digits off first. We follow the model's own rule: the reference here is transformers'
    tokenizer with SmolLM2's pre-tokenizer (individual digits, then byte-level) restored."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    reference = Backend.from_str(hf_smollm_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ids = smollm_tokenizer.encode(DOCS)
    assert ids == reference.encode(DOCS, add_special_tokens=False).ids
    assert len(ids) > 10_000
    # where the two rules differ: spaces before a digit stay one token, a number sign never joins a space
    assert smollm_tokenizer.encode("a  2") == [81, 256, 34]
    assert smollm_tokenizer.encode("a 2") == hf_smollm_tokenizer.encode("a 2") == [81, 216, 34]
    assert smollm_tokenizer.encode("a ½") == [81, 216, 16738]  # transformers: [81, 3351] ('Ġ½')


@pytest.mark.real_model
def test_smollm_decode_round_trips(smollm_tokenizer, hf_smollm_tokenizer):
    for text in [*SAMPLES, DOCS]:
        ids = smollm_tokenizer.encode(text)
        assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert smollm_tokenizer.decode(ids) == hf_smollm_tokenizer.decode(ids, skip_special_tokens=True)
    assert smollm_tokenizer.decode([1, 4093, 198, 6004, 2]) == "user\nhi"


@pytest.mark.real_model
def test_smollm_special_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    assert (tok.vocab_size, tok.bos_token_id, tok.pad_token_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.eos_token_ids == (2, 0)  # <|im_end|> declared, <|endoftext|> also ends a turn
    assert [tok.is_special(i) for i in (0, 1, 2, 16, 17, 905)] == [True] * 4 + [False] * 2
    assert tok.id_to_token(905) == "Ġworld" and tok.id_to_token(1) == "<|im_start|>"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        tok.id_to_token(49152)


@pytest.mark.real_model
def test_from_folder_matches_the_saved_tokenizer(tmp_path, smollm_tokenizer, hf_smollm_tokenizer):
    hf_smollm_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_folder(tmp_path)
    _check_encodes_like(tok, hf_smollm_tokenizer, SAMPLES)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.add_bos) == (1, (2, 0), 2, False)
    assert tok.chat_template == smollm_tokenizer.chat_template


@pytest.mark.real_model
def test_from_folder_infers_bos_from_the_post_processor(tmp_path, hf_smollm_tokenizer):
    hf_smollm_tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.add_bos and tok.bos_token_id == 0
    assert tok.encode("hi") == [0, 6004] and tok.encode("hi", add_special_tokens=False) == [6004]


# ---- Gemma 3 (llama/SentencePiece-style BPE with byte fallback) ------------------------------------------

@pytest.mark.real_model
def test_gemma_encodes_like_transformers(gemma_tokenizer, hf_gemma_tokenizer):
    texts = [*SAMPLES, META_SPACE, DOCS, "Ω≈ç√∫ ½ ∞ ≠", "ꙮ ᚠᚢᚦ 𓀀", "a" + " " * 40 + "b"]
    _check_encodes_like(gemma_tokenizer, hf_gemma_tokenizer, texts)


@pytest.mark.real_model
def test_gemma_decode_round_trips(gemma_tokenizer, hf_gemma_tokenizer):
    for text in [*SAMPLES, DOCS, "ꙮ ᚠᚢᚦ 𓀀"]:
        ids = gemma_tokenizer.encode(text)
        assert ids[0] == 2 and gemma_tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text
        assert gemma_tokenizer.decode(ids) == hf_gemma_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.real_model
def test_gemma_special_and_byte_tokens(gemma_tokenizer):
    tok = gemma_tokenizer
    assert (tok.vocab_size, tok.bos_token_id, tok.pad_token_id, tok.add_bos) == (262144, 2, 0, True)
    assert tok.eos_token_ids == (1, 106)  # <eos>, <end_of_turn>
    assert tok.encode("<start_of_turn>user\n\n", add_special_tokens=False) == [105, 2364, 108]
    assert tok.is_special(105) and not tok.is_special(108) and not tok.is_special(472)
    byte_tokens = [tok.id_to_token(i) for i in tok.encode("ꙮ", add_special_tokens=False)]
    assert byte_tokens == ["<0xEA>", "<0x99>", "<0xAE>"]
    assert tok.encode(" Hello", add_special_tokens=False) == [26352]  # '▁Hello': no prefix space is added


@pytest.mark.real_model
def test_gemma_chat_gets_one_bos(gemma_tokenizer, hf_gemma_tokenizer):
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tok = copy.copy(gemma_tokenizer)
    tok.chat_template = template
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "ꙮ?"}]
    ids = tok.encode_chat(messages)
    ref = hf_gemma_tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
    assert ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert ids.count(2) == 1 and ids[0] == 2
    tok.chat_template = template.replace("{{ bos_token }}", "")  # a template without BOS still gets one
    assert tok.encode_chat(messages) == ids


@pytest.mark.real_model
def test_gemma_streams_byte_fallback_text(gemma_tokenizer):
    text = "Runes ᚠᚢᚦ, hieroglyphs 𓀀𓁐 and ꙮ: ok"
    ids = gemma_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(gemma_tokenizer, prompt_ids=gemma_tokenizer.encode("Say:"))
    pieces = [detok.add(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text == detok.text
    assert pieces.count("") >= 10  # the byte tokens of 6 characters were held, then released whole


# ---- small GGUFs written here: other pre-tokenizers, SentencePiece with a space prefix ------------------

def _write_gguf(path, metadata: dict):
    """A GGUF holding `metadata` (lists become arrays, ints uint32) and one dummy tensor."""
    import gguf
    import numpy as np

    from kvengine.weights.random_gguf import add_value

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        add_value(writer, key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _train_bpe(pre_tokenizer, vocab_size: int, **trainer_options) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as 'a b') of a BPE trained on the Python docs."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_options)
    backend.train_from_iterator([DOCS[:20_000]], trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    tokens, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), 700, special_tokens=[
        "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    path = _write_gguf(tmp_path / "bpe.gguf", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.eos_token_id": 0})
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [DOCS[:5000], "abc 1234567 x  22 ½", "it's 12 O'CLOCK\n\n  done\r\n", "<|endoftext|>z 中文 🎉"]
    _check_encodes_like(ours, ref, texts)
    assert ours.eos_token_ids == (0,) and not ours.add_bos


def test_sentencepiece_space_prefix_follows_llama_cpp(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    pieces, _ = _train_bpe(pre_tokenizers.Metaspace(), 800)
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
                "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0}
    path = _write_gguf(tmp_path / "spm.gguf", {**metadata, "tokenizer.ggml.add_space_prefix": True})
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    _check_encodes_like(ours, ref, [DOCS[:5000], "x  22 ½\n\n  done", "ꙮ 🎉"])  # merges from the scores

    def pieces_of(tok, text):
        return [tok.id_to_token(i) for i in tok.encode(text)]

    # one '▁' before the text even when it starts with a space, and again after a special token
    assert pieces_of(ours, " is") == ["<s>", "▁", "▁is"]
    assert ref.convert_ids_to_tokens(ref.encode(" is")) == ["<s>", "▁is"]  # transformers: no extra '▁'
    assert pieces_of(ours, "is</s>is") == ["<s>", "▁is", "</s>", "▁is"]
    for text in [" is", "  two  spaces ", "ꙮ", DOCS[:2000]]:
        assert ours.decode(ours.encode(text)) == text  # the decoder drops the prefix it added
    no_prefix = Tokenizer.from_gguf(_write_gguf(tmp_path / "bare.gguf", metadata | {
        "tokenizer.ggml.add_space_prefix": False}))
    assert pieces_of(no_prefix, "is is") == ["<s>", "is", "▁is"]
    assert no_prefix.decode(no_prefix.encode(" is")) == " is"


# ---- errors ---------------------------------------------------------------------------------------------

def test_gguf_without_tokenizer_is_a_load_error(tmp_path):
    path = _write_gguf(tmp_path / "bare.gguf", {"general.name": "no tokenizer"})
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        Tokenizer.from_gguf(path)
    path = _write_gguf(tmp_path / "bert.gguf", {"tokenizer.ggml.model": "bert",
                                                "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelLoadError, match="'bert' is not supported"):
        Tokenizer.from_gguf(path)


def test_folder_without_tokenizer_json_is_a_load_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        Tokenizer.from_folder(tmp_path)

"""Streaming detokenization: text comes out token by token, never with a U+FFFD from a character split
across tokens, adds up to `decode` of the same ids, keeps SentencePiece's spaces after a prompt, and each
step decodes only a few recent ids."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from kvengine.engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer
from kvengine.weights.tokenizer import Tokenizer, byte_alphabet

MIXED = "Héllo wörld! 🎉🚀 中文字符测试 日本語 👨‍👩‍👧 ñandú 𒀀 done."


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush(), detok


@pytest.fixture(scope="module")
def smollm(default_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    """A tiny Llama-style SentencePiece tokenizer: '▁' words, '<0xNN>' byte fallback, and a decoder that
    strips the space a leading '▁' makes (the case where streaming needs the prompt as context)."""
    words = ["▁Hello", "▁world", "▁Hi"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted({c for w in words for c in w} | {"▁"})
    merges = []
    for word in words:  # merge each word left to right
        for end in range(2, len(word) + 1):
            merges.append((word[:end - 1], word[end - 1]))
            pieces.append(word[:end])
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder = tmp_path_factory.mktemp("spm")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_folder(folder)


@pytest.mark.real_model
def test_byte_level_stream_never_splits_a_character(smollm):
    ids = smollm.encode(MIXED)
    pieces, rest, detok = _stream(smollm, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + rest == smollm.decode(ids) == MIXED == detok.text
    assert rest == "" and pieces.count("") >= 5  # partial characters were held, then released whole


@pytest.mark.real_model
def test_stream_after_a_chat_prompt_skips_special_tokens(smollm):
    prompt = smollm.encode_chat([{"role": "user", "content": "Say hi"}])
    generated = smollm.encode("Hi there 👋<|im_end|>")
    pieces, rest, _ = _stream(smollm, generated, prompt_ids=prompt)
    assert "".join(pieces) + rest == "Hi there 👋" == smollm.decode(generated)
    assert pieces[-1] == ""  # <|im_end|> adds nothing
    pieces, rest, _ = _stream(smollm, generated, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(pieces) + rest == "Hi there 👋<|im_end|>"


@pytest.mark.real_model
def test_unfinished_character_is_released_by_flush(smollm):
    first_bytes = smollm.encode("🎉")[:1]  # 'ðŁ': the first two of the emoji's four bytes
    pieces, rest, _ = _stream(smollm, first_bytes)
    assert pieces == [""] and rest == smollm.decode(first_bytes) == "\ufffd"


@pytest.mark.real_model
def test_bytes_that_never_form_a_character_are_not_held_forever(smollm):
    continuation = byte_alphabet()[0x80]  # a UTF-8 continuation byte on its own
    stray = [next(i for i in range(512) if smollm.id_to_token(i) == continuation)] * (MAX_HELD_TOKENS + 10)
    pieces, rest, detok = _stream(smollm, stray)
    assert "".join(pieces) != ""  # released after MAX_HELD_TOKENS tokens
    assert "".join(pieces) + rest == smollm.decode(stray)


@pytest.mark.real_model
def test_each_step_decodes_a_short_window(smollm, monkeypatch):
    ids = smollm.encode(MIXED * 20)
    longest = 0
    decode = smollm.decode

    def measuring(token_ids, skip_special_tokens=True):
        nonlocal longest
        longest = max(longest, len(token_ids))
        return decode(token_ids, skip_special_tokens)

    detok = IncrementalDetokenizer(smollm, prompt_ids=smollm.encode("prompt " * 50))
    monkeypatch.setattr(smollm, "decode", measuring)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    monkeypatch.undo()
    assert out == smollm.decode(ids)
    assert len(ids) > 1000 and longest <= 8


def test_sentencepiece_space_after_prompt(spm):
    hello = spm.encode("Hello", add_special_tokens=False)
    assert [spm.id_to_token(i) for i in hello] == ["▁Hello"] and spm.add_bos
    prompt = spm.encode("Hi")
    assert [spm.id_to_token(i) for i in prompt] == ["<s>", "▁Hi"]
    pieces, rest, _ = _stream(spm, hello, prompt_ids=prompt)
    assert pieces == [" Hello"] and rest == ""
    assert spm.decode(prompt + hello)[len(spm.decode(prompt)):] == " Hello"
    # with no prompt, the first token reads as decode() reads it: the leading space is stripped
    assert _stream(spm, hello)[0] == ["Hello"] == [spm.decode(hello)]


def test_sentencepiece_byte_fallback_stream(spm):
    text = " world é中🎉 Hello"
    ids = spm.encode(text, add_special_tokens=False)
    assert sum(spm.id_to_token(i).startswith("<0x") for i in ids) == 2 + 3 + 4
    prompt = spm.encode("Hi")
    pieces, rest, detok = _stream(spm, ids, prompt_ids=prompt)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + rest == text == spm.decode(prompt + ids)[len("Hi"):]
    assert [p for p in pieces if p] == [" world", " ", "é", "中", "🎉", " Hello"]
    end = spm.eos_token_ids[0]
    assert _stream(spm, [end])[0] == [""] and _stream(spm, [end], skip_special_tokens=False)[0] == ["</s>"]

"""Text <-> token ids: the `Tokenizer` every request goes through, built on HF `tokenizers`.

Two sources: a GGUF's embedded vocabulary (byte-level BPE for `tokenizer.ggml.model == "gpt2"`,
SentencePiece-style BPE with byte fallback for `"llama"`), or a folder with `tokenizer.json`.
Either way the backend never adds special tokens itself: BOS is prepended here, so one rule
(`add_bos`) holds for every source, and chat prompts get exactly one BOS.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from kvengine.errors import ModelLoadError, RequestError
from kvengine.weights.chat_template import render_chat_template, template_variables

if TYPE_CHECKING:
    from kvengine.weights.gguf import GGUFFile

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Turn/sequence terminators that llama.cpp also treats as end-of-generation when present as special tokens.
END_OF_GENERATION_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
    "<EOT>", "<|return|>", "<|call|>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
})

# Pre-tokenizer split patterns for byte-level vocabularies, keyed by `tokenizer.ggml.pre`. The pattern a
# vocabulary's merges were learned with; `None` means GPT-2's own pattern (built into ByteLevel).
_WORDS_LLAMA3 = r"[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_SPLIT_LLAMA3 = _CONTRACTIONS + "|" + _WORDS_LLAMA3 + r"|\p{N}{1,3}" + _TAIL
_SPLIT_QWEN2 = _CONTRACTIONS + "|" + _WORDS_LLAMA3 + r"|\p{N}" + _TAIL
_BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "gpt-2": None,
    "llama3": _SPLIT_LLAMA3, "llama-v3": _SPLIT_LLAMA3, "llama-bpe": _SPLIT_LLAMA3,
    "smaug-bpe": _SPLIT_LLAMA3,
    "qwen2": _SPLIT_QWEN2, "deepseek-r1-qwen": _SPLIT_QWEN2,
}
# Vocabularies whose merges never join digits (SmolLM, StarCoder): split digits one by one, then GPT-2's way.
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact", "codeshell"})
# SentencePiece GGUFs whose merge order is the vocabulary order rather than the scores.
_ORDERED_BY_POSITION = frozenset({"gemma", "gemma2", "gemma3"})


class Tokenizer:
    """A tokenizer with its special ids and chat template. Build it with `from_gguf` or `from_folder`."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 pad_token_id: int | None, add_bos: bool, chat_template: str | None) -> None:
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.chat_template = chat_template
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFFile | str | Path) -> Tokenizer:
        """The tokenizer embedded in a GGUF file's metadata."""
        if isinstance(gguf, str | Path):
            from kvengine.weights.gguf import GGUFFile

            gguf = GGUFFile(gguf)
        meta = gguf.metadata
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelLoadError(f"'{gguf.path}' has no tokenizer: the GGUF lacks tokenizer.ggml.model/tokens"
                                 " metadata (pass a model folder with tokenizer.json instead)")
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
        if len(types) != len(tokens):
            raise ModelLoadError(f"'{gguf.path}': {len(tokens)} tokens but {len(types)} token types")
        if kind == "gpt2":
            backend, spelled = _byte_level_backend(tokens, types, meta.get("tokenizer.ggml.merges"),
                                                   meta.get("tokenizer.ggml.pre"))
            add_bos_default = False
        elif kind == "llama":
            backend, spelled = _sentencepiece_backend(tokens, meta, gguf.architecture)
            add_bos_default = True
        else:
            raise ModelLoadError(f"'{gguf.path}': GGUF tokenizer type '{kind}' is not supported "
                                 "(kvengine reads 'gpt2' byte-level BPE and 'llama' SentencePiece ones)")
        _add_vocab_specials(backend, spelled, types)

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id"))
               if i is not None]
        return cls(backend, bos_token_id=token_id("bos_token_id"),
                   eos_token_ids=_with_terminators(backend, eos), pad_token_id=token_id("padding_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """A HF-style folder: tokenizer.json (+ tokenizer_config.json, generation_config.json if present)."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file() and (folder / "merges.txt").is_file():
            backend = _vocab_merges_backend(folder)
        elif not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"no tokenizer.json (nor vocab.json + merges.txt) in '{folder}'")
        else:
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise ModelLoadError(f"'{folder / 'tokenizer.json'}' cannot be read: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(value: Any) -> int | None:
            content = value.get("content") if isinstance(value, Mapping) else value
            return backend.token_to_id(content) if isinstance(content, str) else None

        bos = token_id(config.get("bos_token"))
        with_specials = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        if bos is None and len(with_specials) > len(plain) and with_specials[1:len(plain) + 1] == plain:
            bos = with_specials[0]  # the post-processor prepends a token the config does not name
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos]
        eos = [i for i in [token_id(config.get("eos_token")), *_as_list(generation.get("eos_token_id"))]
               if i is not None]
        return cls(backend, bos_token_id=bos, eos_token_ids=_with_terminators(backend, eos),
                   pad_token_id=token_id(config.get("pad_token")), add_bos=bool(add_bos),
                   chat_template=_folder_chat_template(folder, config))

    # ---- text <-> ids --------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text inside it (e.g. '<|im_start|>') becomes its one id."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The backend as HF `tokenizer.json` text (grammar engines build their token tries from it)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored (e.g. 'Ġworld' or '▁world'), not its decoded text."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise RequestError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # ---- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        if self.chat_template is None:
            raise RequestError("this model has no chat template; send a plain prompt (completions) instead")
        specials = {"bos_token": self.bos_token_id, "pad_token": self.pad_token_id,
                    "eos_token": self.eos_token_ids[0] if self.eos_token_ids else None}
        for name, token_id in specials.items():
            kwargs.setdefault(name, self._backend.id_to_token(token_id) if token_id is not None else "")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **kwargs)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable (the tools a request offers)."""
        return self.chat_template is not None and "tools" in template_variables(self.chat_template)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The rendered chat encoded, with one BOS when the model wants one (templates often write it). `tools`
        (OpenAI's shape) reach the template as its `tools` variable."""
        extra = {"tools": tools} if tools is not None else {}
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
                f"add_bos={self.add_bos})")


# ---- GGUF vocabularies ----------------------------------------------------------------------------------

def _byte_level_backend(tokens: list[str], types: list[int], merges: Sequence[str] | None,
                        pre: str | None) -> tuple[Backend, list[str]]:
    """GPT-2-style byte-level BPE: tokens are spelled in the 256-character byte alphabet."""
    if not merges:
        raise ModelLoadError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
    spell = byte_alphabet()
    alphabet = set(spell)
    # An ordinary token written with characters outside the byte alphabet is raw text: respell it. Control
    # and user-defined tokens stay as written, since the added-token layer matches them in raw text.
    spelled = [t if kind in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet
               else "".join(spell[b] for b in t.encode("utf-8"))
               for t, kind in zip(tokens, types, strict=True)]
    vocab = {token: index for index, token in enumerate(spelled)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    key = (pre or "default").lower()
    if key in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if key not in _BYTE_LEVEL_SPLITS:
            warnings.warn(f"GGUF pre-tokenizer '{pre}' is unknown to kvengine; splitting words the GPT-2 way",
                          stacklevel=3)
        pattern = _BYTE_LEVEL_SPLITS.get(key)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
        backend.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece_backend(tokens: list[str], meta: Mapping[str, Any], arch: str
                           ) -> tuple[Backend, list[str]]:
    """SentencePiece-style BPE: '▁' stands for a space, unknown bytes fall back to '<0xNN>' tokens.

    GGUF stores no merges for these; they are implied by the vocabulary. A token `t` that splits into two
    vocabulary entries gives the merge of that pair, ranked by t's score (Gemma: by t's position), then by
    the longer left piece -- the order transformers' GGUF loader builds, so both tokenize alike.
    """
    if arch in _ORDERED_BY_POSITION:
        # Gemma stores a run of spaces as real spaces; the model matches them as '▁' runs.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores: Sequence[float] = [-float(i) for i in range(len(tokens))]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    vocab = {token: index for index, token in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        pairs = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        pairs = implied_merges(vocab, scores)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(models.BPE(vocab, pairs, unk_token=tokens[int(unk)] if unk is not None else None,
                                 fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix, as llama.cpp applies it: one '▁' before every run of text that starts
    # the input or follows a special token, even one that already starts with a space. (transformers' GGUF
    # loader adds it to the first run only, and not before a leading space; it also ignores the flag.)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", arch not in _ORDERED_BY_POSITION))
    spaces = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend, tokens


def _vocab_merges_backend(folder: Path) -> Backend:
    """GPT-2's original tokenizer files: vocab.json + merges.txt, byte-level BPE, `<|endoftext|>` special."""
    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:  # tokenizers raises a bare Exception on unreadable files
        raise ModelLoadError(f"'{folder}' vocab.json / merges.txt cannot be read: {e}") from None
    backend = Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id("<|endoftext|>") is not None:
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return backend


def implied_merges(vocab: Mapping[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two entries, best-ranked first."""
    keyed: list[tuple[float, int, int, str, str]] = []
    for token, index in vocab.items():
        score = -float(scores[index])
        for cut in range(1, len(token)):
            left = token[:cut]
            if left in vocab and (right := token[cut:]) in vocab:
                keyed.append((score, -cut, cut - len(token), left, right))
    keyed.sort(key=lambda k: k[:3])  # stable: ties keep vocabulary order
    return [(left, right) for *_, left, right in keyed]


def _add_vocab_specials(backend: Backend, spelled: list[str], types: list[int]) -> None:
    """Control (and unknown) tokens become special added tokens, user-defined ones plain added tokens,
    so that '<|im_start|>' or '<start_of_turn>' in text is one id instead of pieces. A token whose stored
    spelling is not its own vocabulary entry (respelled, or a duplicate) is left to the model."""
    def added(kinds: tuple[int, ...], special: bool) -> list[AddedToken]:
        return [AddedToken(t, special=special, normalized=False)
                for i, (t, k) in enumerate(zip(spelled, types, strict=True))
                if k in kinds and backend.token_to_id(t) == i]

    backend.add_special_tokens(added((_CONTROL, _UNKNOWN), True))
    backend.add_tokens(added((_USER_DEFINED,), False))


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: entry b spells byte b."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spare = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


# ---- helpers ---------------------------------------------------------------------------------------

def _with_terminators(backend: Backend, eos: list[int]) -> list[int]:
    """The declared EOS ids first, then any special token whose text is a known turn/sequence end."""
    found = [i for i, t in sorted(backend.get_added_tokens_decoder().items())
             if t.special and t.content in END_OF_GENERATION_TEXTS]
    return [*eos, *found]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{path}' is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _folder_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None

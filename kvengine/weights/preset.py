"""Random-weight presets (`--model preset:NAME`): a preset's architecture (accounting/presets.py) built with
seeded random weights and a byte-level BPE tokenizer trained offline, so the seeds' experiments run with no
checkpoint. Timing and FLOPs are real; the generated text is noise, and the run summary says so.

The tokenizer is trained on CPython's pydoc topics (shipped with Python) in well under a second: GPT-2's byte
alphabet, the merges those texts give (about 9,000 entries), then `<|unusedN|>` placeholders up to the model's
vocabulary with `<|endoftext|>` as its last id (GPT-2's convention).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kvengine.config import ModelConfig
from kvengine.errors import ModelLoadError
from kvengine.models.protocol import CausalLM
from kvengine.weights.tokenizer import Tokenizer

PRESET_SEED = 0
END_OF_TEXT = "<|endoftext|>"


def random_model(config: ModelConfig, cls: type[CausalLM], dtype: torch.dtype, seed: int = PRESET_SEED) -> CausalLM:
    """The architecture of `config` with the family's own random initialisation from `seed`."""
    model = cls.random(config, seed)
    if model is None:
        raise ModelLoadError(f"preset '{config.name}' ({config.architecture}) is countable, not runnable: its "
                             "family has no random initialisation (GPT-style presets run)")
    return model.to(dtype).eval()


def random_weights_note(name: str, seed: int = PRESET_SEED) -> str:
    return (f"RANDOM weights (preset '{name}', seed {seed}; byte-level tokenizer built offline): timing and FLOPs "
            "are real, the text is noise")


@lru_cache(maxsize=4)
def _backend_json(vocab_size: int) -> str:
    from pydoc_data.topics import topics

    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(sorted(topics.values()), trainer)
    fill = vocab_size - 1 - backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(f"<|unused{i}|>", special=True) for i in range(fill)])
    backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return backend.to_str()


def preset_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids; `<|endoftext|>` (the last) ends a sequence."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(_backend_json(vocab_size))
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[vocab_size - 1], pad_token_id=None, add_bos=False,
                     chat_template=None)

"""RoutedRequest: what the frontend sends a replica (token ids, sampling, salt) plus what routers read: the
prompt's block keys (tokenized and hashed once, at the frontend) and its text (for text-matching routers).

A block key is the first KEY_BYTES bytes of the engine's chain hash of a full block (cache/block_manager.py,
salt included), so a key names exactly the KV block a replica would reuse. Routing only: the engine still
compares the full hash and the tokens on a hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvengine.cache.block_manager import ROOT_HASH, chain_hash
from kvengine.sampling import SamplingParams

KEY_BYTES = 8


def block_key(chain: bytes) -> bytes:
    return chain[:KEY_BYTES]


def prompt_block_keys(token_ids: Sequence[int], salt: str | None, block_size: int) -> list[bytes]:
    """Keys of the prompt's full blocks, in order (the chain the engine registers as it computes them)."""
    keys, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, salt, token_ids[start:start + block_size])
        keys.append(block_key(parent))
    return keys


@dataclass(slots=True)
class RoutedRequest:
    request_ids: list[str]  # one engine request per choice (n)
    prompt_token_ids: list[int]
    params: list[SamplingParams]
    cache_salt: str | None
    block_keys: list[bytes] = field(default_factory=list)
    text: str = ""  # the prompt as text (chat: the messages' contents), for routers that match text

    @property
    def prompt(self) -> str:
        """The attribute Ray's PrefixCacheAffinityRouter reads."""
        return self.text

"""The KV fingerprint: everything besides the tokens and the salt that makes a block's KV bytes differ.

Model weights (a hash of the checkpoint's files, of the preset's name and seed, or of the tensors of a model
built in memory), how the weights are stored and run (weights format, compute dtype), the KV dtype, block size
and pool layout, RoPE settings, and the disk block layout version. The tokens and the cache salt are in each
block's chain hash and header (cache/disk_format.py). Hashes of checkpoint files are remembered in the disk
directory by (path, size, mtime), so a restart does not read the weights twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from kvengine.cache.disk_format import LAYOUT_VERSION
from kvengine.cache.spec import KVCacheSpec
from kvengine.config import ModelConfig

HASH_CHUNK = 1 << 24


def kv_fingerprint(model_id: str, config: ModelConfig, spec: KVCacheSpec, weights: str, compute_dtype: str) -> str:
    """A hex digest of what the KV bytes depend on (besides tokens and salt)."""
    rope = {"theta": config.rope_theta, "local_theta": config.rope_local_theta,
            "scaling": None if config.rope_scaling is None else repr(config.rope_scaling),
            "max_positions": config.max_position_embeddings, "architecture": config.architecture}
    fields: dict[str, Any] = {"model": model_id, "weights": weights, "compute_dtype": compute_dtype,
                              "kv_dtype": spec.dtype, "block_size": spec.block_size, "rope": rope,
                              "layout": [LAYOUT_VERSION, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                         spec.layers_per_group]}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()


def files_id(paths: list[Path], cache_dir: Path) -> str:
    """A hash of the files' bytes, remembered in `cache_dir`/model-hashes.json by path, size and mtime."""
    memo_path = cache_dir / "model-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.blake2b(digest_size=16)
    changed = False
    for p in sorted(paths):
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = _hash_file(p)
            changed = True
        h.update(memo[key].encode())
    if changed:
        try:
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a read-only directory: hash again next time
    return "files:" + h.hexdigest()


def tensors_id(model: torch.nn.Module) -> str:
    """A hash of a model's parameters and buffers (a model built in memory, e.g. a test's random model)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "tensors:" + h.hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()

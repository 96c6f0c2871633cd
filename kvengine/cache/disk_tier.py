"""KVDiskTier: the KV pool's second level, a content-addressed directory of full blocks that outlives the process.

Writes: every full block the block manager registers (`save`, called after a step's commit) is copied out of the
pool in one gather and handed to a writer thread, which encodes it (cache/disk_format.py) and stores it
(cache/disk_store.py) off the step path. Blocks are written when they become full, not only when memory evicts
them, so a `kill -9` loses only the writer's queue; a block already on disk is not written again. A queue over
MAX_PENDING_BYTES drops new blocks (counted) rather than slowing the steps.

Reads: on a prefix miss in memory (`find`), the blocks that follow the hit are looked up by chain hash and
fingerprint, in order, until the first one absent or unreadable (skipped with its counted reason and removed);
after the block manager registers them into fresh blocks, `fill` copies their bytes into the pool, so the
step computes only what follows. The block manager decides; this tier only stores and verifies bytes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvengine.cache.block_manager import BlockKey, LoadedPrefix, chain_keys
from kvengine.cache.disk_format import (
    BlockFileError,
    FileKey,
    Part,
    SkipReason,
    decode_block,
    encode_block,
    salt_digest,
)
from kvengine.cache.disk_store import DiskStore
from kvengine.cache.pool import KVPool

MAX_PENDING_BYTES = 256 << 20  # blocks queued for the writer at most; more are dropped (and recomputed later)
TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.uint8,
                                                           torch.int8, torch.int16, torch.int32, torch.int64)}


@dataclass(slots=True)
class DiskFind:
    """Blocks found on disk for one prompt: their keys (for the block manager) and their tensors."""

    prefix: LoadedPrefix
    parts: list[list[torch.Tensor]]  # per block: one tensor per pool tensor (KVPool.block_part_shapes)
    nbytes: int  # file bytes read
    seconds: float  # reading and verifying


@dataclass(slots=True)
class DiskTierStats:
    blocks_loaded: int = 0
    tokens_loaded: int = 0
    bytes_loaded: int = 0
    load_s: float = 0.0
    lookups: int = 0  # prompts looked up after a memory miss
    dropped: int = 0  # blocks not written because the writer's queue was full
    pending: int = 0  # blocks queued for the writer now


class KVDiskTier:
    def __init__(self, store: DiskStore, pool: KVPool, fingerprint: str) -> None:
        self.store = store
        self.pool = pool
        self.fingerprint = fingerprint
        self.block_size = pool.spec.block_size
        self._shapes = pool.block_part_shapes()
        self._block_bytes = sum(torch.empty(0, dtype=d).element_size() * _numel(s) for d, s in self._shapes)
        self.stats = DiskTierStats()
        self._queue: queue.Queue[tuple[list[FileKey], list[torch.Tensor]] | None] = queue.Queue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    def file_key(self, key: BlockKey) -> FileKey:
        return FileKey(key.chain_hash, self.fingerprint, salt_digest(key.salt), key.tokens)

    # ---- writes ------------------------------------------------------------------------------------

    def save(self, registered: Sequence[tuple[int, BlockKey]]) -> None:
        """Queue newly registered full blocks for the writer (one gather from the pool, in the step thread)."""
        if not registered or self.store.stats.writes_stopped is not None:
            return
        nbytes = self._block_bytes * len(registered)
        with self._lock:
            if self._pending_bytes + nbytes > MAX_PENDING_BYTES:
                self.stats.dropped += len(registered)
                return
            self._pending_bytes += nbytes
            self.stats.pending += len(registered)
        keys = [self.file_key(key) for _, key in registered]
        self._queue.put((keys, self.pool.read_blocks([b for b, _ in registered])))

    def flush(self) -> None:
        """Wait until every queued block is on disk (tests, benchmarks, shutdown)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            keys, tensors = item
            try:
                for i, key in enumerate(keys):
                    if not self.store.has(key.name):
                        self.store.write(key.name, encode_block(key, _block_parts(tensors, i, self._shapes)))
            finally:
                with self._lock:
                    self._pending_bytes -= self._block_bytes * len(keys)
                    self.stats.pending -= len(keys)
                self._queue.task_done()
        self._queue.task_done()

    # ---- reads -------------------------------------------------------------------------------------

    def find(self, token_ids: Sequence[int], salt: str | None, start: int, stop: int) -> DiskFind | None:
        """Full blocks start .. stop - 1 of the prompt that are on disk, in order, up to the first absent or
        unreadable one; None when not even block `start` is there."""
        if start >= stop:
            return None
        t0 = time.perf_counter()
        keys, parts, nbytes = [], [], 0
        for key in chain_keys(token_ids, salt, self.block_size, start, stop):
            fkey = self.file_key(key)
            data = self.store.read(fkey.name)
            if data is None:
                break
            try:
                parts.append(self._tensors(decode_block(data, fkey)))
            except BlockFileError as e:
                self.store.remove(fkey.name, e.reason.value)
                break
            keys.append(key)
            nbytes += len(data)
        with self._lock:
            self.stats.lookups += 1
        if not keys:
            return None
        return DiskFind(LoadedPrefix(start, keys), parts, nbytes, time.perf_counter() - t0)

    def fill(self, block_ids: list[int], found: DiskFind) -> None:
        """Copy the first len(block_ids) found blocks into the pool blocks the block manager gave them."""
        t0 = time.perf_counter()
        n = len(block_ids)
        self.pool.write_blocks(block_ids, [torch.cat([p[j] for p in found.parts[:n]], dim=3)
                                           for j in range(len(self._shapes))])
        found.seconds += time.perf_counter() - t0
        with self._lock:
            self.stats.blocks_loaded += n
            self.stats.tokens_loaded += n * self.block_size
            self.stats.bytes_loaded += found.nbytes * n // len(found.parts)
            self.stats.load_s += found.seconds

    def _tensors(self, parts: list[Part]) -> list[torch.Tensor]:
        """The parts as tensors of the pool's per-block shapes; a file of another layout is refused."""
        got = [(p.dtype, p.shape) for p in parts]
        want = [(str(d).removeprefix("torch."), s) for d, s in self._shapes]
        if got != want:
            raise BlockFileError(SkipReason.KEY, f"parts {got}, the pool holds {want}")
        return [torch.frombuffer(p.data, dtype=torch.uint8).view(TORCH_DTYPES[p.dtype]).view(p.shape)
                if len(p.data) else torch.empty(p.shape, dtype=TORCH_DTYPES[p.dtype]) for p in parts]

    def to_dict(self) -> dict[str, Any]:
        """Counters of the tier and its store (for /metrics, the dashboard, benchmarks)."""
        with self._lock:
            out = asdict(self.stats)
        out.update({f"store_{k}": v for k, v in asdict(self.store.stats).items()})
        out["dir"] = str(self.store.root)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _block_parts(tensors: list[torch.Tensor], i: int, shapes: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[Part]:
    """Block i of a gathered batch as file parts (raw bytes of each tensor's slice on axis 3)."""
    parts = []
    for t, (dtype, shape) in zip(tensors, shapes, strict=True):
        rows = shape[3]
        piece = t.narrow(3, i * rows, rows).contiguous()
        parts.append(Part(str(dtype).removeprefix("torch."), tuple(piece.shape),
                          piece.view(-1).view(torch.uint8).numpy().tobytes()))
    return parts

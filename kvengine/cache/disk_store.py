"""DiskStore: a directory of block files under a byte budget; whole-or-absent writes, LRU eviction, shared safely.

Layout: DIR (created 0700) holds `blocks/<name>.kvb` (cache/disk_format.py) and a `lock` file. A write goes to a
temporary name in `blocks/`, is fsynced and renamed over the final name, so a reader sees a whole file or none;
a killed writer leaves only a temporary file, which no reader opens and the next store to start removes.
A read bumps the file's mtime, and eviction drops the oldest mtimes first (LRU) until the directory is under
90% of the budget. Several processes may share DIR: renames are atomic, an unlinked file stays readable to
whoever has it open, and the directory's byte count lives in `lock`, updated under an exclusive `flock` after
every write; eviction passes take the same lock, rescan the directory and write the exact count back (which
also heals a count left behind by a killed process).

When the disk refuses a write (full, read-only, gone) or a block cannot fit the budget at all, the store stops
writing, logs one line and keeps serving reads: requests never fail because of the disk tier.
Bytes only: no torch, no knowledge of what a block holds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kvengine.errors import ConfigError

log = logging.getLogger("kvengine.disk")

SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
LOW_WATERMARK = 0.9  # an eviction pass stops at this fraction of the budget
STALE_TMP_S = 60.0  # a temporary file older than this at start-up is a dead writer's


@dataclass(slots=True)
class DiskStoreStats:
    files: int = 0  # block files on disk (this process's view, exact after an eviction pass)
    bytes: int = 0  # their bytes
    budget: int = 0
    writes: int = 0
    bytes_written: int = 0
    reads: int = 0  # files found and read
    bytes_read: int = 0
    misses: int = 0  # names looked up and not found
    evictions: int = 0  # files this process removed to keep the budget
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable files by SkipReason, removed when found
    writes_stopped: str | None = None  # why writes stopped (disk full, read-only...), None while writing


def check_disk_dir(path: str | os.PathLike[str]) -> Path:
    """The directory for the disk tier, created 0700 if missing; ConfigError if it is not a writable directory."""
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--kv-disk-dir '{root}' exists and is not a directory")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "blocks").mkdir(mode=0o700, exist_ok=True)
        probe = root / "blocks" / f".probe-{os.getpid()}{TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--kv-disk-dir '{root}' is not a writable directory ({e.strerror or e})") from None
    return root


def check_disk_budget(budget: float | None, root: Path) -> int:
    """The budget in bytes: positive and at most the file system's size (None: a quarter of the free space,
    at most 16 GiB)."""
    usage = shutil.disk_usage(root)
    if budget is None:
        return int(min(usage.free // 4, 16 << 30))
    if not isinstance(budget, (int, float)) or math.isnan(budget) or budget <= 0:
        raise ConfigError(f"--kv-disk-budget must be a positive size, got {budget}")
    if budget > usage.total:
        raise ConfigError(f"--kv-disk-budget of {budget / 2**30:.1f} GiB exceeds the size of the file system "
                          f"holding '{root}' ({usage.total / 2**30:.1f} GiB)")
    return int(budget)


class DiskStore:
    def __init__(self, root: str | os.PathLike[str], budget_bytes: int) -> None:
        self.root = check_disk_dir(root)
        self.blocks = self.root / "blocks"
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()  # this process's counters; other processes are kept out by flock
        self._tmp_ids = 0
        self.stats = DiskStoreStats(budget=self.budget)
        self._remove_stale_tmp()
        self._rescan()

    # ---- bytes in, bytes out -------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.blocks / (name + SUFFIX)

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def read(self, name: str) -> bytearray | None:
        """The file's bytes (its mtime bumped: recently used), or None if there is no such file."""
        p = self.path(name)
        try:
            data = bytearray(p.read_bytes())
        except OSError:  # no such file (or a directory that went away): a miss
            with self._lock:
                self.stats.misses += 1
            return None
        try:
            os.utime(p)
        except OSError:
            pass  # evicted meanwhile, or a read-only directory: the bytes are still good
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += len(data)
        return data

    def write(self, name: str, data: bytes) -> bool:
        """Store a block whole (temporary file, fsync, rename). False when writes have stopped or it exists."""
        if self.stats.writes_stopped is not None:
            return False
        if len(data) > self.budget:
            self._stop(f"one block ({len(data)} bytes) is larger than the budget ({self.budget} bytes)")
            return False
        final = self.path(name)
        if final.exists():
            return False
        with self._lock:
            self._tmp_ids += 1
            tmp = self.blocks / f".{name}.{os.getpid()}.{threading.get_ident()}.{self._tmp_ids}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            _unlink(tmp)
            self._stop(_describe(e))
            return False
        total = self._add_usage(len(data))
        with self._lock:
            self.stats.writes += 1
            self.stats.bytes_written += len(data)
            self.stats.files += 1
            self.stats.bytes = total
        if total > self.budget:
            self.evict()
        return True

    def remove(self, name: str, reason: str) -> None:
        """Drop an unreadable file found under `name`, counting why."""
        p = self.path(name)
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            size = 0
        total = self._add_usage(-size) if size else self.stats.bytes
        with self._lock:
            self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
            self.stats.files -= 1 if size else 0
            self.stats.bytes = total

    # ---- budget -----------------------------------------------------------------------------------

    def evict(self) -> int:
        """Remove the least recently used files until the directory is under LOW_WATERMARK of the budget;
        other processes wait on the lock file meanwhile. Returns how many files went."""
        removed = 0
        with self._usage_file() as lock:
            entries = self._scan()
            total = sum(size for _, size, _ in entries)
            target = self.budget * LOW_WATERMARK
            for path, size, _mtime in sorted(entries, key=lambda e: e[2]):
                if total <= target:
                    break
                removed += _unlink(path)
                total -= size
            _put_usage(lock, total)
        with self._lock:
            self.stats.evictions += removed
            self.stats.files, self.stats.bytes = len(entries) - removed, total
        return removed

    @contextmanager
    def _usage_file(self) -> Iterator[BinaryIO]:
        """The lock file, held exclusively; it holds the directory's byte count."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _add_usage(self, delta: int) -> int:
        """Add `delta` bytes to the directory's count; the new count."""
        with self._usage_file() as f:
            raw = f.read().strip()
            total = max(0, (int(raw) if raw.isdigit() else 0) + delta)
            _put_usage(f, total)
        return total

    def _scan(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, mtime) of every block file now."""
        out = []
        with os.scandir(self.blocks) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _rescan(self) -> None:
        with self._usage_file() as f:
            entries = self._scan()
            total = sum(size for _, size, _ in entries)
            _put_usage(f, total)
        with self._lock:
            self.stats.files, self.stats.bytes = len(entries), total

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        with os.scandir(self.blocks) as it:
            for entry in it:
                if entry.name.endswith(TMP_SUFFIX):
                    try:
                        if now - entry.stat().st_mtime > STALE_TMP_S:
                            os.unlink(entry.path)
                    except OSError:
                        pass

    def _stop(self, why: str) -> None:
        with self._lock:
            if self.stats.writes_stopped is not None:
                return
            self.stats.writes_stopped = why
        log.warning("KV disk tier: no more writes to %s (%s); requests go on without them", self.root, why)


def _put_usage(f: BinaryIO, total: int) -> None:
    f.seek(0)
    f.write(str(total).encode())
    f.truncate()
    f.flush()


def _describe(e: OSError) -> str:
    names = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EDQUOT: "disk quota exceeded"}
    return names.get(e.errno or 0, e.strerror or str(e))


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False

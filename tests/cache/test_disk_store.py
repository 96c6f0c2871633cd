"""The disk tier's files and directory: whole-or-absent writes, every kind of bad file skipped with its reason,
the budget kept by LRU eviction, two processes on one directory, a killed writer."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvengine.cache.disk_format import (
    BlockFileError,
    FileKey,
    Part,
    SkipReason,
    decode_block,
    encode_block,
    salt_digest,
)
from kvengine.cache.disk_store import DiskStore, check_disk_budget, check_disk_dir
from kvengine.errors import ConfigError

FP = "fingerprint-a"


def key(i: int, fp: str = FP, salt: str | None = None) -> FileKey:
    return FileKey(i.to_bytes(16, "little"), fp, salt_digest(salt), tuple(range(i, i + 4)))


def block(i: int, size: int = 1000, **kw) -> tuple[FileKey, bytes]:
    k = key(i, **kw)
    data = bytes((i + j) % 251 for j in range(size))
    return k, encode_block(k, [Part("uint8", (size,), data), Part("float32", (2, 3), bytes(24))])


def test_round_trip():
    k, raw = block(1)
    parts = decode_block(raw, k)
    assert [(p.dtype, p.shape) for p in parts] == [("uint8", (1000,)), ("float32", (2, 3))]
    assert bytes(parts[0].data) == bytes((1 + j) % 251 for j in range(1000))
    assert bytes(parts[1].data) == bytes(24)


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: raw[:-1], SkipReason.TRUNCATED),
    (lambda raw: raw[: len(raw) // 2], SkipReason.TRUNCATED),
    (lambda raw: raw[:10], SkipReason.TRUNCATED),
    (lambda raw: raw + b"x", SkipReason.TRUNCATED),
    (lambda raw: raw[:500] + bytes([raw[500] ^ 1]) + raw[501:], SkipReason.CHECKSUM),
    (lambda raw: b"NOTOURS!" + raw[8:], SkipReason.VERSION),
])
def test_damaged_files_are_refused(damage, reason):
    k, raw = block(2)
    with pytest.raises(BlockFileError) as e:
        decode_block(damage(raw), k)
    assert e.value.reason is reason


def test_foreign_files_are_refused():
    k, raw = block(3)
    with pytest.raises(BlockFileError) as e:
        decode_block(raw, FileKey(k.chain_hash, "another-model", k.salt, k.tokens))
    assert e.value.reason is SkipReason.FINGERPRINT
    with pytest.raises(BlockFileError) as e:
        decode_block(raw, FileKey(k.chain_hash, k.fingerprint, salt_digest("tenant-b"), k.tokens))
    assert e.value.reason is SkipReason.SALT
    with pytest.raises(BlockFileError) as e:
        decode_block(raw, key(4))
    assert e.value.reason is SkipReason.KEY
    assert key(3).name != key(3, fp="another-model").name  # models never even share a file name
    assert "tenant-b" not in salt_digest("tenant-b")


def test_directory_is_private_and_writes_are_whole(tmp_path):
    root = tmp_path / "kv"
    store = DiskStore(root, 1 << 20)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    k, raw = block(5)
    assert store.write(k.name, raw)
    assert not store.write(k.name, raw)  # already there
    assert store.read(k.name) == bytearray(raw)
    assert store.read(key(6).name) is None
    assert [p.name for p in (root / "blocks").iterdir()] == [k.name + ".kvb"]  # no temporary file left
    assert store.stats.writes == 1 and store.stats.reads == 1 and store.stats.misses == 1


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    DiskStore(tmp_path, 1 << 20)
    tmp = tmp_path / "blocks" / ".dead-writer.123.tmp"
    tmp.write_bytes(b"partial")
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    DiskStore(tmp_path, 1 << 20)
    assert not tmp.exists()


def test_budget_keeps_the_directory_small_by_lru(tmp_path):
    _, raw = block(0)
    budget = 10 * len(raw) + 100
    store = DiskStore(tmp_path, budget)
    names = []
    for i in range(10):
        k, raw = block(i)
        store.write(k.name, raw)
        names.append(k.name)
        os.utime(store.path(k.name), (1000 + i, 1000 + i))  # distinct, ordered mtimes
    store.read(names[0])  # the oldest becomes the most recently used
    for i in range(10, 14):
        k, raw = block(i)
        assert store.write(k.name, raw)
    total = sum(p.stat().st_size for p in (tmp_path / "blocks").glob("*.kvb"))
    assert total <= budget
    assert store.stats.evictions > 0 and store.stats.bytes == total
    assert store.has(names[0]) and not store.has(names[1])  # LRU: the read one stayed


def test_a_block_larger_than_the_budget_stops_writes_with_one_line(tmp_path, caplog):
    store = DiskStore(tmp_path, 100)
    with caplog.at_level(logging.WARNING, logger="kvengine.disk"):
        for i in range(3):
            k, raw = block(i)
            assert not store.write(k.name, raw)
    assert len(caplog.records) == 1 and "larger than the budget" in caplog.records[0].getMessage()
    assert store.stats.writes_stopped is not None


def test_a_failing_disk_stops_writes_with_one_line(tmp_path, caplog):
    store = DiskStore(tmp_path, 1 << 20)
    blocks = tmp_path / "blocks"
    blocks.rename(tmp_path / "gone")
    blocks.write_bytes(b"")  # writes into blocks/ now fail (ENOTDIR), as on a disk that went away
    with caplog.at_level(logging.WARNING, logger="kvengine.disk"):
        for i in range(3):
            k, raw = block(i)
            assert not store.write(k.name, raw)
            assert store.read(k.name) is None
    assert len(caplog.records) == 1
    assert store.stats.writes_stopped is not None


def test_remove_counts_reasons(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    k, raw = block(1)
    store.write(k.name, raw)
    store.remove(k.name, SkipReason.CHECKSUM.value)
    assert not store.has(k.name) and store.stats.skipped == {"checksum": 1}
    assert store.stats.files == 0 and store.stats.bytes == 0


def test_bad_directories_and_budgets(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_disk_dir(f)
    with pytest.raises(ConfigError, match="not a writable directory"):
        check_disk_dir(f / "sub")
    with pytest.raises(ConfigError, match="positive"):
        check_disk_budget(-1, tmp_path)
    with pytest.raises(ConfigError, match="positive"):
        check_disk_budget(float("nan"), tmp_path)
    with pytest.raises(ConfigError, match="exceeds the size of the file system"):
        check_disk_budget(1e30, tmp_path)
    assert 0 < check_disk_budget(None, tmp_path) <= 16 << 30


WRITER = textwrap.dedent("""
    import sys
    from kvengine.cache.disk_format import FileKey, Part, encode_block
    from kvengine.cache.disk_store import DiskStore
    store = DiskStore(sys.argv[1], int(sys.argv[2]))
    start = int(sys.argv[3])
    print("ready", flush=True)
    for i in range(start, start + int(sys.argv[4])):
        k = FileKey(i.to_bytes(16, "little"), "fp", "", (i,))
        store.write(k.name, encode_block(k, [Part("uint8", (200_000,), bytes([i % 256]) * 200_000)]))
    print("done", flush=True)
""")


def _writer(root: Path, budget: int, start: int, count: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(budget), str(start), str(count)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _check_every_file_whole(root: Path) -> int:
    files = list((root / "blocks").glob("*.kvb"))
    for path in files:
        raw = path.read_bytes()
        header_i = int.from_bytes(bytes.fromhex(raw.split(b'"chain_hash": "')[1][:32].decode()), "little")
        k = FileKey(header_i.to_bytes(16, "little"), "fp", "", (header_i,))
        assert k.name + ".kvb" == path.name
        decode_block(raw, k)  # raises if partial
    return len(files)


def test_a_writer_killed_mid_write_leaves_no_partial_block(tmp_path):
    p = _writer(tmp_path, 1 << 30, 0, 100_000)
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "blocks").glob("*.kvb"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # killed while writing, a few blocks in
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _check_every_file_whole(tmp_path) > 0
    store = DiskStore(tmp_path, 1 << 30)  # a fresh store starts fine beside whatever the writer left
    assert store.stats.files == len(list((tmp_path / "blocks").glob("*.kvb")))


def test_two_processes_share_one_directory_under_budget(tmp_path):
    budget = 40 * 200_300
    writers = [_writer(tmp_path, budget, start, 60) for start in (0, 1000)]
    for p in writers:
        assert p.stdout is not None and p.stdout.readline().strip() == "done"
        p.wait()
    n = _check_every_file_whole(tmp_path)
    total = sum(p.stat().st_size for p in (tmp_path / "blocks").glob("*.kvb"))
    assert 0 < n and total <= budget
    assert not list((tmp_path / "blocks").glob("*.tmp"))

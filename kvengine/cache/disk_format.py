"""The KV disk tier's block file: one KV block in a fixed binary layout (no pickle), verified on every read.

    offset      size  field
    0           8     magic b"KVENGBLK"
    8           4     layout version (uint32, little-endian)
    12          4     header length H (uint32)
    16          8     payload length P (uint64)
    24          H     header: UTF-8 JSON {"fingerprint", "chain_hash", "salt", "tokens", "parts"}
    24 + H      P     payload: the parts' raw little-endian bytes, in header order
    24 + H + P  4     CRC-32 (zlib) of every byte before it

`parts` lists each tensor of the block as {"dtype", "shape"} (the pool's K/V values, or codes and scales for a
quantized KV dtype). A reader checks, in order: length (truncated), checksum (bit flips), layout version,
fingerprint (another model, weights format, dtype, block size, RoPE...), salt digest (another tenant), then the
chain hash and token ids (a renamed file): any failure is a `BlockFileError` carrying its `SkipReason`.
No torch import: the store and its tests handle bytes only.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum

MAGIC = b"KVENGBLK"
LAYOUT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header length, payload length
_CRC = struct.Struct("<I")
MAX_HEADER = 1 << 20  # a header longer than this is not ours


class SkipReason(StrEnum):
    """Why a block file found under a wanted name was not loaded (each is counted)."""

    TRUNCATED = "truncated"  # shorter or longer than its preamble says, or no preamble at all
    CHECKSUM = "checksum"  # CRC-32 mismatch: flipped bits
    VERSION = "version"  # another magic or layout version
    FINGERPRINT = "fingerprint"  # written for another model / weights format / dtype / block size / RoPE
    SALT = "salt"  # written under another cache salt (another tenant)
    KEY = "key"  # another chain hash or other token ids under this name
    READ_ERROR = "read_error"  # the file could not be read (I/O error)


class BlockFileError(Exception):
    def __init__(self, reason: SkipReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(slots=True, frozen=True)
class FileKey:
    """What identifies a block's KV bytes: the chain hash (tokens and salt of it and every block before it),
    the fingerprint of everything else that changes the bytes, the salt's digest and the block's tokens."""

    chain_hash: bytes
    fingerprint: str
    salt: str  # salt_digest(cache_salt)
    tokens: tuple[int, ...]

    @property
    def name(self) -> str:
        """The file's name: fingerprint and chain hash together, so models never share a name."""
        return hashlib.blake2b(self.fingerprint.encode() + self.chain_hash, digest_size=20).hexdigest()


@dataclass(slots=True, frozen=True)
class Part:
    """One tensor of a block as bytes: dtype name (torch's, without "torch."), shape, raw data."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def salt_digest(salt: str | None) -> str:
    """A salt as written to disk: a digest, never the tenant's secret itself ("" without a salt)."""
    return "" if salt is None else hashlib.blake2b(salt.encode(), digest_size=16).hexdigest()


def encode_block(key: FileKey, parts: list[Part]) -> bytes:
    header = json.dumps({"fingerprint": key.fingerprint, "chain_hash": key.chain_hash.hex(), "salt": key.salt,
                         "tokens": list(key.tokens),
                         "parts": [{"dtype": p.dtype, "shape": list(p.shape)} for p in parts]}).encode()
    payload_len = sum(len(p.data) for p in parts)
    body = b"".join([_PREAMBLE.pack(MAGIC, LAYOUT_VERSION, len(header), payload_len), header,
                     *(bytes(p.data) for p in parts)])
    return body + _CRC.pack(zlib.crc32(body))


def decode_block(data: bytes, expected: FileKey) -> list[Part]:
    """The parts of a block file if it is whole and is the block `expected` names; else BlockFileError."""
    if len(data) < _PREAMBLE.size + _CRC.size:
        raise BlockFileError(SkipReason.TRUNCATED, f"{len(data)} bytes")
    magic, version, header_len, payload_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise BlockFileError(SkipReason.VERSION, "not a kvengine block file")
    end = _PREAMBLE.size + header_len + payload_len
    if header_len > MAX_HEADER or len(data) != end + _CRC.size:
        raise BlockFileError(SkipReason.TRUNCATED, f"{len(data)} bytes, the preamble says {end + _CRC.size}")
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[:end]) != crc:
        raise BlockFileError(SkipReason.CHECKSUM)
    if version != LAYOUT_VERSION:
        raise BlockFileError(SkipReason.VERSION, f"layout version {version}, this engine reads {LAYOUT_VERSION}")
    try:
        header = json.loads(data[_PREAMBLE.size:_PREAMBLE.size + header_len])
        fingerprint, salt, chain, tokens = header["fingerprint"], header["salt"], header["chain_hash"], header["tokens"]
        specs = [(str(p["dtype"]), tuple(int(s) for s in p["shape"])) for p in header["parts"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BlockFileError(SkipReason.KEY, f"unreadable header ({e})") from None
    if fingerprint != expected.fingerprint:
        raise BlockFileError(SkipReason.FINGERPRINT)
    if salt != expected.salt:
        raise BlockFileError(SkipReason.SALT)
    if chain != expected.chain_hash.hex() or tuple(tokens) != expected.tokens:
        raise BlockFileError(SkipReason.KEY)
    parts, offset, view = [], _PREAMBLE.size + header_len, memoryview(data)
    for dtype, shape in specs:
        n = _nbytes(dtype, shape)
        parts.append(Part(dtype, shape, view[offset:offset + n]))
        offset += n
    if offset != end:
        raise BlockFileError(SkipReason.KEY, "the parts do not fill the payload")
    return parts


ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int8": 1, "int16": 2, "int32": 4,
              "int64": 8, "float8_e4m3fn": 1}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in ITEM_BYTES:
        raise BlockFileError(SkipReason.KEY, f"unknown dtype {dtype!r}")
    n = ITEM_BYTES[dtype]
    for s in shape:
        n *= s
    return n

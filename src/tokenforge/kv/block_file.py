"""The disk tier's file format: one KV block per file, a fixed header, then the block's bytes.

The header names what the bytes belong to and lets every kind of damage be told apart from a good file:
magic and version, the namespace (model fingerprint, KV dtype, block size: `block_hash.kv_namespace`), the
block's key, the owner it is charged to (a tenant digest, `block_hash.owner_of`), the payload's length and
CRC-32, and a CRC-32 of the header itself. A file that fails any check is never used.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"TFKVBLK1"
VERSION = 1
_FIELDS = struct.Struct("<8sHH32s32s16sQI")  # magic, version, header size, namespace, key, owner, length, crc
HEADER_SIZE = _FIELDS.size + 4  # + the header's own CRC-32


class BlockFileError(ValueError):
    """A block file that must not be used; the message says why."""


@dataclass(frozen=True)
class BlockHeader:
    namespace: bytes
    key: bytes
    owner: bytes
    payload_len: int
    payload_crc: int


def encode_header(namespace: bytes, key: bytes, owner: bytes, payload) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, HEADER_SIZE, namespace, key, owner, len(payload), zlib.crc32(payload))
    return fields + struct.pack("<I", zlib.crc32(fields))


def decode_header(data: bytes) -> BlockHeader:
    if len(data) < HEADER_SIZE:
        raise BlockFileError(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    fields, (crc,) = data[:_FIELDS.size], struct.unpack("<I", data[_FIELDS.size:HEADER_SIZE])
    magic, version, size, namespace, key, owner, length, payload_crc = _FIELDS.unpack(fields)
    if magic != MAGIC:
        raise BlockFileError("not a tokenforge KV block file (bad magic)")
    if version != VERSION or size != HEADER_SIZE:
        raise BlockFileError(f"block file version {version} is not {VERSION}")
    if zlib.crc32(fields) != crc:
        raise BlockFileError("header checksum mismatch")
    return BlockHeader(namespace, key, owner, length, payload_crc)


def check_header(header: BlockHeader, namespace: bytes, key: bytes | None, payload_len: int) -> None:
    """Raise unless the header belongs to this namespace (and key) and announces the expected length."""
    if header.namespace != namespace:
        raise BlockFileError("written by another model, KV dtype or block size (foreign namespace)")
    if key is not None and header.key != key:
        raise BlockFileError("holds another block than its name says")
    if header.payload_len != payload_len:
        raise BlockFileError(f"payload of {header.payload_len} bytes, expected {payload_len}")


def check_payload(header: BlockHeader, payload) -> None:
    if len(payload) != header.payload_len:
        raise BlockFileError(f"truncated: {len(payload)} of {header.payload_len} payload bytes")
    if zlib.crc32(payload) != header.payload_crc:
        raise BlockFileError("payload checksum mismatch")

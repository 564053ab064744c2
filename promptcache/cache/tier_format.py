"""The self-describing object a lower tier stores for one KV block (disk file, Redis value).

Layout (little-endian), then the payload (the block's K/V bytes as the engine lays them out)::

    magic "PCKVBLK\\0" | version u16 | header length u16 | flags u32
    namespace digest 32 | block hash 32 | KV layout digest 32
    ttl_s f64 | written_at f64 (unix time) | payload length u64 | payload crc32 u32 | header crc32 u32

A reader checks everything before a byte reaches the cache: magic, version, the header's own
checksum, that the namespace, block hash and layout are the ones it asked for, the payload length
(a torn or truncated object is shorter) and the payload checksum. Any mismatch is ``CorruptObject``:
the object is discarded and counted, never served.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from promptcache.cache.hashing import BlockHash

MAGIC = b"PCKVBLK\x00"
VERSION = 1
_HEAD = struct.Struct("<8sHHI32s32s32sddQI")  # everything before the header's own crc
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size


class CorruptObject(ValueError):
    """A stored object that must not be served: torn, truncated, flipped, or not what was asked."""


def digest(*parts: str) -> bytes:
    """A 32-byte digest of framed strings (the namespace key, the KV layout's fields)."""
    h = hashlib.blake2b(digest_size=32)
    for p in parts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.digest()


def layout_digest(kv_dtype: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                  layout: str) -> bytes:
    """What a block's payload bytes mean: a reader with another layout must not interpret them."""
    return digest("kv-layout", kv_dtype, str(num_layers), str(num_kv_heads), str(head_dim), str(block_size),
                  layout, "little-endian")


@dataclass(frozen=True)
class ObjectHeader:
    namespace: bytes
    block_hash: BlockHash
    layout: bytes
    ttl_s: float
    written_at: float
    payload_len: int
    payload_crc: int

    @property
    def object_len(self) -> int:
        return HEADER_SIZE + self.payload_len


def crc32(chunks: Iterable[memoryview | bytes]) -> int:
    crc = 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
    return crc


def encode_header(namespace: bytes, block_hash: BlockHash, layout: bytes, ttl_s: float, written_at: float,
                  payload: memoryview | bytes) -> bytes:
    mv = memoryview(payload).cast("B")
    head = _HEAD.pack(MAGIC, VERSION, HEADER_SIZE, 0, namespace, block_hash, layout, float(ttl_s),
                      float(written_at), mv.nbytes, zlib.crc32(mv))
    return head + _CRC.pack(zlib.crc32(head))


def decode_header(buf: bytes | memoryview) -> ObjectHeader:
    """The header at the start of ``buf``; ``CorruptObject`` unless it is intact."""
    if len(buf) < HEADER_SIZE:
        raise CorruptObject(f"object shorter than its header ({len(buf)} < {HEADER_SIZE} bytes)")
    head = bytes(buf[: _HEAD.size])
    magic, version, header_len, _flags, ns, bh, layout, ttl_s, written_at, plen, pcrc = _HEAD.unpack(head)
    if magic != MAGIC:
        raise CorruptObject("bad magic: not a promptcache KV object")
    if version != VERSION or header_len != HEADER_SIZE:
        raise CorruptObject(f"format version {version} (header {header_len} bytes); this build reads {VERSION}")
    (stored_crc,) = _CRC.unpack(bytes(buf[_HEAD.size : HEADER_SIZE]))
    if zlib.crc32(head) != stored_crc:
        raise CorruptObject("header checksum mismatch")
    return ObjectHeader(ns, BlockHash(bh), layout, ttl_s, written_at, plen, pcrc)


def verify(obj: bytes | memoryview, namespace: bytes, block_hash: BlockHash, layout: bytes,
           payload_len: int) -> memoryview:
    """The payload of a whole object, after every check; ``CorruptObject`` says which one failed."""
    header = decode_header(obj)
    if header.block_hash != block_hash:
        raise CorruptObject("object holds another block")
    if header.namespace != namespace:
        raise CorruptObject("object belongs to another model namespace")
    if header.layout != layout:
        raise CorruptObject("object has another KV layout (dtype, layers, heads, head dim or block size)")
    if header.payload_len != payload_len:
        raise CorruptObject(f"payload is {header.payload_len} bytes, a block here is {payload_len}")
    if len(obj) != header.object_len:
        raise CorruptObject(f"object is {len(obj)} bytes, its header says {header.object_len} (torn or truncated)")
    payload = memoryview(obj)[HEADER_SIZE:]
    if zlib.crc32(payload) != header.payload_crc:
        raise CorruptObject("payload checksum mismatch")
    return payload

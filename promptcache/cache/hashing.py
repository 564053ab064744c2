"""Content addresses of KV blocks.

A full block's hash is BLAKE2b(parent hash, the block's token ids, tagged extra keys), keyed with
a fixed, configured seed so the same tokens give the same address in every process (later tiers —
disk, Redis — look blocks up by it). The chain starts from a *namespace* hash of the model identity
and the tenant, so two tenants (or two models) never address the same block.

Every field is framed as ``tag | length | bytes``: a tenant named "ab" with no extra key can never
collide with a tenant "a" whose extra key is "b".
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

DEFAULT_HASH_SEED = b"promptcache-v1"
DIGEST_SIZE = 32

# One byte per kind of field; never reuse a tag for another meaning.
TAG_NAMESPACE = b"N"
TAG_MODEL = b"M"
TAG_TENANT = b"T"
TAG_TOKENS = b"K"
TAG_EXTRA = b"X"


def _frame(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(8, "little") + payload


def _digest(seed: bytes, parts: Iterable[bytes]) -> BlockHash:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, key=seed[:64])
    for part in parts:
        h.update(part)
    return BlockHash(h.digest())


def namespace_hash(model_id: str, tenant: str | None, seed: bytes = DEFAULT_HASH_SEED) -> BlockHash:
    """The root every request's chain starts from: (model identity, tenant)."""
    return _digest(
        seed,
        (
            _frame(TAG_NAMESPACE, b""),
            _frame(TAG_MODEL, model_id.encode()),
            _frame(TAG_TENANT, (tenant or "").encode()),
        ),
    )


def hash_block(
    parent: BlockHash,
    token_ids: Sequence[int],
    extra_keys: Sequence[str] = (),
    seed: bytes = DEFAULT_HASH_SEED,
) -> BlockHash:
    # 'q' (int64) is fixed-width, so token sequences of different lengths never frame the same bytes
    tokens = array("q", token_ids).tobytes()
    parts = [parent, _frame(TAG_TOKENS, tokens)]
    parts.extend(_frame(TAG_EXTRA, k.encode()) for k in extra_keys)
    return _digest(seed, parts)


def hash_blocks(
    root: BlockHash,
    token_ids: Sequence[int],
    block_size: int,
    start_block: int = 0,
    parent: BlockHash | None = None,
    seed: bytes = DEFAULT_HASH_SEED,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from block ``start_block`` on.

    ``parent`` is the hash of block ``start_block - 1`` (``root`` when starting at block 0).
    """
    out: list[BlockHash] = []
    prev = parent if parent is not None else root
    for b in range(start_block, len(token_ids) // block_size):
        prev = hash_block(prev, token_ids[b * block_size : (b + 1) * block_size], seed=seed)
        out.append(prev)
    return out

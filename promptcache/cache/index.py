"""Prefix indexes: which computed blocks can be found by content hash, and which are being computed
right now by a request that others should wait for (in-flight sharing).

``PREFIX_INDEXES[name]()`` builds one; ``"none"`` is the null object for caching off — it finds
nothing and records nothing, so the manager and the pool never branch on whether caching is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from promptcache.cache.block import Block
from promptcache.cache.hashing import BlockHash


class PrefixIndex(Protocol):
    def lookup(self, block_hash: BlockHash) -> Block | None:
        """The block holding this content, or None."""
        ...

    def insert(self, block: Block, block_hash: BlockHash) -> bool:
        """Make a computed block findable; False (block untouched) if another block has the content
        already, or if this index keeps nothing."""
        ...

    def remove(self, block: Block) -> None:
        """The block's content is gone (evicted or reset): forget it."""
        ...

    def entries(self) -> Iterator[tuple[BlockHash, Block]]: ...

    def __len__(self) -> int: ...

    # in-flight sharing: hash -> the request computing it now
    def owner(self, block_hash: BlockHash) -> str | None: ...

    def promise(self, block_hash: BlockHash, request_id: str) -> bool:
        """``request_id`` will compute this content: others should wait. False if not recorded
        (someone else promised it, it is cached already, or this index keeps nothing)."""
        ...

    def settle(self, block_hash: BlockHash, request_id: str) -> None:
        """The promise is kept (committed) or broken (freed); a no-op unless ``request_id`` made it."""
        ...

    def promises(self) -> Iterator[tuple[BlockHash, str]]: ...

    def clear(self) -> None:
        """Forget every promise (cached blocks are dropped through ``remove``)."""
        ...


class HashIndex:
    """A dict from content hash to block, plus the in-flight promises."""

    def __init__(self) -> None:
        self._blocks: dict[BlockHash, Block] = {}
        self._inflight: dict[BlockHash, str] = {}

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self._blocks.get(block_hash)

    def insert(self, block: Block, block_hash: BlockHash) -> bool:
        if block_hash in self._blocks:
            return False
        block.block_hash = block_hash
        self._blocks[block_hash] = block
        return True

    def remove(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._blocks[block.block_hash]
        block.block_hash = None

    def entries(self) -> Iterator[tuple[BlockHash, Block]]:
        return iter(list(self._blocks.items()))

    def __len__(self) -> int:
        return len(self._blocks)

    def owner(self, block_hash: BlockHash) -> str | None:
        return self._inflight.get(block_hash)

    def promise(self, block_hash: BlockHash, request_id: str) -> bool:
        if block_hash in self._inflight or block_hash in self._blocks:
            return False
        self._inflight[block_hash] = request_id
        return True

    def settle(self, block_hash: BlockHash, request_id: str) -> None:
        if self._inflight.get(block_hash) == request_id:
            del self._inflight[block_hash]

    def promises(self) -> Iterator[tuple[BlockHash, str]]:
        return iter(list(self._inflight.items()))

    def clear(self) -> None:
        self._inflight.clear()


class NullIndex:
    """Caching off: nothing is ever found, kept or promised."""

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return None

    def insert(self, block: Block, block_hash: BlockHash) -> bool:
        return False

    def remove(self, block: Block) -> None:
        raise AssertionError("the null index holds no block")

    def entries(self) -> Iterator[tuple[BlockHash, Block]]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def owner(self, block_hash: BlockHash) -> str | None:
        return None

    def promise(self, block_hash: BlockHash, request_id: str) -> bool:
        return False

    def settle(self, block_hash: BlockHash, request_id: str) -> None:
        pass

    def promises(self) -> Iterator[tuple[BlockHash, str]]:
        return iter(())

    def clear(self) -> None:
        pass


PREFIX_INDEXES: dict[str, type[HashIndex] | type[NullIndex]] = {"hash": HashIndex, "none": NullIndex}

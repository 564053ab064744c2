"""The disk tier: one file per block, crash-safe, rebuilt from its files on start-up.

Layout under the directory::

    objects/<first 2 hex digits>/<block hash hex>.kv   committed objects (cache/tier_format.py)
    tmp/<hash>.<pid>.<random>.tmp                      objects being written

Commit protocol: write a unique temp file, fsync it, rename it over the final name (atomic: a
reader sees the old object or the new one, never half), fsync the directory. Two writers of one
block (two servers on one directory) each write their own temp file; the last rename wins, and
both objects are whole.

Start-up rebuilds the index from the objects' headers: a temp file (a write a crash interrupted),
a bad header or a file whose length disagrees with its header is deleted and counted as
``discarded``. Payload checksums are verified on every load (TierStack), so a flipped byte found
later is a miss, never served.

Capacity is in bytes. Eviction is by last use (a file's mtime, refreshed on every load and touch,
so the order survives restarts), except that objects inside their retention (``ttl_s`` after their
last use) go only after every object outside one, earliest deadline first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tier_format import HEADER_SIZE, CorruptObject, decode_header
from promptcache.cache.tiers import TierError

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    size: int
    last_used: float  # unix time
    ttl_s: float

    def deadline(self) -> float:
        return self.last_used + self.ttl_s


class DiskTier:
    name = "disk"

    def __init__(self, directory: str | Path, capacity_bytes: int, fsync: bool = True,
                 clock: Callable[[], float] = time.time, write_delay_s: float = 0.0) -> None:
        if capacity_bytes < 1:
            raise ValueError("the disk cache size must be at least one byte")
        self.root = Path(directory)
        self.objects, self.tmp = self.root / "objects", self.root / "tmp"
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot use {self.root} as the disk cache: {e.strerror or e}") from e
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.clock = clock
        self.write_delay_s = write_delay_s  # a test hook: a pause mid-write, to crash inside it
        self._index: OrderedDict[BlockHash, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.discarded = 0  # torn, truncated or unreadable objects deleted at start-up
        self.evicted = 0
        self._rebuild()

    # ---- start-up ------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        for stray in self.tmp.iterdir():
            if _abandoned(stray, self.clock()):
                self._discard(stray, "an interrupted write")
        found: list[tuple[float, BlockHash, _Entry]] = []
        for sub in self.objects.iterdir():
            for path in sub.glob("*.kv") if sub.is_dir() else ():
                entry = self._read_entry(path)
                if entry is not None:
                    found.append((entry.last_used, BlockHash(bytes.fromhex(path.stem)), entry))
        for _, h, entry in sorted(found, key=lambda x: x[0]):
            self._index[h] = entry
            self._bytes += entry.size
        with self._lock:
            self._evict_over_capacity()
        if self.discarded:
            log.warning("disk cache %s: discarded %d torn or corrupt objects", self.root, self.discarded)

    def _read_entry(self, path: Path) -> _Entry | None:
        try:
            with path.open("rb") as f:
                head = f.read(HEADER_SIZE)
                st = os.fstat(f.fileno())
            header = decode_header(head)
            if header.block_hash.hex() != path.stem:
                raise CorruptObject("file name and header disagree")
            if st.st_size != header.object_len:
                raise CorruptObject(f"{st.st_size} bytes, header says {header.object_len}")
        except (OSError, ValueError) as e:  # CorruptObject is a ValueError; so is a bad hex name
            self._discard(path, str(e))
            return None
        return _Entry(st.st_size, st.st_mtime, header.ttl_s)

    def _discard(self, path: Path, why: str) -> None:
        log.info("disk cache: deleting %s (%s)", path.name, why)
        self.discarded += 1
        with contextlib.suppress(OSError):
            path.unlink()

    # ---- the Tier interface --------------------------------------------------------------------

    def _path(self, h: BlockHash) -> Path:
        x = h.hex()
        return self.objects / x[:2] / f"{x}.kv"

    def _known(self, h: BlockHash) -> bool:
        """In the index, or written by another process since start-up (then indexed now)."""
        if h in self._index:
            return True
        path = self._path(h)
        try:
            st = path.stat()
        except OSError:
            return False
        with self._lock:
            if h not in self._index:
                self._index[h] = _Entry(st.st_size, st.st_mtime, 0.0)
                self._bytes += st.st_size
                self._evict_over_capacity()
        return h in self._index

    def chain(self, hashes: Sequence[BlockHash]) -> int:
        n = 0
        for h in hashes:
            if not self._known(h):
                break
            n += 1
        return n

    def get_many(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        """Reads only: recency is refreshed by the ``touch`` the stack sends once an object verified
        (a corrupt object must not look recently used)."""
        out: list[bytes | None] = []
        for h in hashes:
            try:
                out.append(self._path(h).read_bytes())
            except FileNotFoundError:
                self._forget(h)
                out.append(None)
            except OSError as e:
                raise TierError(f"disk cache read failed: {e}") from e
        return out

    def put(self, block_hash: BlockHash, header: bytes, payload: memoryview, ttl_s: float) -> None:
        path = self._path(block_hash)
        tmp = self.tmp / f"{block_hash.hex()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        size = len(header) + payload.nbytes
        try:
            path.parent.mkdir(exist_ok=True)
            with tmp.open("wb") as f:
                f.write(header)
                if self.write_delay_s:
                    half = payload.nbytes // 2
                    f.write(payload[:half])
                    f.flush()
                    time.sleep(self.write_delay_s)
                    f.write(payload[half:])
                else:
                    f.write(payload)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise TierError(f"disk cache write failed: {e.strerror or e}") from e
        with self._lock:
            old = self._index.pop(block_hash, None)
            if old is not None:
                self._bytes -= old.size
            self._index[block_hash] = _Entry(size, self.clock(), ttl_s)
            self._bytes += size
            self._evict_over_capacity()

    def touch(self, block_hash: BlockHash, ttl_s: float) -> None:
        now = self.clock()
        with self._lock:
            entry = self._index.get(block_hash)
            if entry is None:
                return
            entry.ttl_s = max(entry.ttl_s, ttl_s)
            entry.last_used = now
            self._index.move_to_end(block_hash)
        with contextlib.suppress(OSError):
            os.utime(self._path(block_hash), (now, now))

    def delete(self, block_hash: BlockHash) -> None:
        self._forget(block_hash)
        with contextlib.suppress(FileNotFoundError):
            self._path(block_hash).unlink()

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {"objects": len(self._index), "bytes_stored": self._bytes, "capacity_bytes": self.capacity,
                    "evicted": self.evicted, "discarded": self.discarded}

    def stored_hashes(self) -> list[BlockHash]:
        with self._lock:
            return list(self._index)

    def close(self) -> None:
        pass

    # ---- internals -----------------------------------------------------------------------------

    def _forget(self, h: BlockHash) -> None:
        with self._lock:
            entry = self._index.pop(h, None)
            if entry is not None:
                self._bytes -= entry.size

    def _evict_over_capacity(self) -> None:
        """Under the lock: drop least recently used objects outside their retention, then retained
        ones by earliest deadline, until the bytes fit."""
        if self._bytes <= self.capacity:
            return
        now = self.clock()
        while self._bytes > self.capacity and self._index:
            # usually the least recently used object is outside its retention: O(1)
            victim = next((h for h, e in self._index.items() if e.deadline() <= now), None)
            if victim is None:
                victim = min(self._index.items(), key=lambda kv: kv[1].deadline())[0]
            self._drop(victim)

    def _drop(self, h: BlockHash) -> None:
        entry = self._index.pop(h)
        self._bytes -= entry.size
        self.evicted += 1
        with contextlib.suppress(OSError):
            self._path(h).unlink()


STALE_TMP_S = 600.0  # a temp file this old is abandoned even if its writer's pid is alive (another host)


def _abandoned(path: Path, now: float) -> bool:
    """A temp file whose writer is gone: its pid (in the name) is not running here, or it is old.
    Another live server's write in progress on a shared directory is left alone."""
    try:
        pid = int(path.name.split(".")[1])
        age = now - path.stat().st_mtime
    except (IndexError, ValueError, OSError):
        return True
    if age > STALE_TMP_S:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return False  # alive (a reused pid is caught by the age rule)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

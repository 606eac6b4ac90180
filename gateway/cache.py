"""The tile cache: diskcache on disk (LRU, size-limited) with a small in-memory hot tier.

Disk is the cache of record: it survives restarts, is shared by every worker process on the
host (diskcache is process-safe) and evicts least-recently-used entries past
``size_limit_bytes``. diskcache's LRU policy writes the access time on every disk read, which
costs more than the read itself, so each process keeps the most recently served entries in
memory too (``memory_bytes``, 0 turns it off). A memory hit does not touch disk, so the disk's
recency order lags by what the memory tier absorbs; freshness is unaffected because every
entry carries its own ``fresh_until``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import diskcache


@dataclass(frozen=True, slots=True)
class CachedTile:
    """A stored tile and its HTTP metadata.

    Attributes:
        body: the encoded image bytes (for an empty tile, the gateway's own blank image).
        media_type: ``image/png``, ``image/jpeg`` or ``image/webp``.
        etag: strong entity tag, quoted, hashing ``body``.
        fresh_until: Unix time (seconds) after which the entry must be fetched again.
        empty: True when the upstream reported no data for this tile (negative caching).
        fetch_s: how long the upstream took to produce it, seconds (0 if it did not).
    """

    body: bytes
    media_type: str
    etag: str
    fresh_until: float
    empty: bool = False
    fetch_s: float = 0.0

    def is_fresh(self, now: float | None = None) -> bool:
        """Whether the entry is within its TTL at ``now`` (Unix seconds)."""
        return (time.time() if now is None else now) < self.fresh_until

    def max_age(self, now: float | None = None) -> int:
        """Seconds of freshness left, for ``Cache-Control: max-age`` (never negative)."""
        return max(0, int(self.fresh_until - (time.time() if now is None else now)))


def strong_etag(body: bytes) -> str:
    """A strong, quoted ETag for ``body`` (BLAKE2b, 128 bits, hex)."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def make_tile(
    body: bytes,
    media_type: str,
    ttl_s: float,
    *,
    empty: bool = False,
    fetch_s: float = 0.0,
    now: float | None = None,
) -> CachedTile:
    """A :class:`CachedTile` fresh for ``ttl_s`` seconds from ``now``."""
    start = time.time() if now is None else now
    return CachedTile(body, media_type, strong_etag(body), start + ttl_s, empty, fetch_s)


class _MemoryTier:
    """Bytes-bounded LRU of recently served tiles, private to one process."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._items: OrderedDict[str, CachedTile] = OrderedDict()

    def get(self, key: str) -> CachedTile | None:
        tile = self._items.get(key)
        if tile is not None:
            self._items.move_to_end(key)
        return tile

    def put(self, key: str, tile: CachedTile) -> None:
        cost = len(tile.body)
        if cost > self.capacity // 8:
            return
        self.discard(key)
        self._items[key] = tile
        self.size += cost
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old.body)

    def discard(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old.body)

    def clear(self) -> None:
        self._items.clear()
        self.size = 0


class TileCache:
    """Tiles by cache key (see :meth:`gateway.layers.Layer.cache_key`).

    Args:
        directory: diskcache directory, created if missing.
        size_limit_bytes: disk size limit; least-recently-used entries are evicted past it.
        memory_bytes: capacity of the per-process memory tier; 0 disables it.

    Raises:
        OSError: the directory cannot be created or opened.
    """

    def __init__(self, directory: Path, size_limit_bytes: int, memory_bytes: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._disk = diskcache.Cache(
            str(directory), size_limit=size_limit_bytes, eviction_policy="least-recently-used"
        )
        self._memory = _MemoryTier(memory_bytes) if memory_bytes > 0 else None

    def get_memory(self, key: str) -> CachedTile | None:
        """The entry for ``key`` if this process's memory tier holds it (no disk access)."""
        return self._memory.get(key) if self._memory is not None else None

    def claim(self, key: str, seconds: float) -> bool:
        """Atomically claim the fetch of ``key`` for this process for up to ``seconds``.

        False when another process holds the claim (cross-process single-flight).
        """
        return bool(self._disk.add(("claim", key), os.getpid(), expire=seconds))

    def claimed(self, key: str) -> bool:
        """Whether a live process holds the claim on ``key`` now (a dead holder's claim is
        dropped)."""
        pid = self._disk.get(("claim", key))
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self._disk.delete(("claim", key))
            return False
        except PermissionError:
            pass  # alive, owned by another user
        return True

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key``."""
        self._disk.delete(("claim", key))

    def get(self, key: str, *, from_disk: bool = False) -> CachedTile | None:
        """The entry for ``key``, fresh or not, or None.

        Memory first, then disk; ``from_disk=True`` skips memory, to see what another
        worker process stored since.
        """
        if self._memory is not None and not from_disk:
            tile = self._memory.get(key)
            if tile is not None:
                return tile
        tile = self._disk.get(key)
        if not isinstance(tile, CachedTile):
            return None
        if self._memory is not None:
            self._memory.put(key, tile)
        return tile

    def set(self, key: str, tile: CachedTile, keep_s: float) -> None:
        """Store ``tile``; disk drops it ``keep_s`` seconds from now (TTL plus stale windows)."""
        self._disk.set(key, tile, expire=keep_s)
        if self._memory is not None:
            self._memory.put(key, tile)

    def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers."""
        self._disk.delete(key)
        if self._memory is not None:
            self._memory.discard(key)

    def probe(self) -> bool:
        """Whether the disk tier accepts a write and reads it back (for readiness checks)."""
        value = f"probe-{time.time()}"
        try:
            self._disk.set("readyz-probe", value, expire=60)
            return self._disk.get("readyz-probe") == value
        except OSError:
            return False

    def volume_bytes(self) -> int:
        """Bytes the disk tier uses (SQLite plus value files)."""
        return int(self._disk.volume())

    def close(self) -> None:
        """Close the disk tier and drop the memory tier."""
        if self._memory is not None:
            self._memory.clear()
        self._disk.close()

"""The tile cache: diskcache on disk (LRU, size-limited) with a small in-memory hot tier.

Disk is the cache of record: it survives restarts, is shared by every worker process on the
host (diskcache is process-safe) and evicts least-recently-used entries past
``size_limit_bytes``. diskcache's LRU policy writes the access time on every disk read, which
costs more than the read itself, so each process keeps the entries it serves again and again
in memory too (``memory_bytes``, 0 turns it off; a segmented LRU, :class:`_MemoryTier`, so a
pass over tiles asked for once does not push them out). A memory hit does not touch disk, so
the disk's
recency order lags by what the memory tier absorbs; freshness is unaffected because every
entry carries its own ``fresh_until``.

Purging (:meth:`TileCache.purge`) deletes a layer's keys from disk and records the layer's
"purged at" Unix time in the disk tier (one small dict under :data:`PURGES_KEY`). Other
processes' memory tiers cannot see the deletion, so each memory entry remembers when it
entered memory, and a memory hit compares that with its layer's purge time, which each
process re-reads from disk at most once per :data:`PURGE_CHECK_S`: an entry loaded before
the purge is dropped and the disk consulted instead. A purge therefore reaches every worker
within about a second; the hit path stays a dict lookup and a comparison.

Disk work from the tile service runs in one I/O thread per cache (:meth:`TileCache.load`,
:meth:`TileCache.store`, :meth:`TileCache.run`): a flood of cache misses then costs the event
loop a thread hop per disk operation instead of SQLite transactions and value pickling, and
memory hits never wait behind it. The blocking methods (``get``, ``set``...) remain for
commands and threads.

The disk tier never fails a request. When it cannot write (disk full, read-only, damaged), a
fetched tile is still served (and kept in the memory tier) but not stored: the first failure
logs one WARNING line, ``gateway_cache_write_failures_total`` counts each, the
``gateway_cache_writable`` gauge shows 0 and ``/readyz`` answers 503 until a write works
again. A read that fails, or an entry that no longer reads back intact (a truncated or
damaged value, or one in an older format: :data:`ENTRY_FORMAT`), is a cache miss; such an
entry is deleted and counted in
``gateway_cache_damaged_entries_total``. A damaged database is rebuilt when the cache opens
(:func:`gateway.storage.diskcaches.open_diskcache`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import diskcache

from gateway import metrics
from gateway.clock import Clock, system_clock
from gateway.storage.claims import Claims
from gateway.storage.diskcaches import STORE_ERRORS, WriteHealth, open_diskcache

log = logging.getLogger("gateway.cache")

T = TypeVar("T")

PROBE_BYTES = 40 << 10
"""Size of the value :meth:`TileCache.probe` writes, bytes: above diskcache's 32 KiB
threshold, so it needs room for a value file as well as for a database row."""

PURGES_KEY = "meta/purged-at"
"""Disk-tier key of ``{layer name: Unix time of its last purge}``, shared by all processes."""

PURGE_CHECK_S = 1.0
"""How often a process re-reads the purge times from disk, at most, seconds."""

PURGE_BATCH = 500
"""Keys deleted per disk transaction while purging (keeps each write lock short)."""


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
        headers: its representation headers, ready to send (``ETag``, ``Content-Type``;
            RFC 9110 sections 8.8.3 and 8.3), built once when the entry is made, so a cache
            hit does not assemble them again. Not stored: derived from the fields above.
    """

    body: bytes
    media_type: str
    etag: str
    fresh_until: float
    empty: bool = False
    fetch_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        headers = (("ETag", self.etag), ("Content-Type", self.media_type))
        object.__setattr__(self, "headers", headers)

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


ENTRY_FORMAT = b"geopera-gateway tile 1\n"
"""First bytes of every stored tile entry: the format's name and version, one line.

An entry is plain bytes, never a pickled class, so renaming a module cannot make stored
tiles unreadable: this line, one line of JSON metadata (``media_type``, ``etag``,
``fresh_until`` in Unix seconds, ``empty``, ``fetch_s`` in seconds and ``size``, the body's
length in bytes), then the body. An entry in any other format, of another version, or whose
body is not ``size`` bytes long (truncated) does not decode and is a cache miss."""


class EntryFormatError(ValueError):
    """A stored value is not a tile entry of :data:`ENTRY_FORMAT` (old format, damaged or
    truncated)."""


def encode_entry(tile: CachedTile) -> bytes:
    """``tile`` as a stored entry (:data:`ENTRY_FORMAT`): format line, metadata, body."""
    meta = {
        "media_type": tile.media_type,
        "etag": tile.etag,
        "fresh_until": tile.fresh_until,
        "empty": tile.empty,
        "fetch_s": tile.fetch_s,
        "size": len(tile.body),
    }
    return b"".join((ENTRY_FORMAT, json.dumps(meta).encode(), b"\n", tile.body))


def decode_entry(value: object) -> CachedTile:
    """The tile in a stored entry made by :func:`encode_entry`.

    Raises:
        EntryFormatError: ``value`` is not such an entry (another format or version, bad
            metadata, or a body of the wrong length).
    """
    if not isinstance(value, bytes) or not value.startswith(ENTRY_FORMAT):
        raise EntryFormatError(f"not a {ENTRY_FORMAT.strip().decode()!r} entry")
    end = value.find(b"\n", len(ENTRY_FORMAT))
    try:
        meta = json.loads(value[len(ENTRY_FORMAT) : end])
        body = value[end + 1 :]
        tile = CachedTile(
            body,
            str(meta["media_type"]),
            str(meta["etag"]),
            float(meta["fresh_until"]),
            bool(meta["empty"]),
            float(meta["fetch_s"]),
        )
        size = int(meta["size"])
    except (ValueError, TypeError, KeyError) as exc:
        raise EntryFormatError(f"unreadable metadata ({type(exc).__name__})") from None
    if end < 0 or size != len(body):
        raise EntryFormatError(f"body of {len(body)} bytes, expected {size}")
    return tile


def _layer_of(key: str) -> str:
    """The layer name in a tile key ``tile/<layer>/...``; ``""`` for any other key."""
    if not key.startswith("tile/"):
        return ""
    return key.split("/", 2)[1]


class _MemoryTier:
    """Bytes-bounded segmented LRU of recently served tiles, private to one process.

    Scan-resistant: a tile enters the *probation* segment (the first time it is stored or
    read from disk) and moves to the *protected* segment only when it is served from memory
    again. Eviction takes probation's least recently used entry first; protected's own
    least recently used entries are moved back to probation once protected holds more than
    :data:`PROTECTED_SHARE` of the capacity. So a pass over many tiles that are asked for
    once (a crawler, an export, a client walking a large area) churns probation and leaves
    the tiles that are asked for again in memory, where a plain LRU would evict them all.

    Keys evicted from probation are remembered (*ghosts*, keys and sizes only, as many
    bytes' worth as the capacity and at most :data:`GHOST_KEYS`): a tile that comes back
    while remembered was asked for twice, and goes straight to protected if protected has
    room (never pushing anything out of it). That is what keeps a cycle over more tiles than
    fit in memory partly served from memory: a plain LRU, or probation alone, evicts each
    tile just before it comes round again.

    Each entry is ``(tile, loaded_at, layer)``: ``loaded_at`` is the Unix time at which the
    tile was read from disk or stored (before the read, so it never postdates the disk state
    it reflects), compared with the layer's purge time on every hit. Sizes are body bytes.
    """

    PROTECTED_SHARE = 0.8
    """Share of the capacity that tiles served from memory again may hold."""

    GHOST_KEYS = 65_536
    """Most keys remembered after their eviction from probation."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.protected_capacity = int(capacity_bytes * self.PROTECTED_SHARE)
        self.size = 0  # both segments
        self.protected_size = 0
        self._probation: OrderedDict[str, tuple[CachedTile, float, str]] = OrderedDict()
        self._protected: OrderedDict[str, tuple[CachedTile, float, str]] = OrderedDict()
        self._ghosts: OrderedDict[str, int] = OrderedDict()  # evicted key: its body bytes
        self._ghost_bytes = 0

    def get(self, key: str) -> tuple[CachedTile, float, str] | None:
        """The entry for ``key``, now the most recently used; an entry on probation is
        promoted to protected (its second use)."""
        protected = self._protected
        entry = protected.get(key)
        if entry is not None:
            protected.move_to_end(key)
            return entry
        entry = self._probation.pop(key, None)
        if entry is None:
            return None
        protected[key] = entry
        self.protected_size += len(entry[0].body)
        while self.protected_size > self.protected_capacity:
            old_key, old = protected.popitem(last=False)
            self.protected_size -= len(old[0].body)
            self._probation[old_key] = old  # demoted: the most recent entry on probation
        return entry

    def put(self, key: str, tile: CachedTile, loaded_at: float) -> None:
        """Hold ``tile`` for ``key`` (replacing what was held: a protected entry stays
        protected, anything else goes on probation); tiles over an eighth of the capacity
        are not held."""
        cost = len(tile.body)
        if cost > self.capacity // 8:
            self.discard(key)
            return
        entry = (tile, loaded_at, _layer_of(key))
        old = self._protected.get(key)
        if old is not None:
            self._protected[key] = entry
            self._protected.move_to_end(key)
            change = cost - len(old[0].body)
            self.size += change
            self.protected_size += change
        else:
            old = self._probation.pop(key, None)
            if old is not None:
                self.size -= len(old[0].body)
            ghost = self._ghosts.pop(key, None)
            if ghost is not None:
                self._ghost_bytes -= ghost
            if ghost is not None and self.protected_size + cost <= self.protected_capacity:
                self._protected[key] = entry  # asked for again: its second use
                self.protected_size += cost
            else:
                self._probation[key] = entry
            self.size += cost
        while self.size > self.capacity:
            if self._probation:
                evicted_key, (evicted, _, _) = self._probation.popitem(last=False)
                self._remember(evicted_key, len(evicted.body))
            else:
                _, (evicted, _, _) = self._protected.popitem(last=False)
                self.protected_size -= len(evicted.body)
            self.size -= len(evicted.body)

    def _remember(self, key: str, cost: int) -> None:
        """Keep ``key`` (``cost`` body bytes) among the ghosts, forgetting the oldest past
        the capacity's worth of bytes or :data:`GHOST_KEYS` keys."""
        ghosts = self._ghosts
        ghosts[key] = cost
        self._ghost_bytes += cost
        while self._ghost_bytes > self.capacity or len(ghosts) > self.GHOST_KEYS:
            _, forgotten = ghosts.popitem(last=False)
            self._ghost_bytes -= forgotten

    def discard(self, key: str) -> None:
        old = self._probation.pop(key, None)
        if old is None:
            old = self._protected.pop(key, None)
            if old is None:
                return
            self.protected_size -= len(old[0].body)
        self.size -= len(old[0].body)

    def __contains__(self, key: str) -> bool:
        return key in self._protected or key in self._probation

    def key_list(self) -> list[str]:
        """A copy of the keys held, safe to iterate while discarding."""
        return [*self._protected, *self._probation]

    def clear(self) -> None:
        self._probation.clear()
        self._protected.clear()
        self._ghosts.clear()
        self.size = self.protected_size = self._ghost_bytes = 0


class TileCache:
    """Tiles by cache key (see :meth:`gateway.layers.Layer.cache_key`).

    Args:
        directory: diskcache directory, created if missing.
        size_limit_bytes: disk size limit; least-recently-used entries are evicted past it.
        memory_bytes: capacity of the per-process memory tier; 0 disables it.
        clock: Unix time, seconds, for purge marks and memory-tier load times
            (:mod:`gateway.clock`).

    Raises:
        OSError: the directory cannot be created or opened.
        sqlite3.Error: the database cannot be opened for another reason than damage (a
            damaged one is rebuilt).
    """

    def __init__(
        self,
        directory: Path,
        size_limit_bytes: int,
        memory_bytes: int = 0,
        clock: Clock = system_clock,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._disk = open_diskcache(
            directory,
            "tiles",
            size_limit=size_limit_bytes,
            eviction_policy="least-recently-used",
        )
        self.health = WriteHealth("tiles", directory, metrics.CACHE_WRITABLE)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-cache-io")
        self._memory = _MemoryTier(memory_bytes) if memory_bytes > 0 else None
        self.claims = Claims(self._disk)
        """Cross-process claims on tile keys (single-flight across worker processes)."""
        self._purges: dict[str, float] = {}
        self._purges_checked = float("-inf")  # monotonic time of the last disk read
        self._refresher: asyncio.Task[None] | None = None
        if self._memory is not None:
            self._refresh_purges()  # now, before serving: then the refresher keeps them

    def get_memory(self, key: str) -> CachedTile | None:
        """The entry for ``key`` if this process's memory tier holds it (no disk access,
        except re-reading the purge times at most once per :data:`PURGE_CHECK_S`).

        An entry loaded before its layer was last purged (by any process) is dropped.
        """
        if self._memory is None:
            return None
        entry = self._memory.get(key)
        if entry is None:
            return None
        tile, loaded_at, layer = entry
        if loaded_at < self._purged_at(layer):
            self._memory.discard(key)
            return None
        return tile

    def _purged_at(self, layer: str) -> float:
        """Unix time of ``layer``'s last purge (0.0 if never), as of at most
        :data:`PURGE_CHECK_S` ago.

        While an event loop uses this cache (:meth:`load`, :meth:`store`), a task re-reads
        the marks in the I/O thread every half :data:`PURGE_CHECK_S`, so the serving thread
        never waits on the disk for them; otherwise (commands) they are re-read here.
        """
        if time.monotonic() - self._purges_checked >= PURGE_CHECK_S:
            self._refresh_purges()
        return self._purges.get(layer, 0.0)

    def _keep_purges_fresh(self) -> None:
        """Start the task that re-reads the purge marks (on the event loop's thread)."""
        if self._memory is not None and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.ensure_future(self._refresh_purges_forever())

    async def _refresh_purges_forever(self) -> None:
        while True:
            await asyncio.sleep(PURGE_CHECK_S / 2)
            try:
                await self.run(self._refresh_purges)
            except RuntimeError:  # the cache was closed
                return

    def _refresh_purges(self) -> None:
        """Re-read the purge marks (in any thread); they are as of when the read began."""
        started = time.monotonic()
        try:
            self._load_purges()
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            # keep serving from memory with the marks known so far; retried next second
            log.warning("cannot read purge times from the tile cache: %s", exc)
        finally:
            self._purges_checked = started

    def _load_purges(self) -> None:
        """Merge the disk's purge times into this process's copy (never moving one back).

        If the disk lost marks this process knows (evicted past the size limit), they are
        written back, so processes that have not seen them yet still can.
        """
        stored = self._disk.get(PURGES_KEY)
        stored = stored if isinstance(stored, dict) else {}
        merged = dict(stored)
        for layer, when in self._purges.items():
            merged[layer] = max(when, merged.get(layer, 0.0))
        if merged != stored:
            self._write_purges(merged)
        self._purges = merged

    def _write_purges(self, marks: dict[str, float]) -> None:
        with self._disk.transact(retry=True):
            stored = self._disk.get(PURGES_KEY)
            merged = dict(stored) if isinstance(stored, dict) else {}
            for layer, when in marks.items():
                merged[layer] = max(when, merged.get(layer, 0.0))
            self._disk.set(PURGES_KEY, merged)

    def read_note(self, name: str) -> str | None:
        """A short text this host keeps beside its tiles (``meta/<name>``), or None; disk
        only, safe in any thread. None too when the disk cannot answer."""
        try:
            value = self._disk.get("meta/" + name)
        except STORE_ERRORS:
            return None
        return value if isinstance(value, str) else None

    def write_note(self, name: str, text: str) -> None:
        """Keep ``text`` as the note ``name`` (see :meth:`read_note`); best effort: a disk
        that cannot write is reported through ``health``, never raised."""
        try:
            self._disk.set("meta/" + name, text)
        except STORE_ERRORS as exc:
            self.health.failed(exc, "serving tiles uncached")

    def keys(self, prefix: str) -> Iterator[str]:
        """Disk-tier keys starting with ``prefix`` (a scan of every key: admin use only)."""
        for key in self._disk.iterkeys():
            if isinstance(key, str) and key.startswith(prefix):
                yield key

    def purge(self, layer: str, match: Callable[[str], bool] | None = None) -> int:
        """Remove ``layer``'s tiles (keys ``tile/<layer>/...``) for which ``match(key)`` is
        true (all when ``match`` is None), from disk and this process's memory tier, and
        record the layer's purge time so other processes drop their memory copies.

        Blocking (scans every disk key: an admin operation). From async code, run
        :meth:`purge_disk` in a thread, then :meth:`forget` on the serving thread.

        Returns:
            How many entries were removed from disk (expired ones not counted).
        """
        removed, purged_at = self.purge_disk(layer, match)
        self.forget(layer, match, purged_at)
        return removed

    def purge_disk(
        self, layer: str, match: Callable[[str], bool] | None = None
    ) -> tuple[int, float]:
        """The disk half of :meth:`purge` (safe in a worker thread: it leaves the memory tier
        alone). Returns the entries removed and the purge time recorded (Unix seconds)."""
        prefix = f"tile/{layer}/"
        doomed = [k for k in self.keys(prefix) if match is None or match(k)]
        removed = 0
        for start in range(0, len(doomed), PURGE_BATCH):
            with self._disk.transact(retry=True):
                for key in doomed[start : start + PURGE_BATCH]:
                    removed += bool(self._disk.delete(key))
        # stamped after the deletions: a memory entry loaded before this may be stale
        purged_at = self._clock()
        self._write_purges({layer: purged_at})
        return removed, purged_at

    def forget(self, layer: str, match: Callable[[str], bool] | None, purged_at: float) -> None:
        """The memory half of :meth:`purge`: drop this process's matching entries of
        ``layer`` and remember its purge time. Call it on the thread that serves tiles."""
        prefix = f"tile/{layer}/"
        if self._memory is not None:
            for key in self._memory.key_list():
                if key.startswith(prefix) and (match is None or match(key)):
                    self._memory.discard(key)
        known = self._purges.get(layer, 0.0)
        self._purges = {**self._purges, layer: max(purged_at, known)}

    def claim(self, key: str, seconds: float) -> bool:
        """Claim the fetch of ``key`` for this process for up to ``seconds`` (cross-process
        single-flight, :class:`~gateway.storage.claims.Claims`: a dead holder's claim is
        taken over). False when another live process holds it. When the disk cannot record
        a claim, True: this process fetches without one."""
        try:
            return self.claims.claim(key, seconds)
        except STORE_ERRORS as exc:
            self.health.failed(exc, "serving tiles uncached")
            return True

    def claimed(self, key: str) -> bool:
        """Whether a live process holds the claim on ``key`` now. False when the disk
        cannot be read."""
        try:
            return self.claims.held(key)
        except STORE_ERRORS:
            return False

    def release(self, key: str) -> None:
        """Drop this process's own claim on ``key`` (best effort: a claim that cannot be
        deleted expires, and a dead holder's is taken over)."""
        with contextlib.suppress(*STORE_ERRORS):
            self.claims.release(key)

    def release_soon(self, key: str) -> None:
        """Queue :meth:`release` of ``key`` in the I/O thread without waiting (after any disk
        work queued before it, such as the claimed tile's write); safe while cancelled."""
        with contextlib.suppress(RuntimeError):  # the cache is closed: the claim expires
            self._io.submit(self.release, key)

    def get(self, key: str, *, from_disk: bool = False) -> CachedTile | None:
        """The entry for ``key``, fresh or not, or None (blocking; from async code use
        :meth:`load`).

        Memory first, then disk; ``from_disk=True`` skips memory, to see what another
        worker process stored since. A disk that fails to answer, or an entry that does not
        read back intact (then deleted), is None: a miss.
        """
        if self._memory is not None and not from_disk:
            tile = self.get_memory(key)
            if tile is not None:
                return tile
        loaded_at = self._clock()
        tile = self.read_disk(key)
        if tile is not None and self._memory is not None:
            self._memory.put(key, tile, loaded_at)
        return tile

    async def load(self, key: str) -> CachedTile | None:
        """Like ``get(key, from_disk=True)``, with the disk read in this cache's I/O thread,
        so the event loop never waits on SQLite or the file system."""
        self._keep_purges_fresh()
        loaded_at = self._clock()
        tile = await self.run(self.read_disk, key)
        if tile is not None and self._memory is not None:
            self._memory.put(key, tile, loaded_at)
        return tile

    def load_soon(
        self, key: str, claim_s: float | None = None
    ) -> asyncio.Future[tuple[CachedTile | None, bool]]:
        """:meth:`load`, started now: the disk read is queued in the I/O thread before this
        returns (no event-loop step first), and the entry it finds is put in the memory tier
        before anyone awaiting the returned future resumes. With ``claim_s``, when the disk
        has no entry for ``key`` at all, the same trip also :meth:`claim`-s it for
        ``claim_s`` seconds (a miss's first two steps in one trip).

        Returns:
            A future of ``(entry or None, claimed)``; ``claimed`` is False without
            ``claim_s``. Shield it when several callers await it (cancelling it abandons
            the read for all of them).
        """
        self._keep_purges_fresh()
        loaded_at = self._clock()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._io, self._read_or_claim_missing, key, claim_s)

        def remember(done: asyncio.Future[tuple[CachedTile | None, bool]]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            tile = done.result()[0]
            if tile is not None and self._memory is not None:
                self._memory.put(key, tile, loaded_at)

        future.add_done_callback(remember)
        return future

    def on_disk(self, key: str) -> bool | None:
        """Whether the disk tier has an unexpired entry for ``key``, asked on the calling
        thread without reading the entry: one indexed SQLite lookup of the key (readers
        never wait on writers: the database is in WAL mode), a few tens of microseconds,
        so the event loop may ask it. None when the disk cannot say (then read it as
        usual). An entry found here may still prove damaged when it is read."""
        try:
            return key in self._disk
        except STORE_ERRORS:
            return None

    def claim_promptly(self, key: str, claim_s: float, wait_s: float) -> bool | None:
        """For a key :meth:`on_disk` found missing: :meth:`claim` it for ``claim_s``
        seconds unless an entry turned up meanwhile, in the I/O thread (after the disk work
        queued before it, as always), waiting for that on the calling thread (the event
        loop's) for up to ``wait_s`` seconds, for a miss that should not wait for the event
        loop's next turn.

        Returns:
            True: claimed; False: another live process holds the claim; None: no answer
            within ``wait_s``, or an entry turned up: read it as usual then (a claim this
            took is released, after it, in the I/O thread).
        """
        job = self._io.submit(self._read_or_claim_missing, key, claim_s)
        done, _ = concurrent.futures.wait((job,), timeout=wait_s)
        if not done:
            self.release_soon(key)
            return None
        tile, claimed = job.result()  # never raises: read_disk and claim report failures
        if tile is None:
            return claimed
        if claimed:
            self.release_soon(key)
        return None

    def _read_or_claim_missing(
        self, key: str, claim_s: float | None
    ) -> tuple[CachedTile | None, bool]:
        """The disk entry for ``key``; with ``claim_s`` and no entry, also a claim (disk
        only, in the I/O thread)."""
        tile = self.read_disk(key)
        if tile is not None or claim_s is None:
            return tile, False
        return None, self.claim(key, claim_s)

    async def store(self, key: str, tile: CachedTile, keep_s: float) -> bool:
        """Like :meth:`set`, with the disk write in this cache's I/O thread."""
        self._keep_purges_fresh()
        if self._memory is not None:
            self._memory.put(key, tile, self._clock())
        return await self.run(self.write_disk, key, tile, keep_s)

    async def run(self, method: Callable[..., T], *args: object) -> T:
        """Run a disk-only method of this cache (:meth:`read_disk`, :meth:`write_disk`,
        :meth:`claim`, :meth:`claimed`, :meth:`release`) in its I/O thread and wait for it.

        One thread per cache: its SQLite work is serialised there (no lock contention
        between this process's own threads), and never blocks the event loop. Methods that
        touch the memory tier must not be run here (it belongs to the event loop's thread).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, functools.partial(method, *args))

    def read_or_claim(self, key: str, seconds: float) -> tuple[CachedTile | None, bool]:
        """The disk entry for ``key`` and, unless it is fresh, :meth:`claim` on it for
        ``seconds``: ``(entry or None, claimed)``. One trip for a miss's two first steps;
        disk only (run it with :meth:`run`, then :meth:`remember` a fresh entry)."""
        tile = self.read_disk(key)
        if tile is not None and tile.is_fresh(self._clock()):
            return tile, False
        return tile, self.claim(key, seconds)

    def remember(self, key: str, tile: CachedTile, loaded_at: float) -> None:
        """Put ``tile``, read from disk at Unix time ``loaded_at`` (taken before the read),
        in this process's memory tier (on the serving thread)."""
        if self._memory is not None:
            self._memory.put(key, tile, loaded_at)

    def read_disk(self, key: str) -> CachedTile | None:
        """The disk tier's entry for ``key``, or None (also when the disk fails, or the entry
        does not read back intact: then it is deleted). Disk only: safe in any thread."""
        try:
            value = self._disk.get(key)
        except STORE_ERRORS as exc:
            self._read_failed(key, exc)
            return None
        except Exception as exc:  # a value diskcache cannot read back (an old pickle)
            self._damaged(key, exc)
            return None
        if value is None:
            return None
        try:
            return decode_entry(value)
        except EntryFormatError as exc:  # old format, damaged or truncated: a miss
            self._damaged(key, exc)
            return None

    def _damaged(self, key: str, exc: BaseException) -> None:
        """Drop an entry that does not read back intact, and say so."""
        metrics.CACHE_DAMAGED.inc()
        log.warning(
            "dropped a damaged tile cache entry for %s (%s); it is fetched again",
            _layer_of(key) or "a tile",
            type(exc).__name__,
        )
        with contextlib.suppress(*STORE_ERRORS):
            self._disk.delete(key)

    def _read_failed(self, key: str, exc: BaseException) -> None:
        # diskcache's LRU policy writes the access time on every read, so a full disk fails
        # reads too: that is the same unwritable state
        self.health.failed(exc, "serving tiles uncached")
        log.debug("tile cache read failed for %s: %s", _layer_of(key), type(exc).__name__)

    def set(self, key: str, tile: CachedTile, keep_s: float) -> bool:
        """Store ``tile``; disk drops it ``keep_s`` seconds from now (TTL plus stale windows).
        Blocking; from async code use :meth:`store`.

        Returns:
            Whether the disk stored it. When it cannot (disk full, read-only, damaged), the
            tile is only in this process's memory tier, and the failure is reported once
            (see the module docstring); nothing is raised.
        """
        if self._memory is not None:
            self._memory.put(key, tile, self._clock())
        return self.write_disk(key, tile, keep_s)

    def write_disk(self, key: str, tile: CachedTile, keep_s: float) -> bool:
        """The disk half of :meth:`set` (safe in any thread); returns whether it stored."""
        try:
            self._disk.set(key, encode_entry(tile), expire=keep_s)
        except STORE_ERRORS as exc:
            reason = self.health.failed(exc, "serving tiles uncached")
            metrics.CACHE_WRITE_FAILURES.labels(reason).inc()
            return False
        self.health.succeeded()
        return True

    def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers.

        Raises:
            OSError, sqlite3.Error, diskcache.Timeout: the disk failed.
        """
        if self._memory is not None:
            self._memory.discard(key)
        self._disk.delete(key)

    def probe(self) -> tuple[bool, str]:
        """Whether the disk tier accepts a write of :data:`PROBE_BYTES` and reads it back
        (for readiness checks): ``(True, "")``, or ``(False, reason)`` with a path-free
        reason (``disk-full``, ``read-only``, ``damaged``, ``busy``, ``io-error``).

        A probe that works also ends a spell of failed writes (the disk has room again).
        """
        value = f"probe-{time.monotonic()}".encode().ljust(PROBE_BYTES, b".")
        try:
            self._disk.set("readyz-probe", value, expire=60)
            ok = self._disk.get("readyz-probe") == value
        except STORE_ERRORS as exc:
            return False, self.health.failed(exc, "serving tiles uncached")
        if not ok:
            return False, "io-error"
        self.health.succeeded()
        return True, ""

    def volume_bytes(self) -> int:
        """Bytes the disk tier uses (SQLite plus value files); 0 when the disk cannot say."""
        try:
            return int(self._disk.volume())
        except STORE_ERRORS:
            return 0

    def close(self) -> None:
        """Stop the I/O thread (after its queued work), close the disk tier in every thread
        that used it, and drop the memory tier."""
        if self._memory is not None:
            self._memory.clear()
        if self._refresher is not None:
            self._refresher.cancel()
        with contextlib.suppress(RuntimeError):  # already shut down
            self._io.submit(self._disk.close)
        self._io.shutdown(wait=True)
        self._disk.close()

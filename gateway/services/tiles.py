"""The tile service: cache policy, coalescing and translation for one tile request.

One path per request. The address was validated by the route; outside the layer's bounds the
answer is a blank tile with no upstream call. Then, for the cached entry (RFC 5861 terms):

- fresh → ``HIT`` (``EMPTY`` for a negatively cached tile);
- expired but within ``stale_while_revalidate_s`` → ``STALE`` at once, and one background
  refresh (coalesced with any other fetch of the tile);
- otherwise one coalesced fetch through the upstream guard (``cog.tile.render`` /
  ``cog.tile.terrain``): ``MISS`` for the request that started it, ``COALESCED`` for those that
  joined; if it fails (upstream error, 429, 402, open breaker, limiter refusal) and the
  expired entry is within ``stale_if_error_s`` → ``STALE``; else the domain error
  (:mod:`gateway.errors`), which the HTTP edge answers as problem+json.

An upstream ``204`` or ``404`` for a tile inside the layer's bounds is an empty tile: a
TiTiler-style API answers 404 for a tile outside its COG, and the COG & tiles reference
(seeds ``003``) promises no status for "no data". It is answered blank (``EMPTY``) and cached
for ``empty_ttl_s``, like a 204. A 404 whose problem ``type`` says the COG itself is unknown
(``upstream.source_unknown_types``) is answered the same way and raises the layer's
``source-unknown`` operator alert (:mod:`gateway.upstream.alerts`); so does the start-up
source check (:mod:`gateway.services.sources`).

``@2x`` tiles are composed from the four z+1 children, each going through this same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import mercantile
from prometheus_client import Counter

from gateway import imaging, metrics
from gateway.clock import Clock, system_clock
from gateway.errors import (
    HeldBack,
    LimitExceeded,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamNotFound,
)
from gateway.layers import MEDIA_TYPES, Layer
from gateway.storage.coalesce import FleetFlight, SingleFlight
from gateway.storage.tiles import (
    CachedTile,
    EntryFormatError,
    TileCache,
    decode_entry,
    encode_entry,
    make_tile,
)
from gateway.upstream.alerts import SOURCE_UNKNOWN
from gateway.upstream.buckets import Priority
from gateway.upstream.guard import UpstreamGuard

log = logging.getLogger("gateway.tiles")

EMPTY_STATUSES = frozenset({204})
"""2xx statuses meaning "no data in this tile" (204 No Content); a 404 means the same."""

CLAIM_POLL_S = 0.01
"""How often a worker waiting on another worker's fetch looks for the result, seconds."""

FETCH_ERRORS = (UpstreamError, HeldBack)
"""Failures of a fetch that a stale entry may cover (stale-if-error)."""

PROMPT_WAIT_S = 0.005
"""Longest the event loop waits, on its own thread, for the cross-process claim of a miss
that arrives while no other miss is being worked on (:meth:`TileService._fetch_at_once`),
seconds; past it the miss goes on as every other, through the event loop."""


class _CreatorSlots(asyncio.Semaphore):
    """The tile-creator slots (an :class:`asyncio.Semaphore`) that also count how many are
    taken (``taken``)."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.taken = 0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.taken += 1
        return True

    def release(self) -> None:
        self.taken -= 1
        super().release()


def _checked_tile(
    body: bytes,
    fmt: str,
    ttl_s: float,
    fetch_s: float,
    now: float,
    nodata_height_m: float | None = None,
) -> CachedTile:
    """``body`` checked (:func:`gateway.imaging.check_tile`) and made a cache entry; for a
    terrain tile (``nodata_height_m`` given) its nodata pixels first get that height.

    Raises:
        ImageCheckError: not a decodable ``fmt`` tile.
    """
    imaging.check_tile(body, fmt)
    if nodata_height_m is not None:
        body = imaging.fill_terrain_nodata(body, nodata_height_m)
    return make_tile(body, MEDIA_TYPES[fmt], ttl_s, fetch_s=fetch_s, now=now)


@dataclass(frozen=True, slots=True)
class TileAddress:
    """A validated tile request: layer, XYZ z/x/y, ``scale`` 1 or 2, format extension."""

    layer: Layer
    z: int
    x: int
    y: int
    scale: int
    fmt: str
    key: str = field(init=False, repr=False, compare=False)
    """The cache key of this tile (:meth:`~gateway.layers.Layer.cache_key`), made once."""

    def __post_init__(self) -> None:
        key = self.layer.cache_key(self.z, self.x, self.y, self.scale, self.fmt)
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, slots=True)
class TileResult:
    """What the route serves: the tile and ``cache_status`` for ``X-Cache`` (named after
    nginx's ``$upstream_cache_status``; not an HTTP status).

    ``cache_status`` is ``HIT``, ``MISS``, ``COALESCED``, ``STALE`` or ``EMPTY``.
    """

    tile: CachedTile
    cache_status: str

    @classmethod
    def from_memory(cls, tile: CachedTile) -> TileResult:
        """The result of ``tile`` served from the memory tier: ``HIT``, or ``EMPTY`` for an
        empty tile (negative caching)."""
        return cls(tile, "EMPTY" if tile.empty else "HIT")

    @property
    def upstream_s(self) -> float | None:
        """Upstream time spent on this request (MISS or COALESCED), seconds, else None."""
        return self.tile.fetch_s if self.cache_status in ("MISS", "COALESCED") else None


class TileService:
    """Serves tiles from the cache, fetching misses upstream once.

    Args:
        cache: the tile cache.
        guard: the protected upstream client.
        empty_ttl_s: negative TTL (seconds) for tiles the upstream reported empty.
    """

    def __init__(
        self,
        cache: TileCache,
        guard: UpstreamGuard,
        empty_ttl_s: float,
        claim_s: float = 120.0,
        clock: Clock = system_clock,
        fleet: FleetFlight | None = None,
    ) -> None:
        self.cache = cache
        self.claim_s = claim_s
        self.clock = clock
        """Unix time, seconds: what tile freshness is measured with (:mod:`gateway.clock`)."""
        self.fleet = fleet
        """Cross-replica single-flight (Redis), replacing the host's claims when set."""

        self.guard = guard
        self.empty_ttl_s = empty_ttl_s
        self._flights: SingleFlight[tuple[CachedTile, str]] = SingleFlight()
        self._lookups: dict[str, asyncio.Future[tuple[CachedTile | None, bool]]] = {}
        """Disk reads in flight by key (:meth:`_lookup`)."""
        self._saved_children: dict[str, Counter] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        # tile creators (MapProxy's ``concurrent_tile_creators``): misses that may be past
        # the queue at once in this process; see :meth:`_creator_slot`
        self._creators = _CreatorSlots(guard.settings.max_concurrent)

    def get_fresh(self, address: TileAddress) -> TileResult | None:
        """The tile at ``address`` when this process's memory tier holds it fresh (``HIT``, or
        ``EMPTY`` for a negatively cached tile), counted in the metrics as :meth:`get` counts
        it; None otherwise (then await :meth:`get`). Synchronous: the cache-hit path costs no
        coroutine."""
        tile = self.fresh_in_memory(address)
        return None if tile is None else self.served_from_memory(address, tile)

    def fresh_in_memory(self, address: TileAddress) -> CachedTile | None:
        """The tile at ``address`` when the memory tier holds it fresh, else None; one
        memory-tier lookup (a use, for the tier's LRU), counted nowhere yet: pass it to
        :meth:`served_from_memory` once it is sent."""
        tile = self.cache.get_memory(address.key)
        if tile is None or self.clock() >= tile.fresh_until:
            return None
        return tile

    def served_from_memory(self, address: TileAddress, tile: CachedTile) -> TileResult:
        """Count ``tile`` (from :meth:`fresh_in_memory`) as served from memory, as
        :meth:`get` counts a hit; the result to answer with (:meth:`TileResult.from_memory`)."""
        result = TileResult.from_memory(tile)
        self.count_served(address, result)
        return result

    def count_served(self, address: TileAddress, result: TileResult) -> None:
        """Count ``result`` (:meth:`TileResult.from_memory` of a tile from
        :meth:`fresh_in_memory`) as served from memory, as :meth:`get` counts a hit: the
        cache lookup, the upstream call saved and its bytes."""
        count = metrics.TURN_COUNTS.inc  # added together at the end of the loop turn
        count(metrics.CACHE_LOOKUP[result.cache_status])
        count(metrics.UPSTREAM_SAVED)
        tile = result.tile
        if not tile.empty:
            count(self._egress_saved(address.layer.operation), len(tile.body))

    def _egress_saved(self, operation: str) -> Counter:
        """The ``gateway_upstream_saved_bytes_total`` child of ``operation``, bound once."""
        child = self._saved_children.get(operation)
        if child is None:
            child = self._saved_children[operation] = metrics.EGRESS_SAVED.labels(operation)
        return child

    async def get(
        self, address: TileAddress, priority: Priority = Priority.INTERACTIVE
    ) -> TileResult:
        """The tile at ``address``; counts the cache result in the metrics.

        Raises:
            UpstreamError: the upstream refused, failed, throttled (429) or sent garbage;
            HeldBack: a breaker is open or a limit refused the call; either only when no
                stale entry covers, with ``subject`` naming the layer.
        """
        result = await self._get(address, priority)
        status = result.cache_status
        metrics.CACHE_LOOKUP[status].inc()
        if status != "MISS":
            metrics.UPSTREAM_SAVED.inc()
            if status != "EMPTY":
                self._egress_saved(address.layer.operation).inc(len(result.tile.body))
        return result

    async def _get(self, address: TileAddress, priority: Priority) -> TileResult:
        key = address.key
        tile = self.cache.get_memory(key)  # the hot path: one memory lookup, nothing else
        now = self.clock()
        if tile is not None and now < tile.fresh_until:  # only covered tiles are cached
            return TileResult(tile, "EMPTY" if tile.empty else "HIT")
        layer = address.layer
        in_flight = self._flights.in_flight(key)
        # a tile being read or fetched passed this check already: a burst's joiners skip it
        if not (in_flight or key in self._lookups) and not layer.covers(
            mercantile.Tile(address.x, address.y, address.z)
        ):
            return TileResult(self._blank(address, layer.ttl_s), "EMPTY")
        own: asyncio.Future[tuple[CachedTile, str]] | None = None
        if tile is None and not in_flight:  # joining a flight skips this
            own = await self._fetch_at_once(address, priority)
            if own is None:
                tile, own = await self._lookup(address, priority)
        if tile is not None:
            if tile.is_fresh(now):
                return TileResult(tile, "EMPTY" if tile.empty else "HIT")
            if now < tile.fresh_until + layer.stale_while_revalidate_s:
                self._refresh_in_background(address, priority)
                return TileResult(tile, "STALE")
        try:
            if own is not None:  # the fetch this request's disk read started
                (fetched, source), coalesced = await asyncio.shield(own), False
            else:
                (fetched, source), coalesced = await self._flights.run(
                    key, lambda: self._fetch(address, priority)
                )
        except FETCH_ERRORS as exc:
            if tile is not None and self.clock() < tile.fresh_until + layer.stale_if_error_s:
                log.warning(
                    "serving stale %s %d/%d/%d: %s",
                    layer.name,
                    address.z,
                    address.x,
                    address.y,
                    type(exc).__name__,
                )
                return TileResult(tile, "STALE")
            raise exc.about(f"tiles of layer {layer.name!r}") from None
        if fetched.empty:
            return TileResult(fetched, "EMPTY")
        return TileResult(fetched, "COALESCED" if coalesced else source)

    async def _fetch_at_once(
        self, address: TileAddress, priority: Priority
    ) -> asyncio.Future[tuple[CachedTile, str]] | None:
        """Start the fetch of a tile the disk does not have, without waiting for the event
        loop's next turn, when nothing else is being fetched; None (nothing done) otherwise.

        A burst of requests for a new tile arrives in one go: when its first request waits
        for anything (a thread, a task's first step), it resumes only after every other
        request queued by then has been taken as far as it goes, so its upstream call
        would be written after the whole burst has been read. So, for a one-host miss
        (no fleet, scale 1) that finds every tile-creator slot free and no read of the tile
        under way: the disk is asked on the event loop whether it has the key
        (:meth:`~gateway.storage.tiles.TileCache.on_disk`, an index lookup), the
        cross-process claim is taken in the cache's I/O thread while the loop waits up to
        :data:`PROMPT_WAIT_S`, and the fetch task's first step runs at once
        (:meth:`~gateway.storage.coalesce.SingleFlight.start`), up to the upstream request
        being written (the guard admits a call into an idle process the same way). The
        requests that follow join that fetch. A miss among others in flight goes through
        :meth:`_lookup` as before: a flood of cold tiles never waits on the loop's thread.
        """
        key = address.key
        if (
            self.fleet is not None
            or address.scale != 1
            or self._creators.taken
            or key in self._lookups
            or self.cache.on_disk(key) is not False
        ):
            return None
        claimed = self.cache.claim_promptly(key, self.claim_s, PROMPT_WAIT_S)
        if claimed is None:
            return None
        await self._creators.acquire()  # free (none taken): returns at once
        return self._start_fetch(address, priority, True, claimed)

    async def _lookup(
        self, address: TileAddress, priority: Priority
    ) -> tuple[CachedTile | None, asyncio.Future[tuple[CachedTile, str]] | None]:
        """The disk entry for ``address`` (fresh or not), read once however many ask at
        once: the first caller queues the read in the cache's I/O thread at once, the others
        await the same read, so a burst for a tile not in memory costs one disk read.

        When the disk has no entry at all, the fetch starts as soon as the read is back,
        before the callers that waited on it resume (they join it instead of each asking
        for it). With one host (no fleet) and a tile-creator slot free when the read is
        queued, the read also takes the cross-process claim for that fetch, in the same
        trip. Returns ``(entry or None, that fetch)``: the fetch only to the caller that
        started the read, which awaits it as its own (``MISS``); None to the others.
        """
        key = address.key
        lookup = self._lookups.get(key)
        if lookup is not None:
            return (await asyncio.shield(lookup))[0], None
        # a free tile-creator slot is taken now (no event-loop step), so the claim below is
        # only ever held by a miss that holds a slot (queued misses hold nothing)
        slot = self.fleet is None and address.scale == 1 and not self._creators.locked()
        if slot:
            await self._creators.acquire()  # free: returns at once
        lookup = self._lookups[key] = self.cache.load_soon(key, self.claim_s if slot else None)
        started: list[asyncio.Future[tuple[CachedTile, str]]] = []

        def read(done: asyncio.Future[tuple[CachedTile | None, bool]]) -> None:
            if self._lookups.get(key) is done:
                del self._lookups[key]
            failed = done.cancelled() or done.exception() is not None  # retrieved here
            tile, claimed = (None, False) if failed else done.result()
            if not failed and tile is None and not self._flights.in_flight(key):
                started.append(self._start_fetch(address, priority, slot, claimed))
                return
            if claimed:  # not needed after all (a fetch started meanwhile holds its own)
                self.cache.release_soon(key)
            if slot:
                self._creators.release()

        lookup.add_done_callback(read)
        tile = (await asyncio.shield(lookup))[0]
        return tile, started[0] if started else None

    def _start_fetch(
        self, address: TileAddress, priority: Priority, slot: bool, claimed: bool
    ) -> asyncio.Future[tuple[CachedTile, str]]:
        """Start the fetch of a tile the disk does not have, from :meth:`_lookup`'s read;
        with ``slot``, that read's tile-creator slot and claim attempt (``claimed``) go to
        the fetch, which gives them back when it ends (or at once if it never runs)."""
        if not slot:
            return self._flights.start(address.key, lambda: self._fetch(address, priority))
        handed = [True]  # the slot and claim are this function's until the fetch runs

        async def fetch() -> tuple[CachedTile, str]:
            handed[0] = False
            try:
                return await self._fetch_claimed(address, priority, (None, claimed))
            finally:
                self._creators.release()

        def ended(_: asyncio.Future[tuple[CachedTile, str]]) -> None:
            if handed[0]:  # cancelled before its first step
                if claimed:
                    self.cache.release_soon(address.key)
                self._creators.release()

        task = self._flights.start(address.key, fetch)
        task.add_done_callback(ended)
        return task

    async def fetch_now(self, address: TileAddress, priority: Priority) -> tuple[bool, int]:
        """Fetch and store ``address`` now, as a cache miss does (coalesced, claimed across
        workers, guarded), but never answer with a stale entry; for seeding.

        Returns:
            ``(fetched, nbytes)``: ``fetched`` is False when another process stored it or
            this call joined another fetch; ``nbytes`` is 0 for an empty tile.

        Raises:
            UpstreamError, HeldBack: the fetch (or an ``@2x`` child's) failed.
        """
        (tile, source), coalesced = await self._flights.run(
            address.key, lambda: self._fetch(address, priority)
        )
        return source == "MISS" and not coalesced, 0 if tile.empty else len(tile.body)

    async def drain(self) -> None:
        """Wait for background refreshes (started by ``@2x`` children) to finish."""
        while self._refreshes:
            await asyncio.gather(*list(self._refreshes), return_exceptions=True)

    def _refresh_in_background(self, address: TileAddress, priority: Priority) -> None:
        """Start one refresh of ``address`` unless a fetch of it is already in flight."""
        if self._flights.in_flight(address.key):
            return

        async def refresh() -> None:
            try:
                await self._flights.run(address.key, lambda: self._fetch(address, priority))
            except FETCH_ERRORS as exc:
                log.warning(
                    "background refresh of %s %d/%d/%d failed: %s",
                    address.layer.name,
                    address.z,
                    address.x,
                    address.y,
                    type(exc).__name__,
                )

        task = asyncio.ensure_future(refresh())
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def aclose(self) -> None:
        """Cancel background refreshes (on shutdown)."""
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)

    def _blank(self, address: TileAddress, ttl_s: float) -> CachedTile:
        layer = address.layer
        body = imaging.blank_tile(
            address.fmt,
            imaging.TILE_SIZE * address.scale,
            layer.kind == "terrain",
            layer.nodata_height_m,
        )
        return make_tile(body, MEDIA_TYPES[address.fmt], ttl_s, empty=True, now=self.clock())

    async def _fetch(self, address: TileAddress, priority: Priority) -> tuple[CachedTile, str]:
        """Fetch, check and store one tile; runs once per key however many wait on it.

        Returns the tile and where it came from, as an ``X-Cache`` value: ``MISS`` (this
        process fetched it), ``HIT`` (another worker had stored it), ``COALESCED`` (this
        process waited on another worker's fetch).
        """
        if address.scale == 1:
            async with self._creator_slot(address):
                return await self._fetch_claimed(address, priority)
        return await self._fetch_claimed(address, priority)  # its children take the slots

    @contextlib.asynccontextmanager
    async def _creator_slot(self, address: TileAddress) -> AsyncIterator[None]:
        """Hold one of this process's tile-creator slots (``limits.max_concurrent``) for a
        miss's whole work: claim, upstream call, check and store. (A miss whose first disk
        read found a slot free took it then, with the claim: :meth:`_lookup`.)

        Misses beyond that queue here, first come first served, before they do anything: a
        queued miss costs the event loop nothing, so a flood of cold tiles cannot fill the
        loop with half-done misses that every cache hit would wait behind. More would not
        reach the upstream sooner anyway (the host's calls in flight are capped at the same
        number). Hits, and requests joining a fetch in flight, never queue.

        Raises:
            LimitExceeded: no slot within ``limits.max_wait_s`` (scope ``concurrency``).
        """
        wait_s = self.guard.settings.max_wait_s
        try:
            if self._creators.locked():  # queue, up to wait_s
                # asyncio.timeout: wait_for can lose a cancel on Python 3.11 (CPython
                # gh-86296), and a lost cancel here would take a slot never given back
                async with asyncio.timeout(wait_s):
                    await self._creators.acquire()
            else:
                await self._creators.acquire()  # free: returns at once, no event-loop step
        except TimeoutError:
            metrics.LIMITER_REJECTIONS.labels("concurrency").inc()
            raise LimitExceeded(
                "concurrency",
                1.0,
                f"every tile creator slot stayed busy for {wait_s:g} s "
                f"(tiles of layer {address.layer.name!r})",
            ) from None
        try:
            yield
        finally:
            self._creators.release()

    async def _fetch_claimed(
        self,
        address: TileAddress,
        priority: Priority,
        read: tuple[None, bool] | None = None,
    ) -> tuple[CachedTile, str]:
        """:meth:`_fetch` past the tile-creator queue: the cross-process claim (unless
        ``read`` brings it), the fetch and the store."""
        if self.fleet is not None:
            return await self._fetch_in_fleet(address, priority, self.fleet)
        key, cache = address.key, self.cache
        loaded_at = self.clock()
        if read is None:
            stored, claimed = await cache.run(cache.read_or_claim, key, self.claim_s)
        else:
            stored, claimed = read
        if stored is not None and stored.is_fresh(self.clock()):
            cache.remember(key, stored, loaded_at)
            return stored, "HIT"  # another worker process stored it meanwhile
        if not claimed:
            stored = await self._await_other_worker(key)
            if stored is not None:
                return stored, "COALESCED"
            # the holder failed or died: fetch, holding the claim when it is free now
            claimed = await cache.run(cache.claim, key, self.claim_s)
        try:
            if address.scale == 2:
                tile = await self._fetch_2x(address, priority)
            else:
                tile = await self._fetch_1x(address, priority)
            # stored before anyone is answered: written while 200 answers go out, the write
            # (diskcache is Python, in a thread on the same core) slowed those answers down
            # by more than the millisecond it takes alone (issue 15, bench/results)
            keep = self.empty_ttl_s if tile.empty else address.layer.keep_s
            await cache.store(key, tile, keep_s=keep)
        finally:
            if claimed:  # only this process's own claim, never another's
                cache.release_soon(key)
        return tile, "MISS"

    async def _fetch_in_fleet(
        self, address: TileAddress, priority: Priority, fleet: FleetFlight
    ) -> tuple[CachedTile, str]:
        """:meth:`_fetch` for a fleet of replicas: the local disk first (no Redis), then
        one fetch in the whole fleet (:class:`~gateway.storage.coalesce.FleetFlight`);
        a tile another replica fetched is stored in this replica's cache too."""
        key, cache = address.key, self.cache
        loaded_at = self.clock()
        stored = await cache.run(cache.read_disk, key)
        if stored is not None and stored.is_fresh(loaded_at):
            cache.remember(key, stored, loaded_at)
            return stored, "HIT"
        fetched: list[CachedTile] = []

        async def fetch() -> bytes:
            if address.scale == 2:
                tile = await self._fetch_2x(address, priority)
            else:
                tile = await self._fetch_1x(address, priority)
            fetched.append(tile)
            return encode_entry(tile)  # the tile cache's own versioned format

        def fresh(payload: bytes) -> bool:
            try:
                return decode_entry(payload).is_fresh(self.clock())
            except EntryFormatError:
                return False

        payload, coalesced = await fleet.run(key, fetch, self.claim_s, accept=fresh)
        tile = fetched[0] if fetched else decode_entry(payload)  # accepted by fresh()
        keep = self.empty_ttl_s if tile.empty else address.layer.keep_s
        await cache.store(key, tile, keep_s=keep)
        if coalesced:
            metrics.FLEET_COALESCED.inc()
            return tile, "COALESCED"
        return tile, "MISS"

    async def _await_other_worker(self, key: str) -> CachedTile | None:
        """Wait (up to ``claim_s``) while another worker process fetches ``key``; its
        result, or None when its claim ended without a fresh entry (it failed or died) and
        this process should fetch."""
        deadline = time.monotonic() + self.claim_s
        while time.monotonic() < deadline:
            await asyncio.sleep(CLAIM_POLL_S)
            stored = await self.cache.load(key)
            if stored is not None and stored.is_fresh(self.clock()):
                return stored
            if not await self.cache.run(self.cache.claimed, key):
                return None
        return None

    async def _fetch_1x(self, address: TileAddress, priority: Priority) -> CachedTile:
        layer = address.layer
        body = layer.upstream_body(address.z, address.x, address.y, address.fmt)
        try:
            response = await self.guard.call(
                layer.operation, body, asset=layer.url, priority=priority
            )
        except UpstreamNotFound as exc:
            if exc.source_unknown:
                self.guard.state.submit(  # shared state: in the state's I/O thread
                    self.guard.alerts.raise_alert,
                    SOURCE_UNKNOWN,
                    layer.name,
                    f"layer {layer.name!r}: the upstream does not know its source (404, "
                    f"problem type {exc.problem_type}); its tiles are served blank until its "
                    "url is fixed",
                    logging.WARNING,
                )
            return self._blank(address, self.empty_ttl_s)
        if response.status in EMPTY_STATUSES:
            return self._blank(address, self.empty_ttl_s)
        expected = MEDIA_TYPES[address.fmt]
        try:
            if response.content_type != expected:
                raise imaging.ImageCheckError(
                    f"content type {response.content_type!r}, expected {expected}"
                )
            # decoding every pixel and hashing the bytes take a millisecond or two: off the
            # event loop (Pillow and hashlib release the GIL), so cache hits never wait
            tile = await asyncio.to_thread(
                _checked_tile,
                response.content,
                address.fmt,
                layer.ttl_s,
                response.elapsed_s,
                self.clock(),
                layer.nodata_height_m if layer.kind == "terrain" else None,
            )
        except imaging.ImageCheckError as exc:
            log.error(
                "upstream %s sent an unusable tile for layer %s %d/%d/%d: %s",
                layer.operation,
                layer.name,
                address.z,
                address.x,
                address.y,
                exc,
            )
            raise UpstreamBadResponse(layer.operation, str(exc), response.status) from None
        self.guard.state.submit(  # shared state: in the state's I/O thread, not the loop
            self.guard.alerts.resolve,
            SOURCE_UNKNOWN,
            layer.name,
            f"resolved: layer {layer.name!r} has tiles again",
        )
        return tile

    async def _fetch_2x(self, address: TileAddress, priority: Priority) -> CachedTile:
        layer = address.layer
        z, x, y = address.z + 1, address.x * 2, address.y * 2
        fmt = "png"  # lossless children; the composite is encoded in the asked format
        children = [
            TileAddress(layer, z, cx, cy, 1, fmt)
            for cx, cy in ((x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1))
        ]
        results = await asyncio.gather(*(self._get(child, priority) for child in children))
        tiles = [r.tile for r in results]
        now = self.clock()
        if all(t.empty for t in tiles):
            return self._blank(address, self.empty_ttl_s)
        bodies = [None if t.empty else t.body for t in tiles]
        try:
            composite = await asyncio.to_thread(
                imaging.compose_2x,
                bodies,
                address.fmt,
                layer.kind == "terrain",
                layer.render.get("quality"),
                layer.nodata_height_m,
            )
        except imaging.ImageCheckError as exc:
            raise UpstreamBadResponse(layer.operation, str(exc), 200) from None
        # as fresh as its stalest child, so a stale child is refreshed into the composite
        ttl = min(layer.ttl_s, *(t.fresh_until - now for t in tiles if not t.empty))
        return make_tile(composite, MEDIA_TYPES[address.fmt], max(0.0, ttl), now=self.clock())

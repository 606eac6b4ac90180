"""The tile service: cache policy, coalescing and translation for one tile request.

One path per request: the address was validated by the route; outside the layer's bounds the
answer is a blank tile with no upstream call; a fresh cache entry is a hit; otherwise one
coalesced fetch renders it upstream (``cog.tile.render`` / ``cog.tile.terrain``), checks it and
stores it. ``@2x`` tiles are composed from the four z+1 children, each going through the same
path, so children are cached and coalesced like any tile.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import mercantile

from gateway import imaging
from gateway.cache import CachedTile, TileCache, make_tile
from gateway.coalesce import SingleFlight
from gateway.layers import MEDIA_TYPES, Layer
from gateway.problem import Problem
from gateway.upstream import (
    GeoperaClient,
    UpstreamAuthError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamTimeout,
)

log = logging.getLogger("gateway.tiles")

EMPTY_STATUSES = frozenset({204})
"""Upstream statuses meaning "no data in this tile" (the emulator answers 204 No Content)."""


@dataclass(frozen=True, slots=True)
class TileAddress:
    """A validated tile request: layer, XYZ z/x/y, ``scale`` 1 or 2, format extension."""

    layer: Layer
    z: int
    x: int
    y: int
    scale: int
    fmt: str

    @property
    def key(self) -> str:
        """The cache key of this tile."""
        return self.layer.cache_key(self.z, self.x, self.y, self.scale, self.fmt)


@dataclass(frozen=True, slots=True)
class TileResult:
    """What the route serves: the cached tile and ``status`` for ``X-Cache``.

    ``status`` is one of ``HIT``, ``MISS``, ``COALESCED`` or ``EMPTY``.
    """

    tile: CachedTile
    status: str


class TileService:
    """Serves tiles from the cache, fetching misses upstream once.

    Args:
        cache: the tile cache.
        client: the Geopera client.
        empty_ttl_s: negative TTL (seconds) for tiles the upstream reported empty.
    """

    def __init__(self, cache: TileCache, client: GeoperaClient, empty_ttl_s: float) -> None:
        self.cache = cache
        self.client = client
        self.empty_ttl_s = empty_ttl_s
        self._flights: SingleFlight[CachedTile] = SingleFlight()

    async def get(self, address: TileAddress) -> TileResult:
        """The tile at ``address``.

        Raises:
            Problem: 502 (upstream refused, failed or sent garbage; key or scope wrong),
                503 with Retry-After (upstream throttled), 504 (upstream timed out).
        """
        layer = address.layer
        if not layer.covers(mercantile.Tile(address.x, address.y, address.z)):
            return TileResult(self._blank(address), "EMPTY")
        key = address.key
        tile = self.cache.get(key)
        if tile is not None and tile.is_fresh():
            return TileResult(tile, "EMPTY" if tile.empty else "HIT")
        tile, coalesced = await self._flights.run(key, lambda: self._fetch(address))
        if tile.empty:
            return TileResult(tile, "EMPTY")
        return TileResult(tile, "COALESCED" if coalesced else "MISS")

    def _blank(self, address: TileAddress) -> CachedTile:
        terrain = address.layer.kind == "terrain"
        body = imaging.blank_tile(address.fmt, imaging.TILE_SIZE * address.scale, terrain)
        return make_tile(body, MEDIA_TYPES[address.fmt], address.layer.ttl_s, empty=True)

    async def _fetch(self, address: TileAddress) -> CachedTile:
        """Fetch, check and store one tile; runs once per key however many wait on it."""
        key = address.key
        stored = self.cache.get(key, from_disk=True)
        if stored is not None and stored.is_fresh():
            return stored  # another worker process stored it meanwhile
        if address.scale == 2:
            tile = await self._fetch_2x(address)
        else:
            tile = await self._fetch_1x(address)
        ttl = self.empty_ttl_s if tile.empty else address.layer.ttl_s
        self.cache.set(key, tile, keep_s=ttl)
        return tile

    async def _fetch_1x(self, address: TileAddress) -> CachedTile:
        layer = address.layer
        body = layer.upstream_body(address.z, address.x, address.y, address.fmt)
        try:
            response = await self.client.call(layer.operation, body)
        except UpstreamError as exc:
            raise self._problem(address, exc) from None
        if response.status in EMPTY_STATUSES:
            blank = self._blank(address)
            return make_tile(blank.body, blank.media_type, self.empty_ttl_s, empty=True)
        expected = MEDIA_TYPES[address.fmt]
        try:
            if response.content_type != expected:
                raise imaging.ImageCheckError(
                    f"content type {response.content_type!r}, expected {expected}"
                )
            imaging.check_tile(response.content, address.fmt)
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
            raise Problem(
                502,
                "Bad upstream response",
                "The upstream answered with something that is not a valid tile.",
                slug="upstream-bad-response",
            ) from None
        return make_tile(response.content, expected, layer.ttl_s)

    async def _fetch_2x(self, address: TileAddress) -> CachedTile:
        layer = address.layer
        z, x, y = address.z + 1, address.x * 2, address.y * 2
        fmt = "png"  # lossless children; the composite is encoded in the asked format
        children = [
            TileAddress(layer, z, cx, cy, 1, fmt)
            for cx, cy in ((x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1))
        ]
        results = await asyncio.gather(*(self.get(child) for child in children))
        if all(r.tile.empty for r in results):
            blank = self._blank(address)
            return make_tile(blank.body, blank.media_type, self.empty_ttl_s, empty=True)
        bodies = [None if r.tile.empty else r.tile.body for r in results]
        composite = await asyncio.to_thread(
            imaging.compose_2x,
            bodies,
            address.fmt,
            layer.kind == "terrain",
            layer.render.get("quality"),
        )
        return make_tile(composite, MEDIA_TYPES[address.fmt], layer.ttl_s)

    @staticmethod
    def _problem(address: TileAddress, exc: UpstreamError) -> Problem:
        """Map an upstream failure to the client's problem+json (never the upstream text)."""
        name = address.layer.name
        if isinstance(exc, UpstreamAuthError):
            log.critical(
                "UPSTREAM REJECTED THE GATEWAY'S CREDENTIALS (%s) for %s: the Geopera "
                "API key is wrong, expired or lacks the tiles:read scope; fix "
                "GEOPERA_API_KEY",
                exc.status,
                exc.operation,
            )
            return Problem(
                502,
                "Upstream authorization failed",
                "The gateway's upstream credentials were refused; an operator has "
                "been alerted in the gateway log.",
                slug="upstream-auth",
            )
        if isinstance(exc, UpstreamRateLimited):
            retry = max(1, round(exc.retry_after_s))
            log.warning(
                "upstream throttled %s for layer %s; retry after %ss", exc.operation, name, retry
            )
            return Problem(
                503,
                "Upstream throttled",
                f"The upstream is rate limiting tiles for layer {name!r}; retry after {retry} s.",
                slug="upstream-throttled",
                headers={"Retry-After": str(retry)},
            )
        if isinstance(exc, UpstreamTimeout):
            log.warning("upstream timed out: %s", exc)
            return Problem(
                504,
                "Upstream timeout",
                "The upstream did not answer in time.",
                slug="upstream-timeout",
            )
        log.error(
            "upstream failed for layer %s %d/%d/%d: %s", name, address.z, address.x, address.y, exc
        )
        if isinstance(exc, UpstreamQuotaExceeded):
            detail = "The upstream quota for this gateway is spent."
        elif isinstance(exc, UpstreamNotFound):
            detail = f"The upstream does not know the source of layer {name!r}."
        else:
            detail = "The upstream failed to render this tile."
        return Problem(502, "Bad gateway", detail, slug="upstream-error")

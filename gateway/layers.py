"""Layers: what a client may ask for, and how it translates to a Geopera operation.

A layer names one COG and the render parameters to apply. Its ``kind`` decides the upstream
operation (Geopera "COG & tiles operations"): ``raster`` -> ``cog.tile.render`` (fields url,
z, x, y, format, bands, expression, rescale, colormap, quality), ``terrain`` ->
``cog.tile.terrain`` (url, z, x, y, invert). Clients choose a layer by name; the COG URL and
parameters only ever come from the config.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import mercantile

LAYER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Allowed layer names: lower-case ASCII letters, digits, ``-`` and ``_``; 1 to 64 long."""

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
"""Tile formats the gateway serves, by URL extension."""

OPERATIONS = {"raster": "cog.tile.render", "terrain": "cog.tile.terrain"}

MAX_ZOOM = 24

TERRAIN_RGB_MIN_M = -10000.0
TERRAIN_RGB_MAX_M = -10000.0 + ((1 << 24) - 1) / 10
"""Heights Terrain-RGB can encode, metres (Mapbox: height = -10000 + (R·65536 + G·256 + B)·0.1,
24 bits at 0.1 m)."""
WEB_MERCATOR_MAX_LAT = 85.0511287798066

RENDER_PARAMS: Mapping[str, Mapping[str, type]] = MappingProxyType(
    {
        "raster": MappingProxyType(
            {"bands": str, "expression": str, "rescale": str, "colormap": str, "quality": int}
        ),
        "terrain": MappingProxyType({"invert": bool}),
    }
)
"""The render parameters each layer kind sends upstream, with their types (COG & tiles
operations, seeds ``003``)."""

RESERVED_NAMES = frozenset({"clips"})
"""Layer names the gateway keeps for itself: ``/tiles/clips/...`` serves clip layers."""

Kind = Literal["raster", "terrain"]
Bounds = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Layer:
    """One configured layer.

    Attributes:
        name: URL name, matching :data:`LAYER_NAME`.
        kind: ``raster`` or ``terrain``.
        url: the COG URL sent upstream as ``url``.
        render: the extra upstream fields (raster: bands, expression, rescale, colormap,
            quality; terrain: invert), exactly as sent.
        minzoom, maxzoom: zoom range clients may ask for (inclusive).
        bounds: ``(west, south, east, north)`` in degrees (EPSG:4326); tiles entirely
            outside get an empty tile without an upstream call.
        formats: allowed extensions, a subset of :data:`MEDIA_TYPES`.
        ttl_s: freshness lifetime of a rendered tile, seconds.
        stale_while_revalidate_s: after the TTL, how long an expired tile is still served at
            once while one background refresh runs (RFC 5861 section 3), seconds.
        stale_if_error_s: after the TTL, how long an expired tile is served when the upstream
            fails, throttles or is held back by a breaker or limit (RFC 5861 section 4).
        public: False when only clients with a ``tiles`` token may read it.
        nodata_height_m: terrain: the height, metres, that pixels without data get (the
            upstream's transparent pixels and blank tiles), so Terrain-RGB readers that ignore
            alpha (MapLibre's ``raster-dem``) see flat ground there, not -10,000 m.
        fingerprint: 16 hex digits hashing kind, url and render parameters (and a terrain
            layer's ``nodata_height_m``; canonical JSON, SHA-256); part of every cache key,
            so changed parameters never hit old renders.
    """

    name: str
    title: str
    kind: Kind
    url: str
    render: Mapping[str, Any]
    minzoom: int
    maxzoom: int
    bounds: Bounds
    formats: tuple[str, ...]
    ttl_s: int
    stale_while_revalidate_s: int
    stale_if_error_s: int
    attribution: str
    fingerprint: str
    public: bool = True
    nodata_height_m: float = 0.0

    @property
    def operation(self) -> str:
        """The Geopera operation id that renders this layer's tiles."""
        return OPERATIONS[self.kind]

    def upstream_body(self, z: int, x: int, y: int, fmt: str) -> dict[str, Any]:
        """The JSON body for one 256 px tile in XYZ numbering (terrain ignores ``fmt``)."""
        body: dict[str, Any] = {"url": self.url, "z": z, "x": x, "y": y}
        if self.kind == "raster":
            body["format"] = fmt
        body.update(self.render)
        return body

    @property
    def keep_s(self) -> int:
        """How long the cache keeps a rendered tile: TTL plus the longer stale window."""
        return self.ttl_s + max(self.stale_while_revalidate_s, self.stale_if_error_s)

    def covers(self, tile: mercantile.Tile) -> bool:
        """Whether ``tile`` overlaps the layer's bounds by more than an edge."""
        w, s, e, n = mercantile.bounds(tile)
        west, south, east, north = self.bounds
        return bool(w < east and e > west and s < north and n > south)

    def cache_key(self, z: int, x: int, y: int, scale: int, fmt: str) -> str:
        """Cache key ``tile/<layer>/<fingerprint>/<z>/<x>/<y>@<scale>x.<fmt>``."""
        return f"tile/{self.name}/{self.fingerprint}/{z}/{x}/{y}@{scale}x.{fmt}"


def layer_fingerprint(
    kind: str, url: str, render: Mapping[str, Any], nodata_height_m: float | None = None
) -> str:
    """16 hex digits of the SHA-256 of ``{"kind", "url", "render"}`` (and, for terrain, the
    ``nodata_height_m`` the gateway writes into its tiles) as canonical JSON: what a layer's
    cache keys carry, so that new render parameters never hit old renders."""
    fields: dict[str, Any] = {"kind": kind, "url": url, "render": dict(render)}
    if nodata_height_m is not None:
        fields["nodata_height_m"] = nodata_height_m
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

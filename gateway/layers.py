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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import mercantile

from gateway.configfile import ConfigError, TableReader

LAYER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Allowed layer names: lower-case ASCII letters, digits, ``-`` and ``_``; 1 to 64 long."""

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
"""Tile formats the gateway serves, by URL extension."""

OPERATIONS = {"raster": "cog.tile.render", "terrain": "cog.tile.terrain"}

MAX_ZOOM = 24
WEB_MERCATOR_MAX_LAT = 85.0511287798066

_RASTER_PARAMS = {"bands": str, "expression": str, "rescale": str, "colormap": str, "quality": int}
_TERRAIN_PARAMS = {"invert": bool}
RENDER_PARAMS: Mapping[str, Mapping[str, type]] = MappingProxyType(
    {"raster": MappingProxyType(_RASTER_PARAMS), "terrain": MappingProxyType(_TERRAIN_PARAMS)}
)
"""The render parameters each layer kind sends upstream, with their types (COG & tiles
operations, seeds ``003``)."""

RESERVED_NAMES = frozenset({"clips"})
"""Layer names the gateway keeps for itself: ``/tiles/clips/...`` serves clip layers."""
_COMMON_KEYS = {
    "name",
    "title",
    "kind",
    "default",
    "url",
    "minzoom",
    "maxzoom",
    "bounds",
    "formats",
    "ttl_s",
    "stale_while_revalidate_s",
    "stale_if_error_s",
    "attribution",
    "public",
}

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
        fingerprint: 16 hex digits hashing kind, url and render parameters (canonical JSON,
            SHA-256); part of every cache key, so changed parameters never hit old renders.
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
        return w < east and e > west and s < north and n > south

    def cache_key(self, z: int, x: int, y: int, scale: int, fmt: str) -> str:
        """Cache key ``tile/<layer>/<fingerprint>/<z>/<x>/<y>@<scale>x.<fmt>``."""
        return f"tile/{self.name}/{self.fingerprint}/{z}/{x}/{y}@{scale}x.{fmt}"


def parse_layers(source: str, tables: Sequence[Any]) -> tuple[dict[str, Layer], str | None]:
    """Validate the ``[[layers]]`` tables of a config file.

    Returns the layers by name and the default layer's name (the one marked
    ``default = true``, or the only layer, or None).

    Raises:
        ConfigError: naming ``layers[i].<key>`` and what is wrong.
    """
    layers: dict[str, Layer] = {}
    defaults: list[str] = []
    for index, table in enumerate(tables):
        prefix = f"layers[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {prefix}: expected a table ([[layers]])")
        reader = TableReader(source, prefix, table)
        layer = _parse_layer(reader)
        if layer.name in RESERVED_NAMES:
            raise reader.error(
                "name", f"{layer.name!r} is reserved (/tiles/{layer.name}/ serves clip layers)"
            )
        if layer.name in layers:
            raise reader.error("name", f"duplicate layer name {layer.name!r}")
        layers[layer.name] = layer
        if reader.get("default", bool, False):
            defaults.append(layer.name)
    if not layers:
        raise ConfigError(
            f"{source}: layers: no layers; add at least one [[layers]] table "
            "with name, kind and url"
        )
    if len(defaults) > 1:
        raise ConfigError(
            f"{source}: layers: more than one layer has default = true "
            f"({', '.join(defaults)}); keep one"
        )
    default = defaults[0] if defaults else (next(iter(layers)) if len(layers) == 1 else None)
    return layers, default


def _parse_layer(r: TableReader) -> Layer:
    kind = r.get("kind", str, "raster")
    if kind not in OPERATIONS:
        raise r.error("kind", f"must be 'raster' or 'terrain', got {kind!r}")
    params = _RASTER_PARAMS if kind == "raster" else _TERRAIN_PARAMS
    r.reject_unknown(_COMMON_KEYS | set(params))

    name = r.get("name", str)
    if not name or not LAYER_NAME.fullmatch(name):
        raise r.error(
            "name",
            "required; 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit",
        )
    url = r.get("url", str)
    if not url:
        raise r.error("url", "required: the COG URL the upstream renders from")

    render: dict[str, Any] = {}
    for key, kind_of in params.items():
        value = r.get(key, kind_of)
        if value is not None:
            render[key] = value
    if "bands" in render and "expression" in render:
        raise r.error("expression", "set either bands or expression, not both")
    if "quality" in render and not 1 <= render["quality"] <= 100:
        raise r.error("quality", f"must be 1..100, got {render['quality']}")

    minzoom = r.get("minzoom", int, 0)
    maxzoom = r.get("maxzoom", int, 18)
    if not 0 <= minzoom <= maxzoom <= MAX_ZOOM:
        raise r.error(
            "maxzoom",
            f"need 0 <= minzoom <= maxzoom <= {MAX_ZOOM}, got minzoom={minzoom}, maxzoom={maxzoom}",
        )

    formats = _formats(r, kind)
    ttl_s = r.positive("ttl_s", int, 86400)
    fingerprint = layer_fingerprint(kind, url, render)
    return Layer(
        name=name,
        title=r.get("title", str, name),
        kind=kind,
        url=url,
        render=MappingProxyType(render),
        minzoom=minzoom,
        maxzoom=maxzoom,
        bounds=_bounds(r),
        formats=formats,
        ttl_s=ttl_s,
        stale_while_revalidate_s=_non_negative(r, "stale_while_revalidate_s", 3600),
        stale_if_error_s=_non_negative(r, "stale_if_error_s", 86400),
        attribution=r.get("attribution", str, ""),
        public=r.get("public", bool, True),
        fingerprint=fingerprint,
    )


def layer_fingerprint(kind: str, url: str, render: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``{"kind", "url", "render"}`` as canonical JSON: what
    a layer's cache keys carry, so that new render parameters never hit old renders."""
    text = json.dumps(
        {"kind": kind, "url": url, "render": dict(render)}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _non_negative(r: TableReader, key: str, default: int) -> int:
    value = r.get(key, int, default)
    if value < 0:
        raise r.error(key, f"must be 0 or more seconds, got {value}")
    return value


def _formats(r: TableReader, kind: str) -> tuple[str, ...]:
    default = ["png", "jpg", "webp"] if kind == "raster" else ["png"]
    formats = r.get("formats", list, default)
    if not formats or any(f not in MEDIA_TYPES for f in formats):
        raise r.error(
            "formats", f"must be a non-empty list of {', '.join(MEDIA_TYPES)}, got {formats!r}"
        )
    if kind == "terrain" and formats != ["png"]:
        raise r.error("formats", 'terrain layers serve Terrain-RGB as PNG only: formats = ["png"]')
    return tuple(dict.fromkeys(formats))


def _bounds(r: TableReader) -> Bounds:
    value = r.get("bounds", list, [-180.0, -WEB_MERCATOR_MAX_LAT, 180.0, WEB_MERCATOR_MAX_LAT])
    if len(value) != 4 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise r.error("bounds", f"must be [west, south, east, north] in degrees, got {value!r}")
    west, south, east, north = (float(v) for v in value)
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise r.error(
            "bounds",
            f"need -180 <= west < east <= 180 and -90 <= south < north <= 90, got {value!r}",
        )
    return west, south, east, north

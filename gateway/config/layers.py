"""Layers from the ``[[layers]]`` tables of the config file, validated into
:class:`~gateway.layers.Layer` objects.

Every mistake raises :class:`~gateway.config.tables.ConfigError` naming ``layers[i].<key>``
and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from gateway.config.tables import ConfigError, TableReader
from gateway.layers import (
    LAYER_NAME,
    MAX_ZOOM,
    MEDIA_TYPES,
    OPERATIONS,
    RENDER_PARAMS,
    RESERVED_NAMES,
    TERRAIN_RGB_MAX_M,
    TERRAIN_RGB_MIN_M,
    WEB_MERCATOR_MAX_LAT,
    Bounds,
    Layer,
    layer_fingerprint,
)

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

_GATEWAY_KEYS = {"raster": frozenset(), "terrain": frozenset({"nodata_height_m"})}
"""Per-kind keys the gateway applies itself (never sent upstream)."""


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
    params = RENDER_PARAMS[kind]
    r.reject_unknown(_COMMON_KEYS | set(params) | _GATEWAY_KEYS[kind])

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
    nodata_height_m = 0.0
    if kind == "terrain":  # the gateway writes it into the tiles: part of what is cached
        nodata_height_m = _nodata_height(r)
    fingerprint = layer_fingerprint(
        kind, url, render, nodata_height_m if kind == "terrain" else None
    )
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
        nodata_height_m=nodata_height_m,
    )


def _nodata_height(r: TableReader) -> float:
    height = r.get("nodata_height_m", float, 0.0)
    if not TERRAIN_RGB_MIN_M <= height <= TERRAIN_RGB_MAX_M:
        raise r.error(
            "nodata_height_m",
            f"must be {TERRAIN_RGB_MIN_M:g} to {TERRAIN_RGB_MAX_M:g} metres (what Terrain-RGB "
            f"encodes), got {height}",
        )
    return height


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

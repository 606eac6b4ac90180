"""TileJSON 3.0.0 documents and the ``/layers`` summary, built from layers (no HTTP).

TileJSON 3.0.0: https://github.com/mapbox/tilejson-spec/tree/master/3.0.0 (``tiles``,
``minzoom``, ``maxzoom``, ``bounds``, ``center``, ``attribution``, ``scheme``; terrain layers add
``encoding: "mapbox"`` as MapLibre's raster-dem sources read it). ``base`` is the gateway's
absolute base URL and ``query`` a query string (``?token=...``) to append to tile URLs.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.layers import WEB_MERCATOR_MAX_LAT, Layer

TILEJSON_VERSION = "3.0.0"


def tile_template(base: str, layer: Layer, fmt: str | None = None) -> str:
    """Absolute XYZ template ``{base}/tiles/{name}/{z}/{x}/{y}.{fmt}`` (default: first format)."""
    return f"{base}/tiles/{layer.name}/{{z}}/{{x}}/{{y}}.{fmt or layer.formats[0]}"


def tilejson_url(base: str, layer: Layer) -> str:
    """Absolute URL of a layer's TileJSON document."""
    return f"{base}/tiles/{layer.name}/tilejson.json"


def center(layer: Layer) -> list[float]:
    """``[lon, lat, zoom]``: the middle of the bounds, at the zoom where they span one to two
    256 px tiles, clamped to ``minzoom..maxzoom`` (TileJSON ``center``)."""
    west, south, east, north = layer.bounds
    lat_s = max(south, -WEB_MERCATOR_MAX_LAT)
    lat_n = min(north, WEB_MERCATOR_MAX_LAT)

    def merc_y(lat: float) -> float:  # 0..1 from the north, like tile rows
        s = math.sin(math.radians(lat))
        return 0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)

    span = max((east - west) / 360.0, merc_y(lat_s) - merc_y(lat_n), 1e-9)
    zoom = max(layer.minzoom, min(layer.maxzoom, int(math.log2(1.0 / span)) + 1))
    return [round((west + east) / 2, 6), round((lat_s + lat_n) / 2, 6), zoom]


def layer_summary(base: str, layer: Layer, default: bool, query: str = "") -> dict[str, Any]:
    """One entry of ``GET /layers``."""
    return {
        "name": layer.name,
        "title": layer.title,
        "kind": layer.kind,
        "formats": list(layer.formats),
        "minzoom": layer.minzoom,
        "maxzoom": layer.maxzoom,
        "bounds": list(layer.bounds),
        "attribution": layer.attribution,
        "public": layer.public,
        "default": default,
        "tiles": tile_template(base, layer) + query,
        "tilejson": tilejson_url(base, layer) + query,
    }


def tilejson(base: str, layer: Layer, query: str = "") -> dict[str, Any]:
    """The TileJSON 3.0.0 document of ``layer``.

    ``vector_layers`` is an empty array: the spec does not require it for raster tiles, but
    the spec's own JSON schema (``3.0.0/schema.json``) lists it as required, and an empty
    array satisfies both. Terrain layers add ``encoding: "mapbox"`` (Terrain-RGB), the
    extension MapLibre's ``raster-dem`` source reads.
    """
    doc: dict[str, Any] = {
        "tilejson": TILEJSON_VERSION,
        "name": layer.title,
        "description": f"{layer.kind.capitalize()} layer {layer.name} served by geopera-gateway",
        "version": "1.0.0",
        "scheme": "xyz",
        "tiles": [tile_template(base, layer) + query],
        "vector_layers": [],
        "minzoom": layer.minzoom,
        "maxzoom": layer.maxzoom,
        "bounds": list(layer.bounds),
        "center": center(layer),
        "attribution": layer.attribution,
        "format": layer.formats[0],
    }
    if layer.kind == "terrain":
        doc["encoding"] = "mapbox"
    return doc


# --- WMTS ---------------------------------------------------------------------------------

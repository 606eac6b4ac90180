"""Tile routes: ``GET /tiles/{layer}/{z}/{x}/{y}[@2x].{png|jpg|webp}`` and the short form
``GET /tiles/{z}/{x}/{y}[@2x].png`` for the default layer. Both answer HEAD too.

Handlers parse and validate the path strictly (400 for malformed, 404 for an unknown layer,
400 for a tile outside the layer's zoom range or the z/x/y tile matrix, all problem+json),
then hand a :class:`TileAddress` to the tile service and write its answer with a strong ETag,
``Cache-Control: <visibility>, max-age=<seconds left>``, ``X-Cache`` and 304 for
``If-None-Match``. The visibility is ``public`` for public layers and ``private`` for the
others (RFC 9111 section 5.2.2.7: a shared cache, a CDN or nginx ``proxy_cache``, must not
store it), so a private tile fetched by a token holder is never served to anyone else.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.http.keys import AUTH, LAYERS, SETTINGS, TILE_SERVICE
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.problem import bad_request, not_found
from gateway.layers import Layer
from gateway.logs import UPSTREAM_TIME_KEY
from gateway.services.tiles import TileAddress, TileResult

_Z = re.compile(r"0|[1-9][0-9]?")
_XY = re.compile(r"0|[1-9][0-9]{0,8}")
_TAIL = re.compile(r"(?P<y>0|[1-9][0-9]{0,8})(?:@(?P<scale>[12])x)?\.(?P<fmt>[a-z0-9]{1,5})")


def parse_tile(layer: Layer, z: str, x: str, tail: str) -> TileAddress:
    """Validate a tile path against ``layer``.

    Args:
        z, x: path segments; ``tail`` is ``{y}.{fmt}`` or ``{y}@2x.{fmt}``.

    Raises:
        Problem: 400 for a malformed segment, a format the layer does not serve, a zoom
            outside ``layer.minzoom..layer.maxzoom``, or x/y outside ``0..2^z-1``.
    """
    tail_match = _TAIL.fullmatch(tail)
    if not _Z.fullmatch(z) or not _XY.fullmatch(x) or tail_match is None:
        raise bad_request(
            "Tile paths look like /tiles/{layer}/{z}/{x}/{y}.{format} or "
            "{y}@2x.{format}, with decimal z, x and y.",
            "malformed-tile-path",
        )
    zoom, col, row = int(z), int(x), int(tail_match["y"])
    scale = int(tail_match["scale"] or 1)
    fmt = tail_match["fmt"]
    if fmt not in layer.formats:
        raise bad_request(
            f"Layer {layer.name!r} serves {', '.join(layer.formats)}, not {fmt!r}.",
            "unsupported-format",
        )
    if not layer.minzoom <= zoom <= layer.maxzoom:
        raise bad_request(
            f"Layer {layer.name!r} has zoom levels {layer.minzoom} to "
            f"{layer.maxzoom}; {zoom} is outside.",
            "zoom-out-of-range",
        )
    limit = 1 << zoom
    if col >= limit or row >= limit:
        raise bad_request(f"At zoom {zoom}, x and y must be 0 to {limit - 1}.", "tile-out-of-range")
    return TileAddress(layer, zoom, col, row, scale, fmt)


def cache_control(private: bool, max_age: int) -> str:
    """``Cache-Control`` of a tile with ``max_age`` seconds of freshness left: ``public``, or
    ``private`` (browsers only, never a shared cache; RFC 9111 section 5.2.2.7) for tiles
    that need a token (private layers, clip layers)."""
    return f"{'private' if private else 'public'}, max-age={max_age}"


def tile_response(request: web.Request, result: TileResult, private: bool = False) -> web.Response:
    """The answer for a tile: its body with ``ETag``, ``Cache-Control``
    (:func:`cache_control`) and ``X-Cache``; 304 when ``If-None-Match`` matches."""
    tile = result.tile
    if result.upstream_s is not None:
        request[UPSTREAM_TIME_KEY] = result.upstream_s
    headers = {
        "ETag": tile.etag,
        "Cache-Control": cache_control(private, tile.max_age()),
        "X-Cache": result.cache_status,
    }
    if _etag_matches(request.headers.get("If-None-Match"), tile.etag):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = tile.media_type
    return web.Response(body=tile.body, headers=headers)


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match evaluation with weak comparison (RFC 9110 section 13.1.2)."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == etag for candidate in header.split(","))


async def layer_tile(request: web.Request) -> web.Response:
    """``GET /tiles/{layer}/{z}/{x}/{y}[@2x].{fmt}``."""
    info = request.match_info
    layer = request.app[LAYERS].get(info["layer"])
    if layer is None:
        raise not_found(
            f"No layer named {info['layer'][:64]!r}; GET /layers lists them.", "unknown-layer"
        )
    request.app[AUTH].authorize(request, "tiles", layer)
    address = parse_tile(layer, info["z"], info["x"], info["tail"])
    return tile_response(
        request, await request.app[TILE_SERVICE].get(address), private=not layer.public
    )


async def default_tile(request: web.Request) -> web.Response:
    """``GET /tiles/{z}/{x}/{y}[@2x].png``: the layer marked ``default = true``."""
    name = request.app[SETTINGS].default_layer
    if name is None:
        raise not_found(
            "No default layer is configured; use /tiles/{layer}/{z}/{x}/{y}.png.",
            "no-default-layer",
        )
    info = request.match_info
    layer = request.app[LAYERS][name]
    request.app[AUTH].authorize(request, "tiles", layer)
    address = parse_tile(layer, info["z"], info["x"], info["tail"])
    return tile_response(
        request, await request.app[TILE_SERVICE].get(address), private=not layer.public
    )


POLICY = RoutePolicy(cors=True, caller_limit=True, query=frozenset({"token"}))
"""Tiles: read by map clients across origins, counted against the caller's limit (a miss
spends upstream), ``?token=`` the only query parameter."""


def add_routes(app: web.Application) -> None:
    """Register the tile routes on ``app``."""
    add_get(app, "/tiles/{layer}/{z}/{x}/{tail}", layer_tile, name="tile", policy=POLICY)
    add_get(app, "/tiles/{z}/{x}/{tail}", default_tile, name="default_tile", policy=POLICY)

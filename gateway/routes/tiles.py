"""Tile routes: ``GET /tiles/{layer}/{z}/{x}/{y}[@2x].{png|jpg|webp}`` and the short form
``GET /tiles/{z}/{x}/{y}[@2x].png`` for the default layer. Both answer HEAD too.

Handlers parse and validate the path strictly (:func:`gateway.http.params.parse_tile`: 400
for malformed, 404 for an unknown layer, 400 for a tile outside the layer's zoom range or the
z/x/y tile matrix, all problem+json), then hand a
:class:`~gateway.services.tiles.TileAddress` to the tile service and write its answer
(:func:`gateway.http.answers.tile_response`) with a strong ETag,
``Cache-Control: <visibility>, max-age=<seconds left>``, ``X-Cache`` and 304 for
``If-None-Match``. The visibility is ``public`` for public layers and ``private`` for the
others (RFC 9111 section 5.2.2.7: a shared cache, a CDN or nginx ``proxy_cache``, must not
store it), so a private tile fetched by a token holder is never served to anyone else.
"""

from __future__ import annotations

from aiohttp import web

from gateway.http.answers import tile_response
from gateway.http.keys import AUTH, LAYERS, SETTINGS, TILE_SERVICE
from gateway.http.params import parse_tile
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.problem import not_found


async def layer_tile(request: web.Request) -> web.StreamResponse:
    """``GET /tiles/{layer}/{z}/{x}/{y}[@2x].{fmt}``."""
    info = request.match_info
    app = request.app
    layer = app[LAYERS].get(info["layer"])
    if layer is None:
        raise not_found(
            f"No layer named {info['layer'][:64]!r}; GET /layers lists them.", "unknown-layer"
        )
    app[AUTH].authorize(request, "tiles", layer)
    address = parse_tile(layer, info["z"], info["x"], info["tail"])
    service = app[TILE_SERVICE]
    result = service.get_fresh(address) or await service.get(address)  # a hit awaits nothing
    return tile_response(request, result, private=not layer.public)


async def default_tile(request: web.Request) -> web.StreamResponse:
    """``GET /tiles/{z}/{x}/{y}[@2x].png``: the layer marked ``default = true``."""
    name = request.app[SETTINGS].default_layer
    if name is None:
        raise not_found(
            "No default layer is configured; use /tiles/{layer}/{z}/{x}/{y}.png.",
            "no-default-layer",
        )
    info = request.match_info
    app = request.app
    layer = app[LAYERS][name]
    app[AUTH].authorize(request, "tiles", layer)
    address = parse_tile(layer, info["z"], info["x"], info["tail"])
    service = app[TILE_SERVICE]
    result = service.get_fresh(address) or await service.get(address)
    return tile_response(request, result, private=not layer.public)


POLICY = RoutePolicy(cors=True, caller_limit=True, query=frozenset({"token"}))
"""Tiles: read by map clients across origins, counted against the caller's limit (a miss
spends upstream), ``?token=`` the only query parameter."""


def add_routes(app: web.Application) -> None:
    """Register the tile routes on ``app``."""
    add_get(app, "/tiles/{layer}/{z}/{x}/{tail}", layer_tile, name="tile", policy=POLICY)
    add_get(app, "/tiles/{z}/{x}/{tail}", default_tile, name="default_tile", policy=POLICY)

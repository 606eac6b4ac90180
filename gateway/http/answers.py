"""Answers more than one route module writes: a tile, for layer tiles
(:mod:`gateway.routes.tiles`) and clip tiles (:mod:`gateway.routes.clips`).

A tile goes out with its strong ``ETag``, ``Cache-Control: <visibility>, max-age=<seconds
left>`` and ``X-Cache`` (the tile service's cache status), or as 304 when ``If-None-Match``
matches (:func:`gateway.http.conditional.none_match`).
"""

from __future__ import annotations

from aiohttp import web

from gateway.http.conditional import none_match
from gateway.http.keys import CLOCK
from gateway.logs import UPSTREAM_TIME_KEY
from gateway.services.tiles import TileResult


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
        "Cache-Control": cache_control(private, tile.max_age(request.app[CLOCK]())),
        "X-Cache": result.cache_status,
    }
    if none_match(request, tile.etag):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = tile.media_type
    return web.Response(body=tile.body, headers=headers)
